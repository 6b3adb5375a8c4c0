"""The append-only audit log: every state change writes its record in the same transaction."""

from stavily.audit.log import append, entry, list_records

__all__ = ["append", "entry", "list_records"]
