"""API keys, stored hashed, each mapped to the tenant it speaks for.

The keys file (`API_KEYS_FILE`, YAML or JSON) maps the SHA-256 of each key (hex) to
a tenant; a key itself is never stored:

    5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8: acme

The gateway stamps the tenant on every request it sends, so quotas and isolation
apply per key's tenant whatever the body says (tidegate/tenancy.py, processors/).
`tidegate gateway --new-key TENANT` prints a new key and its line for the file.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import yaml

from streams.exceptions import TidegateError
from streams.tenants import TENANT_NAME

KEY_PREFIX = "tg-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeys:
    def __init__(self, tenants_by_digest: dict[str, str]) -> None:
        for tenant in tenants_by_digest.values():
            if not TENANT_NAME.fullmatch(tenant):
                raise TidegateError(f"API key tenant {tenant[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        self._tenants = tenants_by_digest

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TidegateError(f"API keys file {path}: {exc}") from exc
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise TidegateError(f"API keys file {path}: expected `<sha256 of a key>: <tenant>` lines")
        return cls({k.lower(): v for k, v in raw.items()})

    def tenant(self, key: str) -> str | None:
        """The tenant of `key`, or None. Looked up by digest: how long a lookup takes
        can tell about a digest, never about a key."""
        return self._tenants.get(digest(key))
