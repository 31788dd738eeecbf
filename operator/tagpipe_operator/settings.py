"""Operator settings (TAGPIPE_ prefix), built once in `main()` and passed down."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator
from tagpipe_common.settings import CommonSettings


class OperatorSettings(CommonSettings):
    scale_interval_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    """How often each TagPipeline's backlog is read and scaling decided."""
    nats_timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    """Bound on one NATS connect or backlog read; beyond it the metric counts as stale."""
    converge_retry_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """Delay before kopf retries a failed converge (TemporaryError)."""
    stream_delete_retries: Annotated[int, Field(ge=0, le=100)] = 5
    """Attempts to delete streams (deletionPolicy Delete) before giving up with an event."""
    stream_delete_retry_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    namespace: str | None = None
    """Watch one namespace only; unset watches all (cluster-wide)."""
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    """kopf's liveness endpoint (/healthz); 0 disables it."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9090
    lease_name: str = "tagpipe-operator"
    """The coordination.k8s.io Lease the replicas elect a leader through (POD_NAMESPACE)."""
    lease_duration_s: Annotated[int, Field(ge=2, le=300)] = 12
    """A standby takes over a Lease unchanged this long: the failover bound, roughly."""
    lease_renew_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """How often the leader renews, and a standby looks."""
    lease_renew_deadline_s: Annotated[float, Field(gt=0, le=300)] = 8.0
    """The leader stops leading when it could not renew for this long (< the duration)."""

    @model_validator(mode="after")
    def _lease_timings_in_order(self) -> OperatorSettings:
        # A leader must stop before a standby may take over, and renew more than once.
        renew, deadline, duration = (
            self.lease_renew_s,
            self.lease_renew_deadline_s,
            self.lease_duration_s,
        )
        if not renew < deadline < duration:
            raise ValueError(
                f"lease timings must be renew ({renew:g} s) < renew deadline ({deadline:g} s) "
                f"< duration ({duration} s): TAGPIPE_LEASE_RENEW_S, "
                "TAGPIPE_LEASE_RENEW_DEADLINE_S, TAGPIPE_LEASE_DURATION_S"
            )
        return self
