"""Hash banks: named sets of known AI-generated and known-real content, matched before any detector runs,
exactly (SHA-256) and nearly (PDQ, under the dedupe distance and quality rules).

The worker sees `open_banks` and `BankStore.match`; `streamguard banks` imports, exports, withdraws from and
inspects them.
"""

from __future__ import annotations

from streamguard.banks.model import BankEntry, BankInfo, BankMatch, BanksUnavailable, Label
from streamguard.banks.store import BankStore, open_banks

__all__ = ["BankEntry", "BankInfo", "BankMatch", "BankStore", "BanksUnavailable", "Label", "open_banks"]
