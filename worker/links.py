"""Short review links: what the SC prints and the SR carries, and what the dashboard resolves.

The key is derived from the source SOP Instance UID and the model version, so the builder
can print it before the result is stored, and the dashboard finds the row by it. It is not
a secret: the dashboard asks for a login before it shows anything.
"""

from __future__ import annotations

import base64
import hashlib


def review_key(sop_instance_uid: str, model_version: str) -> str:
    """Ten lower-case base32 characters (50 bits): short enough to type from a screen."""
    digest = hashlib.sha256(f"{sop_instance_uid}|{model_version}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:10].lower()


def review_url(public_url: str, sop_instance_uid: str, model_version: str) -> str:
    return f"{public_url.rstrip('/')}/r/{review_key(sop_instance_uid, model_version)}"
