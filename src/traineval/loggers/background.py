"""A logger on a thread of its own: training never waits on a tracking server.

A remote service (an MLflow tracking server) can be slow or unreachable: its client retries
with back-off for minutes. `BackgroundLogger` builds the logger and makes every call on a
worker thread, in order; the training thread only puts records on a bounded queue. A logger
that fails to start or fails later is reported once and training goes on; `close()` waits at
most `close_timeout` seconds for the queue to drain, then says what was left unsent.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


class BackgroundLogger:
    """Run `factory()`'s logger on a worker thread named after `name`."""

    close_timeout = 30.0  # seconds close() waits for the last records
    queue_size = 100_000  # records held while the service is slow; more are dropped

    def __init__(self, factory: Callable[[], Any], name: str) -> None:
        self.name = name
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue(self.queue_size)
        self._dead = threading.Event()  # the logger could not start, or closed
        self._dropped = 0
        self._thread = threading.Thread(
            target=self._work, args=(factory,), name=f"traineval-{name}", daemon=True
        )
        self._thread.start()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._put("log", dict(metrics), step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._put("log_config", dict(config))

    def close(self) -> None:
        self._put("close")
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            logger.warning(
                "%s did not finish within %.0f s (is its server reachable?); %d record(s) "
                "were not sent; metrics.jsonl has them all",
                self.name,
                self.close_timeout,
                self._queue.qsize(),
            )
        if self._dropped:
            logger.warning("%s fell behind: %d record(s) were dropped", self.name, self._dropped)

    def _put(self, method: str, *args: Any) -> None:
        if self._dead.is_set():
            return
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            self._dropped += 1

    def _work(self, factory: Callable[[], Any]) -> None:
        try:
            target = factory()
        except Exception as error:  # a service that is down must not stop training
            logger.warning(
                "%s could not start (%s: %s); logging to metrics.jsonl only",
                self.name,
                type(error).__name__,
                error,
            )
            self._dead.set()
            return
        failures = 0
        while True:
            method, args = self._queue.get()
            try:
                getattr(target, method)(*args)
            except Exception as error:  # a logger must never stop training
                failures += 1
                if failures == 1:
                    logger.warning(
                        "%s.%s failed (%s: %s); training goes on, further failures are "
                        "counted silently",
                        self.name,
                        method,
                        type(error).__name__,
                        error,
                    )
            if method == "close":
                self._dead.set()
                return
