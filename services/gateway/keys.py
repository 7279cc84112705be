"""API keys of the gateway: who is calling, which tenant pays, which routes it may use.

The keys file holds only the SHA-256 of each key, so a leaked file or config map leaks no key:

    keys:
      - name: acme-prod            # shown in logs and metrics; the key itself never is
        sha256: "<64 hex chars>"   # printf %s "$KEY" | sha256sum
        tenant: acme               # requests with this key are billed to this tenant
        routes: [chat, faq]        # optional: routes the key may use (default: all)
        tenants: [acme, acme-eu]   # optional: tenants it may name in X-Switchyard-Tenant
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from schemas._base import NAME_PATTERN, WireModel
from shared.errors import ConfigError


class ApiKey(WireModel):
    name: str = Field(pattern=NAME_PATTERN)
    sha256: str
    tenant: str = Field(pattern=NAME_PATTERN)
    routes: list[str] | None = Field(default=None, min_length=1)
    tenants: list[str] = Field(default_factory=list)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex characters: printf %s \"$KEY\" | sha256sum")
        return value.lower()

    def may_use(self, route: str) -> bool:
        return self.routes is None or route in self.routes

    def may_bill(self, tenant: str) -> bool:
        return tenant == self.tenant or tenant in self.tenants


class KeysFile(WireModel):
    keys: list[ApiKey] = Field(min_length=1)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: list[ApiKey]):
        self._by_digest = {k.sha256: k for k in keys}
        if len(self._by_digest) != len(keys):
            raise ConfigError("the gateway keys file lists the same key twice")
        self.keys = keys

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the gateway keys file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        try:
            return cls(KeysFile.model_validate(data).keys)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{path}: {problems}") from None

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key of an `Authorization: Bearer <key>` header, or None for a missing or unknown key."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        wanted = digest(authorization[len("Bearer "):].strip())
        found = self._by_digest.get(wanted)
        # The dict lookup hashes a digest, not the key; compare once more in constant time anyway.
        return found if found is not None and hmac.compare_digest(found.sha256, wanted) else None
