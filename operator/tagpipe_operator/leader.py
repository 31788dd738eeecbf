"""Leader election through a coordination.k8s.io/v1 Lease, as client-go does it.

Only the holder runs kopf and the scaling loop (see `__main__`); a standby
only reads the Lease. Expiry is judged on the standby's own clock: a record
that has not changed for `leaseDurationSeconds` since this process first saw
it is expired, so clocks that disagree between nodes do not matter. Taking
over and renewing are updates carrying the resourceVersion read, so two
candidates racing for one expired Lease cannot both win (the loser gets 409).

The holder renews every `renew_s`; if it cannot renew for `renew_deadline_s`
(less than the duration) it stops leading before anyone else may start.
A graceful stop releases the Lease (empty holder), so a rolling update hands
over at once instead of waiting out the duration. Writes are merge patches that
carry `metadata.resourceVersion`, which the API server checks like an update's.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

from tagpipe_operator.kube import KubeClient, describe_api, status_code

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(t: datetime.datetime) -> str:
    """A MicroTime as the API writes it."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    kube: KubeClient
    namespace: str
    name: str
    identity: str
    duration_s: int = 12
    renew_s: float = 2.0
    renew_deadline_s: float = 8.0
    leading: bool = False
    stopped: bool = False
    """Set by release(): no attempt after it (a renewal would take the Lease back)."""
    _seen: tuple[Any, float] | None = field(default=None, repr=False)
    """(the record last read, monotonic time it was first seen unchanged)."""

    async def acquire(self) -> None:
        """Return once this process holds the Lease; retries every `renew_s`."""
        while True:
            if await self._try():
                break
            await asyncio.sleep(self.renew_s)
        log.info("leader election: %s holds %s/%s", self.identity, self.namespace, self.name)

    async def hold(self, lost: asyncio.Event) -> None:
        """While leading: renew; set `lost` once renewal failed past the deadline."""
        last_ok = time.monotonic()
        while self.leading:
            await asyncio.sleep(self.renew_s)
            if await self._renew_by(last_ok + self.renew_deadline_s):
                last_ok = time.monotonic()
            elif self.stopped:
                return  # released on purpose: not a loss
            elif time.monotonic() - last_ok > self.renew_deadline_s or not self.leading:
                self.leading = False
                log.error("leader election: lost %s/%s", self.namespace, self.name)
                lost.set()
                return

    async def _renew_by(self, deadline: float) -> bool:
        """One renewal, given up at `deadline` (monotonic): a hung API call must not keep
        this process leading past the renew deadline, when a standby may take over
        (client-go bounds each renewal the same way)."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                return await self._try()
        except TimeoutError:
            log.warning("leader election: renewal of %s timed out", self.name)
            return False

    async def release(self) -> None:
        """Hand the Lease over now (empty holder); best effort, the duration covers a miss."""
        self.stopped = True
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.kube.api.get(Lease, self.name, namespace=self.namespace)
            if lease.spec and lease.spec.holderIdentity == self.identity:
                await self._write(lease, {"holderIdentity": None, "leaseDurationSeconds": 1})
                log.info("leader election: %s released %s", self.identity, self.name)
        except Exception as exc:
            log.warning("leader election: release failed: %s", describe_api(exc))

    async def _try(self) -> bool:
        """One acquire-or-renew attempt; errors (403, 429, 5xx) count as 'not now'."""
        if self.stopped:
            self.leading = False
            return False
        try:
            self.leading = await self._attempt()
        except Exception as exc:
            log.warning("leader election: %s", describe_api(exc))
            if self.leading and status_code(exc) == 409:
                self.leading = False  # someone else wrote the record: we are not leading
            return False
        return self.leading

    async def _attempt(self) -> bool:
        api = self.kube.api
        try:
            lease = await api.get(Lease, self.name, namespace=self.namespace)
        except Exception as exc:
            if status_code(exc) != 404:
                raise
            await api.create(self._new_lease())
            return True
        spec = lease.spec or LeaseSpec()
        record = (spec.holderIdentity, spec.renewTime, spec.leaseTransitions)
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, time.monotonic())
        held_by_other = spec.holderIdentity not in (None, "", self.identity)
        duration = spec.leaseDurationSeconds or self.duration_s
        if held_by_other and time.monotonic() - self._seen[1] < duration:
            return False
        now = _micro(_now())
        change: dict[str, Any] = {
            "holderIdentity": self.identity,
            "renewTime": now,
            "leaseDurationSeconds": self.duration_s,
        }
        if spec.holderIdentity != self.identity:
            change.update(leaseTransitions=(spec.leaseTransitions or 0) + 1, acquireTime=now)
        await self._write(lease, change)
        return True

    async def _write(self, lease: Lease, spec: dict[str, Any]) -> None:
        """A merge patch carrying the resourceVersion read: a race is a 409."""
        rv = lease.metadata.resourceVersion if lease.metadata else None
        body = {"metadata": {"resourceVersion": rv}, "spec": spec}
        await self.kube.api.patch(
            Lease, self.name, body, namespace=self.namespace, patch_type=PatchType.MERGE
        )

    def _new_lease(self) -> Lease:
        now = _now()
        return Lease(
            metadata=ObjectMeta(name=self.name, namespace=self.namespace),
            spec=LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=self.duration_s,
                acquireTime=now,
                renewTime=now,
                leaseTransitions=0,
            ),
        )
