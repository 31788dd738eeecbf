"""Request and response bodies of the public API (with OpenAPI examples)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tagpipe_common.messages import StageTimings, Tag, TagResult, TaskOptions

CAT_URL = "https://images.example.com/cat.jpg"
ItemStatus = Literal["ok", "error", "pending"]
JobState = Literal["submitting", "running", "completed", "cancelled"]


class TagRequest(BaseModel):
    """One URL or several; `url` and `urls` may not both be empty."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"url": CAT_URL},
                {"urls": [CAT_URL, "https://images.example.com/coffee.png"], "top_k": 3},
            ]
        },
    )

    url: Annotated[str, Field(min_length=1)] | None = None
    urls: list[Annotated[str, Field(min_length=1)]] | None = None
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    def located_urls(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every URL with the body field it came from (for 422s that name it)."""
        located: list[tuple[tuple[str | int, ...], str]] = []
        if self.url is not None:
            located.append((("body", "url"), self.url))
        located += [(("body", "urls", i), u) for i, u in enumerate(self.urls or [])]
        return located

    def options(self) -> TaskOptions:
        return TaskOptions(top_k=self.top_k, min_score=self.min_score)


class TagUpload(BaseModel):
    """`POST /v1/tags` as multipart/form-data: one `file` part per image."""

    file: bytes = Field(description="The image (repeat the part for several)")


class ItemResult(BaseModel):
    """One item's outcome; `pending` only from GET /v1/results before it finished."""

    index: int
    item_id: str
    source: str | None = None
    status: ItemStatus
    code: str | None = None
    message: str | None = None
    tags: list[Tag] = Field(default_factory=list)
    model: str | None = None
    model_version: str | None = None
    timings: StageTimings | None = None
    cached: bool = Field(
        False,
        description="The tags `model_version` gave byte-identical content lately, "
        "served from the content cache without inference (TAGPIPE_CONTENT_DEDUPE)",
    )

    @classmethod
    def of(cls, index: int, item_id: str, source: str, result: TagResult | None) -> ItemResult:
        if result is None:
            return cls(index=index, item_id=item_id, source=source, status="pending")
        return cls(
            index=index,
            item_id=item_id,
            source=result.source or source,
            status=result.status,
            code=result.code,
            message=result.message,
            tags=result.tags,
            model=result.model,
            model_version=result.model_version,
            timings=result.timings,
            cached=result.cached,
        )


_TAGS_EXAMPLE: dict[str, Any] = {
    "request_id": "3f1c9a0e5b7d4e21a1b2c3d4e5f60718",
    "complete": True,
    "items": [
        {
            "index": 0,
            "item_id": "3f1c9a0e5b7d4e21a1b2c3d4e5f60718-0",
            "source": CAT_URL,
            "status": "ok",
            "tags": [
                {"label": "Egyptian cat", "score": 0.61, "class_id": 285},
                {"label": "tabby", "score": 0.21, "class_id": 281},
            ],
            "model": "efficientnet-lite0",
        }
    ],
}


class TagResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_TAGS_EXAMPLE]})

    request_id: str
    complete: bool
    items: list[ItemResult]


class JobItem(BaseModel):
    """One line of a bulk job: a URL and an optional client item id."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1)]
    id: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class ManifestJobRequest(BaseModel):
    """`POST /v1/manifest-jobs`: a job whose items are the lines of an object in storage."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "source": "s3://catalog/2026-12/urls.jsonl.gz",
                    "output": "s3://catalog-tags/2026-12/",
                    "notify_url": "https://hooks.example.com/tagpipe",
                }
            ]
        },
    )

    source: Annotated[
        str, Field(pattern=r"^(s3://[^/?#]+/[^?#]+|https://\S+)$", max_length=4096)
    ] = Field(description="The manifest: `s3://bucket/key` or an `https://` URL")
    output: Annotated[str, Field(pattern=r"^s3://[^/?#]+(/[^?#]*)?$", max_length=1024)] = Field(
        description="Where the results go: an `s3://bucket/prefix/` the gateway may write"
    )
    notify_url: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="Called once the job ends (see JobEvent)"
    )

    @property
    def output_prefix(self) -> str:
        """The output, ending with "/": the shards' common prefix."""
        return self.output if self.output.endswith("/") else self.output + "/"


class JobUpload(BaseModel):
    """`POST /v1/jobs` as multipart/form-data: the item list as an NDJSON `file`."""

    file: bytes = Field(description="NDJSON: one `JobItem`, JSON string or bare URL per line")


class JobResultLine(TagResult):
    """One line of `GET /v1/jobs/{job_id}/results`: an item's result and its cursor."""

    cursor: str = Field(description="Pass as `cursor` to resume after this line")


class JobResultsPage(BaseModel):
    """A page of a job's results, for clients that cannot read an NDJSON stream."""

    results: list[JobResultLine]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null when nothing has been read yet"
    )
    state: JobState = Field(description="The job's state when the page was read")
    over: bool = Field(description="The job is over and this page holds its last results")


class JobCreated(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "j-9b2f0c1d2e3f4a5b",
                    "state": "submitting",
                    "total": 1000000,
                    "status_url": "/v1/jobs/j-9b2f0c1d2e3f4a5b",
                    "results_url": "/v1/jobs/j-9b2f0c1d2e3f4a5b/results",
                    "reused": False,
                }
            ]
        }
    )

    job_id: str
    state: JobState
    total: int | None
    status_url: str
    results_url: str
    reused: bool = Field(False, description="True when an Idempotency-Key matched an earlier job")


class JobNotify(BaseModel):
    """The completion webhook of a job submitted with a `notify_url`."""

    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        description="`pending` until a delivery got a 2xx answer (`delivered`) or retries "
        "ran out (`failed`, after TAGPIPE_WEBHOOK_GIVE_UP_S)"
    )
    attempts: int = Field(description="Deliveries tried so far")
    last_error: str | None = Field(None, description="Why the last failed attempt failed")
    delivered_at: float | None = None


class JobStatus(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "j-9b2f0c1d2e3f4a5b",
                    "state": "running",
                    "total": 500,
                    "submitted": 500,
                    "done": 310,
                    "failed": 12,
                    "cancelled": 0,
                    "finished": 322,
                    "rate_per_s": 41.5,
                    "eta_s": 4.3,
                    "created_at": 1764072000.0,
                }
            ]
        }
    )

    job_id: str
    state: JobState
    total: int | None = Field(description="Number of items; known once the upload is read")
    submitted: int = Field(description="Items published to the work queue so far")
    done: int
    failed: int
    cancelled: int
    finished: int
    rate_per_s: float | None = Field(description="Finished items per second since creation")
    eta_s: float | None = Field(description="Seconds left at the current rate")
    created_at: float
    finished_at: float | None = Field(
        None, description="When the job ended: its last item settled, or it was cancelled"
    )
    notify: JobNotify | None = Field(None, description="The webhook, for a job with a notify_url")


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobStatus]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page"
    )


class JobEvent(BaseModel):
    """The body of a completion webhook (POST to the job's `notify_url`).

    Sent at least once: a receiver that answers 2xx late, or not at all, may get the
    same event again. Dedupe on `event_id` (also the `Tagpipe-Event-Id` header). Verify
    `Tagpipe-Signature: t=<unix>,v1=<hex>`: hex is HMAC-SHA256 of `<t>.<raw body>` with
    the gateway's webhook secret; refuse a `t` far from now (replays).
    """

    event_id: str = Field(description="Stable per job end: the same on every retry")
    type: Literal["job.completed", "job.cancelled"]
    job: JobStatus = Field(description="The job's status when it ended")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
