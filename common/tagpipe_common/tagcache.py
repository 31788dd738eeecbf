"""The content-addressed tag cache: the dedupe of byte-identical images.

Photo libraries hold many identical files under different URLs. The inference
tier, after storing an item's result, remembers its tags under the sha256 of
the downloaded bytes and its OWN loaded model's identity; the downloader looks
the bytes up under the identity of the model it prepares crops for (its
manifest) and, on a hit, writes the item's result itself, `cached: true`,
through the same exactly-once result script, with no decode and no inference.

Safety: an entry answers only the same bytes (sha256) for the same model name,
version AND model file checksum, within the TTL. During a rollout where two
versions serve at once, a downloader configured for version A only reads A's
entries, which only workers that loaded A wrote: a cached result always carries
the tags its `model_version` computed, never another version's (it may be the
old version's, labelled as such, like any item an old replica served).

Tags are stored unfiltered by `min_score` and `top_k` deep, so an entry answers
any item asking for at most that many tags, with any `min_score` (filtering the
best-first list gives what `Model.top_k` would).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from tagpipe_common.keys import RedisKeys
from tagpipe_common.manifest import ModelManifest
from tagpipe_common.messages import Tag, TaskOptions


def content_digest(data: bytes) -> str:
    """The cache's content address: sha256 of the bytes exactly as downloaded."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What must match for cached tags to be the tags this model would give."""

    name: str
    version: str
    file_sha256: str

    @classmethod
    def of(cls, manifest: ModelManifest) -> ModelIdentity:
        return cls(manifest.name, manifest.version, manifest.sha256)

    @property
    def key(self) -> str:
        # The file checksum too: a model rebuilt without a version bump gets new entries.
        return f"{self.name}:{self.version}:{self.file_sha256[:16]}"


class CachedTags(BaseModel):
    """One entry: the best `top_k` tags of some bytes, best first, any score."""

    model_config = ConfigDict(extra="ignore")

    model: str
    model_version: str
    top_k: int
    tags: list[Tag]

    def answer(self, options: TaskOptions) -> list[Tag] | None:
        """The tags for an item with these options, or None if the entry is too shallow."""
        if options.top_k > self.top_k:
            return None
        return [t for t in self.tags[: options.top_k] if t.score >= options.min_score]


@dataclass(frozen=True)
class CacheEntry:
    digest: str
    top_k: int
    tags: list[Tag]  # best first, not filtered by min_score


@dataclass
class TagCache:
    redis: Redis
    keys: RedisKeys
    identity: ModelIdentity
    ttl_s: int = 86400

    def _key(self, digest: str) -> str:
        return self.keys.tag_cache(self.identity.key, digest)

    async def get(self, digest: str) -> CachedTags | None:
        raw = await self.redis.get(self._key(digest))
        if raw is None:
            return None
        try:
            entry = CachedTags.model_validate_json(raw)
        except ValidationError:
            return None  # unreadable (a future format): a miss, never a wrong answer
        ident = self.identity
        if (entry.model, entry.model_version) != (ident.name, ident.version):
            return None
        return entry

    async def put_many(self, entries: Sequence[CacheEntry]) -> None:
        """Remember a batch's tags in one round trip. The last writer wins: every
        writer under this key ran the same model on the same bytes."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in entries:
                value = CachedTags(
                    model=self.identity.name,
                    model_version=self.identity.version,
                    top_k=e.top_k,
                    tags=e.tags,
                )
                pipe.set(self._key(e.digest), value.model_dump_json(), ex=self.ttl_s)
            await pipe.execute()
