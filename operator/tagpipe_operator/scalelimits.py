"""HPA-style scale policies: how far one decision may move a stage's replicas.

This is the Kubernetes HPA's `behavior.scaleUp/scaleDown` rule set, kept pure so
`decide()` (and through it `tagpipe simulate`) can apply it:

- a policy allows a change of `value` pods, or of `value` percent, per
  `period_s`, measured from the replica count at the start of that period
  (the count now, less what this direction already changed inside the period);
- `select` picks between the policies: `Max` allows the largest change, `Min`
  the smallest, `Disabled` none in that direction.

A fixed step of a few pods cannot follow a tier of hundreds (130 -> 400 took
30 minutes of 4-pod steps); 100 % per period doubles it in each. The HPA's own
defaults are the defaults here: up, the larger of 4 pods or 100 % per 15 s;
down, 100 % per 15 s (the scale-down stabilisation window is what slows it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class PolicyType(StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


class Select(StrEnum):
    MAX = "Max"
    MIN = "Min"
    DISABLED = "Disabled"


@dataclass(frozen=True)
class RatePolicy:
    """One HPA scaling policy: `value` pods or percent per `period_s`."""

    type: PolicyType
    value: int
    period_s: float = 15.0


@dataclass(frozen=True)
class ScaleRules:
    """One direction's policies and how to choose among them."""

    policies: tuple[RatePolicy, ...]
    select: Select = Select.MAX

    @property
    def longest_period_s(self) -> float:
        return max((p.period_s for p in self.policies), default=0.0)


DEFAULT_SCALE_UP = ScaleRules(
    (RatePolicy(PolicyType.PODS, 4, 15.0), RatePolicy(PolicyType.PERCENT, 100, 15.0))
)
DEFAULT_SCALE_DOWN = ScaleRules((RatePolicy(PolicyType.PERCENT, 100, 15.0),))


@dataclass(frozen=True)
class ScaleEvent:
    at: float
    change: int
    """Replicas added (> 0) or removed (< 0) by one decision."""


def changed_within(events: tuple[ScaleEvent, ...], now: float, period_s: float, up: bool) -> int:
    """Replicas this direction changed strictly inside (now - period, now], as a count.

    Strictly after the cutoff, as the HPA counts: a decision exactly one period
    ago no longer limits this one, so a period equal to the tick allows a full
    policy's worth every tick.
    """
    cutoff = now - period_s
    return sum(
        abs(e.change) for e in events if e.at > cutoff and (e.change > 0 if up else e.change < 0)
    )


def up_limit(
    rules: ScaleRules, events: tuple[ScaleEvent, ...], now: float, current: int, counted: int
) -> int:
    """Most replicas a scale-up may reach from `current`.

    A period starts from `current` less what this period already added, as the
    HPA's does, but never from more than `counted`: the pods the caller can count
    on (the ready ones), so pods stuck Pending are no base for more.
    """
    if rules.select is Select.DISABLED or not rules.policies:
        return current
    proposals = []
    for p in rules.policies:
        start = min(current - changed_within(events, now, p.period_s, up=True), counted)
        if p.type is PolicyType.PODS:
            proposals.append(start + p.value)
        else:
            proposals.append(math.ceil(start * (1 + p.value / 100)))
    return max(proposals) if rules.select is Select.MAX else min(proposals)


def down_limit(rules: ScaleRules, events: tuple[ScaleEvent, ...], now: float, current: int) -> int:
    """Fewest replicas a scale-down may reach from `current`."""
    if rules.select is Select.DISABLED or not rules.policies:
        return current
    proposals = []
    for p in rules.policies:
        start = current + changed_within(events, now, p.period_s, up=False)
        if p.type is PolicyType.PODS:
            proposals.append(start - p.value)
        else:
            # Truncated, as the HPA does: a percentage never removes a fraction up.
            proposals.append(int(start * (1 - p.value / 100)))
    # Max allows the largest change, which for a scale-down is the lowest count.
    return min(proposals) if rules.select is Select.MAX else max(proposals)


def parse_rules(text: str, select: str = "Max") -> ScaleRules:
    """`Pods:4:15,Percent:100:15` (type:value:period_s) -> ScaleRules; for CLI flags."""
    policies = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, value, *period = item.split(":")
        policies.append(
            RatePolicy(PolicyType(kind), int(value), float(period[0]) if period else 15.0)
        )
    return ScaleRules(tuple(policies), Select(select))
