"""The advisory-lock keys that order writes to one session (and one template) in PostgreSQL.

The workers take them around each batch (``workers.applier``), the cleanup around the
sessions it removes (``perth_pipeline.retention``): one definition for both.
"""

from __future__ import annotations

import hashlib
from uuid import UUID

__all__ = ["lock_key"]


def lock_key(value: UUID | str) -> int:
    """The advisory-lock key of a session id (or a template name): a signed 64-bit integer.

    A session's key is the first 8 bytes of its id; a template's, a hash of its name.
    """
    if isinstance(value, UUID):
        raw = value.bytes[:8]
    else:
        raw = hashlib.blake2b(b"template:" + value.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big", signed=True)
