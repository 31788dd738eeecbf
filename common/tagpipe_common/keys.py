"""The Redis key layout. Nothing else in tagpipe spells a Redis key.

- `{p}:result:{item_id}`: the one result of an item (JSON), with a TTL. Written
  with SET NX, so the first result wins and a redelivery cannot change it.
- `{p}:job:{job_id}`: job hash (total, done, failed, cancelled, state, ...).
- `{p}:job:{job_id}:results`: a Redis Stream of result JSON; its entry ids are
  the resumable cursor of `GET /v1/jobs/{id}/results`.
- `{p}:job:{job_id}:items`, `...:lease`, `{p}:jobs:submitting`: a bulk job's
  items between upload and publication, so another gateway can resume it.
- `{p}:job:{job_id}:shard:{k}`, `...:staged`, `...:ready`, `...:shards`, `...:sink-lease`,
  `{p}:jobs:sinking`: a job with an output (results.py, the gateway's sink.py): results
  staged per shard until the sink writes the shard, then one entry per written shard.
- `{p}:job:{job_id}:urls`: which item first claimed each URL of a bulk job (`duplicate_url`).
- `{p}:idem:{principal}:{key}`: the job an `Idempotency-Key` already created.
- `{p}:blob:{item_id}`: uploaded image bytes waiting for the downloader.
- `{p}:deadline:{item_id}`: when an item's download attempts must be over (epoch s),
  kept across redeliveries (the downloader's deadline.py), with a TTL.
- `{p}:request:{request_id}`: a real-time request's item ids, with a TTL.
- `{p}:notify`: pub/sub channel; each message is a finished item's routing info.
- `{p}:pulse:{stage}:{worker}`, `{p}:pulse:{stage}`: a worker's last pulse (a hash with a
  TTL) and the stage's workers scored by their last beat (pulse.py).
- `{p}:jobs:recent`: the newest job ids scored by creation time (the live view's job list).
- `{p}:jobs:owner:{principal}`: a caller's job ids scored by creation time (`GET /v1/jobs`).
- `{p}:jobs:notify`: jobs whose completion webhook is not delivered yet, scored by
  when each is next due (the gateway's webhook.py).
- `{p}:tagcache:{model}:{sha256}`: the tags one model identity gave these exact bytes
  (tagcache.py), with a TTL: the content-addressed dedupe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "tagpipe"

    def result(self, item_id: str) -> str:
        return f"{self.prefix}:result:{item_id}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_results(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:results"

    def job_urls(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:urls"

    def job_items(self, job_id: str) -> str:
        """A bulk job's uploaded items (a Redis Stream of batches) until all are published."""
        return f"{self.prefix}:job:{job_id}:items"

    def job_shard(self, job_id: str, shard: int) -> str:
        """An output job's results of shard `shard` not yet written (hash seq -> line)."""
        return f"{self.prefix}:job:{job_id}:shard:{shard}"

    def job_staged(self, job_id: str) -> str:
        """An output job's shard numbers that have staged results (a set)."""
        return f"{self.prefix}:job:{job_id}:staged"

    def job_ready(self, job_id: str) -> str:
        """An output job's complete shards waiting for the sink (a set)."""
        return f"{self.prefix}:job:{job_id}:ready"

    def job_shards(self, job_id: str) -> str:
        """An output job's written shards: shard number -> JSON (name, lines, sha256, counts)."""
        return f"{self.prefix}:job:{job_id}:shards"

    def job_sink_lease(self, job_id: str) -> str:
        """Which gateway writes an output job's shards (a key with a short TTL)."""
        return f"{self.prefix}:job:{job_id}:sink-lease"

    @property
    def sinking_jobs(self) -> str:
        """Set of output job ids whose `_manifest.json` is not written yet."""
        return f"{self.prefix}:jobs:sinking"

    def job_lease(self, job_id: str) -> str:
        """Which gateway is publishing a job's items (a key with a short TTL)."""
        return f"{self.prefix}:job:{job_id}:lease"

    @property
    def submitting_jobs(self) -> str:
        """Set of job ids whose items are not all published: any gateway may resume them."""
        return f"{self.prefix}:jobs:submitting"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def blob(self, item_id: str) -> str:
        return f"{self.prefix}:blob:{item_id}"

    def fetch_deadline(self, item_id: str) -> str:
        """Epoch seconds by which all of an item's download attempts must end."""
        return f"{self.prefix}:deadline:{item_id}"

    def request(self, request_id: str) -> str:
        """A real-time request's item ids (JSON list), so its results can be fetched later."""
        return f"{self.prefix}:request:{request_id}"

    @property
    def notify_channel(self) -> str:
        return f"{self.prefix}:notify"

    def pulse(self, stage: str, worker: str) -> str:
        return f"{self.prefix}:pulse:{stage}:{worker}"

    def pulse_index(self, stage: str) -> str:
        return f"{self.prefix}:pulse:{stage}"

    @property
    def recent_jobs(self) -> str:
        return f"{self.prefix}:jobs:recent"

    def owner_jobs(self, principal: str) -> str:
        """A caller's job ids scored by creation time (`GET /v1/jobs`)."""
        return f"{self.prefix}:jobs:owner:{principal}"

    @property
    def notify_due(self) -> str:
        """Job ids with a webhook not yet delivered, scored by when each is next due."""
        return f"{self.prefix}:jobs:notify"

    def tag_cache(self, model: str, digest: str) -> str:
        """Tags of the bytes whose sha256 is `digest`, from the model `model` names
        (name, version and file checksum: tagcache.ModelIdentity.key)."""
        return f"{self.prefix}:tagcache:{model}:{digest}"


