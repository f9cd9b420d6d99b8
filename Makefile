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
                      postfix openssl curl procps

.PHONY: venv run deps-test test clean

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
	$(VPY) -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) --durations=10 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) var build dist .eggs *.egg-info .pytest_cache .hypothesis
	rm -rf debian/.debhelper debian/mta debian/files debian/*.substvars debian/*.log debian/debhelper-build-stamp
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
