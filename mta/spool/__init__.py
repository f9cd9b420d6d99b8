"""The durable filesystem queue; `mta.spool.spool` is its only writer."""

from mta.spool.envelope import Envelope, EnvelopeError, Recipient
from mta.spool.spool import Entry, IncomingMessage, NoSuchMessage, Spool, SpoolError

__all__ = ["Entry", "Envelope", "EnvelopeError", "IncomingMessage", "NoSuchMessage", "Recipient", "Spool", "SpoolError"]
