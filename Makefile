# mta: build, run and test.
#
#   make run    build .venv and start the daemon with the development defaults
#               (127.0.0.1, ports 2525/5870/4650/8080, state under ./var/)
#   make test   build .venv, install the Debian test tools, run the test suite
#
# Pass-through: `make run ARGS="--config my.toml"`, `make test PYTEST_ARGS="-k spool -x"`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := venv

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

ARGS ?=
PYTEST_ARGS ?=
# Per-test ceiling (pytest-timeout), so one hung test cannot eat the CI budget.
# A test can still raise its own limit with @pytest.mark.timeout(N).
PYTEST_TIMEOUT ?= 300

# Debian packages the tests use: swaks (SMTP client), postfix (smtp-source and
# smtp-sink as load generator and peer), openssl (s_client, certificates),
# curl (admin API), procps (pgrep/pkill/ps for process checks). Installed
# without Recommends, so swaks's TLS and IPv6 modules are named explicitly.
DEPS_TEST_PACKAGES ?= swaks libnet-ssleay-perl libio-socket-inet6-perl dovecot-lmtpd publicsuffix \
                      opendkim-tools prometheus \
                      postfix openssl curl procps

.PHONY: venv run deps-test test clean bench

venv: $(VENV)/.stamp

# Rebuilt when the dependencies change. The editable install maps the `mta`
# package to ./mta, so code edits need no reinstall.
$(VENV)/.stamp: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements-dev.txt
	$(VPY) -m pip install --quiet -e .
	touch $@

run: venv
	exec $(VENV)/bin/mta serve $(ARGS)

# mta vs Postfix on this machine (bench/run.py; root, Postfix's tools): prints a
# table, writes bench/RESULTS.md, results.json, results.png. `make bench ARGS=--quick`.
bench: venv
	@$(VPY) -c 'import matplotlib' 2>/dev/null || $(VPY) -m pip install -q matplotlib
	$(VPY) bench/run.py $(ARGS)

