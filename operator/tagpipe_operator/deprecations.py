"""The warning for a deprecated TagPipeline field: a `Deprecated` condition and an Event.

spec.map_deprecated() maps each deprecated field to its successor; this says so where a
user looks. Kubernetes has no per-field deprecation warning (a CRD version's
`deprecationWarning` covers the whole version, and 1.24 has no CEL rules), so the
warning is a status condition (kubectl get/describe, Argo CD) and a Warning Event,
posted once each time the set of deprecated fields changes, not every tick.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tagpipe_operator.spec import map_deprecated
from tagpipe_operator.status import transition

log = logging.getLogger(__name__)

CONDITION = "Deprecated"


def condition(spec: Mapping[str, Any], previous: list[dict[str, Any]], now: str) -> dict[str, Any]:
    """The Deprecated condition for `spec` (pure; keeps the transition time while the
    status stays the same)."""
    _, found = map_deprecated(spec)
    message = "; ".join(d.message for d in found) or "no deprecated fields"
    reason = "DeprecatedFields" if found else "NoDeprecatedFields"
    return transition(previous, CONDITION, bool(found), reason, message, now)


def is_news(new: dict[str, Any], previous: list[dict[str, Any]]) -> bool:
    """Whether the condition says something the last status did not (worth an Event)."""
    if new["status"] != "True":
        return False
    old = next((c for c in previous if c.get("type") == CONDITION), None)
    return old is None or (old.get("status"), old.get("message")) != ("True", new["message"])


async def report(
    client: Any, body: Mapping[str, Any], status: dict[str, Any], previous: dict[str, Any], now: str
) -> None:
    """Add the condition to this tick's `status`; post a Warning Event when it is news."""
    before: list[dict[str, Any]] = list(previous.get("conditions") or [])
    new = condition(body.get("spec") or {}, before, now)
    status["conditions"] = [
        *(c for c in status.get("conditions") or [] if c.get("type") != CONDITION),
        new,
    ]
    if is_news(new, before):
        try:  # best effort: the condition carries it anyway
            await client.post_event(dict(body), "Warning", CONDITION, new["message"])
        except Exception as exc:
            log.warning("could not post the Deprecated event: %s", exc)
