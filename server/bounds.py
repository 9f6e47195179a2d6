"""A numeric range a value must lie in, stated once for the flag or request field it bounds: the check, its
message, and the pydantic ``Field`` limits that put the same range in the OpenAPI schema."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _number(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else str(x)


@dataclass(frozen=True)
class Bound:
    """Above ``low`` (or at it when ``inclusive``) and, if given, at most ``high``. NaN is never in range."""

    low: float
    inclusive: bool = True
    high: float | None = None

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.inclusive else value > self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        """``>= 0``, ``> 0``, ``in [-2, 2]``, ``in (0, 1]``."""
        if self.high is None:
            return f"{'>=' if self.inclusive else '>'} {_number(self.low)}"
        return f"in {'[' if self.inclusive else '('}{_number(self.low)}, {_number(self.high)}]"

    def field_limits(self) -> dict[str, float]:
        """The same range as pydantic ``Field`` keyword arguments (ge/gt, le)."""
        limits = {"ge" if self.inclusive else "gt": self.low}
        if self.high is not None:
            limits["le"] = self.high
        return limits