# Idempotent: with everything present it only asks dpkg (no apt-get update).
deps-test:
	@missing=(); \
	for pkg in $(DEPS_TEST_PACKAGES); do \
	  if [[ "$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null)" != "install ok installed" ]]; then \
	    missing+=("$$pkg"); \
	  fi; \
	done; \
	if (( $${#missing[@]} == 0 )); then \
	  echo "deps-test: all present ($(DEPS_TEST_PACKAGES))"; \
	  exit 0; \
	fi; \
	sudo=(); [[ "$$(id -u)" == 0 ]] || sudo=(sudo); \
	echo "deps-test: installing $${missing[*]}"; \
	echo "postfix postfix/main_mailer_type select No configuration" | "$${sudo[@]}" debconf-set-selections; \
	apt=("$${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0 -q -y); \
	"$${apt[@]}" update; \
	"$${apt[@]}" install --no-install-recommends "$${missing[@]}" </dev/null; \
	if [[ " $${missing[*]} " == *" postfix "* ]]; then \
	  "$${sudo[@]}" postfix stop 2>/dev/null || true; \
	fi

test: venv deps-test
	@$(MAKE) --no-print-directory deb-test-if-available
	$(VPY) -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) --durations=10 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) var build dist .eggs *.egg-info .pytest_cache .hypothesis
	rm -rf debian/.debhelper debian/mta debian/files debian/*.substvars debian/*.log debian/debhelper-build-stamp
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# --- Debian package (issue 7) ---------------------------------------------
#
#   make deb        build ../mta_VERSION_all.deb with dpkg-buildpackage, copy it
#                   to ./dist/, run lintian (errors fail the build)
#   make deb-test   DEP-8 tests (debian/tests) with autopkgtest in a clean
#                   Debian 12 testbed: an mmdebstrap tarball, built once and
#                   cached in $(DEB_TESTBED), run with the unshare backend
#
# `make test` runs deb-test too when autopkgtest and mmdebstrap are installed,
# and always in CI (CI=true), which installs them. Every step has a timeout.

DEB_BUILD_PACKAGES ?= debhelper dh-python python3-all python3-setuptools lintian
DEB_TEST_PACKAGES  ?= autopkgtest mmdebstrap uidmap
DEB_TESTBED        ?= /var/cache/mta-bookworm.tar
DEB_TESTBED_DAYS   ?= 30
DEB_BUILD_TIMEOUT  ?= 900
DEB_TEST_TIMEOUT   ?= 1800
DEB_TEST_OUTPUT    ?= dist/autopkgtest

# $(call apt_install,PACKAGES): install the ones not installed yet (idempotent).
define apt_install
missing=(); \
for pkg in $(1); do \
  if [[ "$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null)" != "install ok installed" ]]; then missing+=("$$pkg"); fi; \
done; \
if (( $${#missing[@]} > 0 )); then \
  sudo=(); [[ "$$(id -u)" == 0 ]] || sudo=(sudo); \
  echo "installing $${missing[*]}"; \
  apt=("$${sudo[@]}" env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0 -q -y); \
  "$${apt[@]}" update; \
  "$${apt[@]}" install --no-install-recommends "$${missing[@]}" </dev/null; \
fi
endef

.PHONY: deb deb-test deb-test-if-available

deb:
	@$(call apt_install,$(DEB_BUILD_PACKAGES))
	timeout $(DEB_BUILD_TIMEOUT) dpkg-buildpackage -us -uc -b
	@version=$$(dpkg-parsechangelog -S Version); \
	mkdir -p dist; \
	cp "../mta_$${version}_all.deb" dist/; \
	echo "deb: ../mta_$${version}_all.deb, copied to dist/"; \
	timeout 600 lintian --info --fail-on error "dist/mta_$${version}_all.deb"

deb-test: deb
	@$(call apt_install,$(DEB_TEST_PACKAGES))
	@sudo=(); [[ "$$(id -u)" == 0 ]] || sudo=(sudo); \
	for file in /etc/subuid /etc/subgid; do \
	  grep -qs '^root:100000:65536$$' "$$file" || echo 'root:100000:65536' | "$${sudo[@]}" tee -a "$$file" >/dev/null; \
	done; \
	if [[ -e "$(DEB_TESTBED)" ]] && [[ -n "$$(find "$(DEB_TESTBED)" -mtime +$(DEB_TESTBED_DAYS))" ]]; then \
	  "$${sudo[@]}" rm -f "$(DEB_TESTBED)"; \
	fi; \
	if [[ ! -s "$(DEB_TESTBED)" ]]; then \
	  echo "deb-test: building the testbed $(DEB_TESTBED) (about a minute)"; \
	  "$${sudo[@]}" timeout 900 mmdebstrap --variant=apt --format=tar bookworm "$(DEB_TESTBED).tmp"; \
	  "$${sudo[@]}" mv "$(DEB_TESTBED).tmp" "$(DEB_TESTBED)"; \
	fi
	@version=$$(dpkg-parsechangelog -S Version); \
	src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	mkdir "$$src/mta"; cp -a debian "$$src/mta/"; \
	sudo=(); [[ "$$(id -u)" == 0 ]] || sudo=(sudo); \
	rm -rf "$(DEB_TEST_OUTPUT)"; \
	echo "deb-test: autopkgtest dist/mta_$${version}_all.deb in $(DEB_TESTBED), logs in $(DEB_TEST_OUTPUT)/"; \
	"$${sudo[@]}" timeout $(DEB_TEST_TIMEOUT) autopkgtest -U --output-dir "$(DEB_TEST_OUTPUT)" \
	  "dist/mta_$${version}_all.deb" "$$src/mta" -- unshare -t "$(DEB_TESTBED)" 2>&1 | cat

deb-test-if-available:
	@if [[ "$${CI:-}" == true ]] || { command -v autopkgtest && command -v mmdebstrap; } >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory deb-test; \
	else \
	  echo "deb-test: skipped (autopkgtest and mmdebstrap not installed; 'make deb-test' installs them)"; \
	fi