# Job hash fields, shared by the writer (Lua in results.py) and the readers.
JOB_TOTAL = "total"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_STATE = "state"
JOB_CREATED_AT = "created_at"
JOB_SUBMITTED = "submitted"
JOB_FINISHED_AT = "finished_at"  # when the last item settled, completed or cancelled
# Written and read by the gateway only.
JOB_OWNER = "owner"
JOB_OPTIONS = "options"
JOB_SUBMIT_CURSOR = "submit_cursor"
JOB_TAIL_CURSOR = "tail_cursor"  # a job handed back on SIGTERM: where its tail resumes
JOB_CANCELLED_AT = "cancelled_at"
JOB_MANIFEST_AT = "manifest_at"  # an output job: when its _manifest.json was written
# A manifest job (POST /v1/manifest-jobs): where its items and results live.
JOB_KIND = "kind"  # "manifest" for a manifest job; absent for an uploaded one
JOB_SOURCE = "source"  # s3:// or https:// URL of the manifest
JOB_OUTPUT = "output"  # s3:// prefix of the sharded results, ending with "/"
JOB_NOTIFY_URL = "notify_url"  # the webhook, if any
JOB_SHARD_SIZE = "shard_size"  # items per output shard
JOB_READ_SEQ = "read_seq"  # the manifest reader's checkpoint: next line's seq ...
JOB_READ_OFFSET = "read_offset"  # ... and its byte offset (uncompressed sources)
JOB_KIND_MANIFEST = "manifest"

# A job's completion webhook (the gateway's webhook.py): its state (pending,
# delivered, failed), attempts, last error, the event as first sent, and when.
JOB_NOTIFY_STATE = "notify_state"
JOB_NOTIFY_ATTEMPTS = "notify_attempts"
JOB_NOTIFY_ERROR = "notify_error"
JOB_NOTIFY_BODY = "notify_body"
JOB_NOTIFY_SINCE = "notify_since"  # the first attempt: retries end webhook_give_up_s after
JOB_NOTIFY_DELIVERED_AT = "notify_delivered_at"
JOB_NOTIFY_FAILED_AT = "notify_failed_at"

JOB_STATE_SUBMITTING = "submitting"
JOB_STATE_RUNNING = "running"
JOB_STATE_COMPLETED = "completed"
JOB_STATE_CANCELLED = "cancelled"
