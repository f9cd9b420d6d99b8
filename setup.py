"""Packaging for mta, a mail transfer agent.

The runtime dependencies carry loose lower bounds that Debian 12 (bookworm)
satisfies, so the .deb can depend on the distribution's python3-* packages.
requirements-dev.txt pins exactly those Debian versions for the test suite.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="mta",
    version="0.1.0",
    description="A mail transfer agent: SMTP relay and submission, spool, delivery, admin API",
    # Namespace-aware, so a subpackage without __init__.py is still installed.
    packages=find_namespace_packages(include=["mta", "mta.*"], exclude=["*.__pycache__"]),
    python_requires=">=3.11",
    install_requires=[
        "dnspython>=2.3",
        "cryptography>=38",
        "waitress>=2.1",
        "falcon>=3.1",
        "prometheus-client>=0.16",
        "bcrypt>=3.2",
        "dkimpy>=1.1.4",
        "pyspf>=2.0.14",
        "pynacl>=1.5",
    ],
    entry_points={
        "console_scripts": [
            "mta=mta.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
