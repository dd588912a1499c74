"""Tenants: whose event it is decides which policy, fusion weights, hash banks and dedupe pool apply.

A tenant named in ``tenants`` gets its overrides over the global settings; any other tenant gets the
globals under its own name. Metrics never carry an unconfigured name (a producer could mint millions):
they say "other".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from streamguard.config import FusionSettings, PolicySettings, Settings

DEFAULT_TENANT = "default"
OTHER_TENANT = "other"
_SHARED_SCOPE = "shared"


@dataclass(frozen=True)
class Tenant:
    name: str
    configured: bool
    policy: PolicySettings
    fusion: FusionSettings
    banks: tuple[str, ...]
    share_dedupe: bool

    @property
    def metric_label(self) -> str:
        return self.name if self.configured or self.name == DEFAULT_TENANT else OTHER_TENANT

    def dedupe_key(self, versions_key: str) -> str:
        """The dedupe store's key for this tenant's pool. The default tenant keeps the unscoped key (caches
        written before tenants existed stay valid); sharing tenants meet in one pool of their own, so a
        tenant that does not share is never read by one that does."""
        if self.share_dedupe:
            return f"{versions_key}.{_SHARED_SCOPE}"
        if self.name == DEFAULT_TENANT:
            return versions_key
        # Hashed: tenant names are free text, Redis keys are not the place for them.
        return f"{versions_key}.{hashlib.sha256(self.name.encode()).hexdigest()[:16]}"


class Tenants:
    """Resolves ``ImageEvent.tenant`` to its `Tenant`; configured ones are built once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._configured = {name: self._build(name, True) for name in settings.tenants}
        self._default = self._configured.get(DEFAULT_TENANT) or self._build(DEFAULT_TENANT, False)

    def resolve(self, tenant: str | None) -> Tenant:
        if tenant is None or tenant == DEFAULT_TENANT:
            return self._default
        found = self._configured.get(tenant)
        return found if found is not None else self._build(tenant, False)

    def _build(self, name: str, configured: bool) -> Tenant:
        s = self._settings
        own = s.tenants.get(name)
        # Every defined bank, and the reviewers' (a person's decision answers later copies).
        all_banks = tuple(dict.fromkeys([*s.banks.definitions, s.review.bank_ai, s.review.bank_real]))
        if own is None:
            return Tenant(name, configured, s.policy, s.fusion, all_banks, s.dedupe.share_across_tenants)
        thresholds = {k: v for k, v in (("ai_threshold", own.ai_threshold), ("real_threshold", own.real_threshold))
                      if v is not None}
        # model_validate re-runs the checks, so a tenant cannot set real_threshold above ai_threshold.
        policy = PolicySettings.model_validate({**s.policy.model_dump(), **thresholds})
        fusion = FusionSettings.model_validate({**s.fusion.model_dump(),
                                                "weights": {**s.fusion.weights, **own.fusion_weights}})
        banks = tuple(own.banks) if own.banks is not None else all_banks
        share = own.share_dedupe if own.share_dedupe is not None else s.dedupe.share_across_tenants
        return Tenant(name, configured, policy, fusion, banks, share)
