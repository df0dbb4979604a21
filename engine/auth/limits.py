"""What a principal may use: requests and tokens per minute, concurrent streams, a token budget per
period. ``None`` is "no limit". Values come from hostile places (a CLI flag, a JWT claim, a database
row), so each is checked here, once, with a message naming it."""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_LIMIT = 10**15  # far above any real use; keeps every value an exact SQLite INTEGER and float
DAY_S = 86_400
MAX_BUDGET_PERIOD_S = 366 * DAY_S  # the ledger keeps this much history (engine/auth/keystore.py)


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None  # requests admitted per minute (sliding 60 s window)
    tpm: int | None = None  # tokens delivered per minute (sliding 60 s window)
    max_streams: int | None = None  # streams open at once
    budget_tokens: int | None = None  # prompt + completion tokens per budget period (from the ledger)
    budget_period_s: int = 30 * DAY_S  # the budget's window: the last this many seconds

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "budget_period_s":
                continue
            if type(value) is not int:  # bool is an int subclass: refused too
                raise ValueError(f"{f.name}: must be an integer (got {type(value).__name__})")
            if not 1 <= value <= MAX_LIMIT:
                raise ValueError(f"{f.name}: must be 1..{MAX_LIMIT} (got {value}); leave it out for no limit")
        if not 60 <= self.budget_period_s <= MAX_BUDGET_PERIOD_S:
            raise ValueError(f"budget_period_s: must be 60..{MAX_BUDGET_PERIOD_S} (got {self.budget_period_s})")

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_streams is None and self.budget_tokens is None

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


NO_LIMITS = Limits()
