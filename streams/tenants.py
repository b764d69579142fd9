"""The tenants of a deployment: each one's quotas and fair-share weight.

Read from `TENANTS_FILE` (YAML or JSON) where set:

    default:                 # any tenant not listed below
      requests_per_minute: 0 # 0: no limit
      tokens_per_minute: 0
      weight: 1
    tenants:
      acme:
        requests_per_minute: 600
        tokens_per_minute: 200000
        weight: 2            # twice the default's share of admissions near the cap

With no file every tenant is unlimited and weighs 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from streams.config import Settings
from streams.exceptions import TidegateError

# a tenant's name is part of topic names (its request topic, its clients' reply topics)
TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    requests_per_minute: int = 0  # 0: no limit
    tokens_per_minute: int = 0  # prompt plus max_new_tokens; 0: no limit
    weight: float = 1.0  # share of admissions while the path is near full, against the others'

    @classmethod
    def parse(cls, raw: Any, where: str) -> TenantPolicy:
        if not isinstance(raw, dict):
            raise TidegateError(f"{where}: expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"requests_per_minute", "tokens_per_minute", "weight"}
        if unknown:
            raise TidegateError(f"{where}: unknown keys {sorted(unknown)}")
        policy = cls(**raw)
        if policy.requests_per_minute < 0 or policy.tokens_per_minute < 0 or not policy.weight > 0:
            raise TidegateError(f"{where}: limits must be >= 0 and the weight > 0")
        return policy


class Tenants:
    def __init__(self, default: TenantPolicy | None = None, tenants: dict[str, TenantPolicy] | None = None) -> None:
        self.default = default or TenantPolicy()
        self.tenants = tenants or {}

    def policy(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)

    @property
    def limited(self) -> bool:
        """Whether any tenant has a quota (else the quota check is skipped)."""
        return any(p.requests_per_minute or p.tokens_per_minute for p in [self.default, *self.tenants.values()])

    @classmethod
    def load(cls, settings: Settings) -> Tenants:
        """From `settings.tenants_file`; every tenant unlimited where it is unset."""
        if not settings.tenants_file:
            return cls()
        path = Path(settings.tenants_file)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TidegateError(f"tenants file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise TidegateError(f"tenants file {path}: expected a mapping")
        default = TenantPolicy.parse(raw.get("default", {}), f"{path}: default")
        listed = raw.get("tenants") or {}
        if not isinstance(listed, dict):
            raise TidegateError(f"tenants file {path}: `tenants` must map names to policies")
        return cls(default, {name: TenantPolicy.parse(p, f"{path}: tenant {name}") for name, p in listed.items()})
