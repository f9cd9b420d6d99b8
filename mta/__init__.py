"""mta: a mail transfer agent (SMTP server, durable spool, delivery, admin API).

The package is wired together in `mta.main`; `mta.cli` is the command line.
"""

__version__ = "0.1.0"
