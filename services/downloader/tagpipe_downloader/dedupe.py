"""Content-addressed dedupe on the download side (see tagpipe_common.tagcache).

After the bytes are in hand, their sha256 is looked up under the identity of
the model this downloader prepares crops for (its manifest). A hit becomes the
item's result right here, `cached: true`, written by the worker through the
same exactly-once result script as any other; a miss carries the digest on to
inference, which remembers the tags once it has stored the result.

Without a manifest the downloader does not know which model it serves, so the
dedupe stays off (logged once at start-up) rather than guess.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from tagpipe_common.keys import RedisKeys
from tagpipe_common.manifest import MANIFEST_FILE, ModelManifest
from tagpipe_common.messages import DownloadTask, StageTimings, TagResult
from tagpipe_common.tagcache import ModelIdentity, TagCache, content_digest

from tagpipe_downloader import metrics
from tagpipe_downloader.settings import DownloaderSettings

log = logging.getLogger("tagpipe.downloader")

# Bigger bodies are hashed off the event loop (hashlib releases the GIL):
# a 20 MB photo takes ~30 ms to hash, too long to stall every other item.
_HASH_INLINE_MAX = 256 * 1024


@dataclass(frozen=True)
class Seen:
    """What the cache said about one item's bytes."""

    digest: str | None  # None: dedupe off; else carried to inference on a miss
    result: TagResult | None = None  # a hit: the item's finished result


class Dedupe:
    def __init__(self, cache: TagCache | None) -> None:
        self.cache = cache

    @classmethod
    def from_settings(cls, s: DownloaderSettings, redis: Redis, keys: RedisKeys) -> Dedupe:
        if not s.content_dedupe:
            return cls(None)
        path = s.manifest_path or s.model_dir
        if path is None:
            log.warning("content dedupe is on but no model manifest is set: dedupe stays off")
            return cls(None)
        model_dir = path.parent if path.name == MANIFEST_FILE else path
        identity = ModelIdentity.of(ModelManifest.load(model_dir))
        return cls(TagCache(redis, keys, identity, s.content_dedupe_ttl_s))

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    async def lookup(self, task: DownloadTask, data: bytes, timings: StageTimings) -> Seen:
        """The cached result for these bytes, or the digest to send on. Redis errors
        propagate: the worker retries them like any other Redis call."""
        if self.cache is None:
            return Seen(None)
        if len(data) > _HASH_INLINE_MAX:
            digest = await asyncio.to_thread(content_digest, data)
        else:
            digest = content_digest(data)
        entry = await self.cache.get(digest)
        tags = None if entry is None else entry.answer(task.options)
        if entry is None or tags is None:
            metrics.DEDUPE.labels("miss").inc()
            return Seen(digest)
        metrics.DEDUPE.labels("hit").inc()
        result = TagResult(
            **task.ref(),
            status="ok",
            tags=tags,
            model=entry.model,
            model_version=entry.model_version,
            source=task.source,
            timings=timings,
            cached=True,
        )
        return Seen(digest, result)
