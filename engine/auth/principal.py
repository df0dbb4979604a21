"""Who is calling: an API key's name, a JWT's subject, or anyone (auth off), and their limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.auth.limits import NO_LIMITS, Limits

Kind = Literal["key", "jwt", "anonymous"]


@dataclass(frozen=True)
class Principal:
    name: str  # the key's name, the JWT's sub, or "anonymous"
    kind: Kind
    limits: Limits = NO_LIMITS

    @property
    def label(self) -> str:
        """The name as the metrics' `key` label and the ledger show it: a JWT subject cannot pose
        as the key of the same name."""
        return self.name if self.kind == "key" else f"{self.kind}:{self.name}"


ANONYMOUS = Principal("anonymous", "anonymous")
