"""The policy layer: each module answers one question (accept, defer, reject)."""
