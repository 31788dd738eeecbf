"""SIGTERM (a scale-down or a rollout): what the gateway finishes and what it hands over.

uvicorn, on SIGTERM, stops accepting connections and waits up to its graceful timeout for
the requests in progress; only then does the app's lifespan end. So:

* an upload in progress is finished: its request is in progress, uvicorn waits for it;
* a `/results?follow=` stream is handed over: it would otherwise be cut mid-line when the
  timeout passes, so on drain it ends at a line boundary, cleanly, and the client resumes
  from its last cursor at another gateway (as it does when `follow` runs out);
* a job the gateway is tailing is handed over in JobManager.close(): it goes back to the
  submitting set, where another gateway's recovery scan picks it up and tails it.

`Drain` is the flag, set from uvicorn's signal handler before uvicorn starts waiting;
`DrainingServer` is the uvicorn Server that sets it.
"""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn


class Drain:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the app runs on (the lifespan's), so a signal can wake it safely."""
        self._loop = loop

    def begin(self) -> None:
        """Safe from a signal handler: the event is set on its own loop's next turn."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.event.set)
        else:
            self.event.set()

    @property
    def draining(self) -> bool:
        return self.event.is_set()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)
