"""The MLflow callback's writer: its hooks run off Tune's event loop, in order per trial, coalesced.

Tune calls a callback's hooks in its one event loop: a hook that waits on the tracking store
(tens of milliseconds per request on the embedded sqlite store, more on a server) holds up every
trial's next result. :class:`TrackingWriter` takes each hook with its arguments and returns at once;
worker threads run them. What it keeps:

- **order per trial**: a trial's hooks always go to the same worker (a shard of the trials), which
  runs them in the order they came. One worker on a file-based store (``sqlite``: one writer, no
  "database is locked"), ``CXR_TRACKING_WRITERS`` (default 4) on a tracking server.
- **coalescing**: the results one trial reported while its worker was busy become one hook call
  (``_trial_results`` with the list), so the callback logs them in one request. A worker that
  falls behind catches up: the more results wait, the fewer requests they take.
- **an unreachable store** (:func:`store_unreachable`): the hook is queued with everything after it
  on that worker and replayed in order once the store answers (retried every ``RETRY_S``), as the
  callback did in Tune's thread before.
- **a hook's own error** (a bug, a bad request) is raised again in Tune's thread, at the next hook or
  at :meth:`TrackingWriter.drain`: the sweep fails with it as it did when the hook ran there.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["RETRY_S", "TrackingWriter", "coalesce", "store_unreachable", "writers_for"]

RETRY_S = 2.0  # how often a worker retries the store while updates queue
Item = tuple[str, Any, tuple]  # (hook name, trial, args)


def store_unreachable(e: Exception) -> bool:
    """Connection-level failures of the tracking store (retry later), not bad requests (raise)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, requests.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(e, MlflowException):
        text = str(e)
        return "API request to" in text or "Max retries" in text or e.get_http_status_code() >= 500
    return type(e).__name__ == "OperationalError"  # sqlalchemy: the database is gone or locked


def writers_for(tracking_uri: str) -> int:
    """Worker threads for a store: ``CXR_TRACKING_WRITERS`` (default 4) for a server, at most one for
    a local file (sqlite takes one writer); 0 runs every hook in Tune's thread, uncoalesced."""
    server = tracking_uri.startswith(("http://", "https://", "databricks"))
    n = max(0, int(os.environ.get("CXR_TRACKING_WRITERS", "4" if server else "1")))
    return n if server else min(n, 1)


def coalesce(items: list[Item]) -> list[Item]:
    """``items`` in order, each trial's consecutive ``_trial_result`` calls (with no other hook of that
    trial between them) merged into one ``_trial_results`` call with the list of results."""
    out: list[Item] = []
    open_group: dict[str, int] = {}  # trial id → index in out of its results so far
    for name, trial, args in items:
        tid = getattr(trial, "trial_id", trial)
        if name == "_trial_result":
            if tid in open_group:
                out[open_group[tid]][2][0].append(args[0])
                continue
            open_group[tid] = len(out)
            out.append(("_trial_results", trial, ([args[0]],)))
        else:
            open_group.pop(tid, None)
            out.append((name, trial, args))
    return out


class _Shard:
    """One worker: the hooks it was given, and those queued while the store was unreachable."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.pending: list[Item] = []
        self.busy = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None


class TrackingWriter:
    """Runs ``run(name, trial, args)`` for every submitted hook on ``workers`` threads (see the module).

    ``forget(trial)``: called when a hook of ``trial`` met an unreachable store (its request may have
    landed before the connection broke: the replay must re-read what is stored)."""

    def __init__(self, run: Callable[[str, Any, tuple], None], workers: int, forget: Callable[[Any], None]):
        self.run, self.forget = run, forget
        self.synchronous = workers == 0  # every hook in the caller's thread, as it comes
        self.shards = [_Shard() for _ in range(max(1, workers))]
        self.error: BaseException | None = None
        self._error_raised = False
        self.unreachable_since: float | None = None
        self.closed = False
        self._lock = threading.Lock()

    # -- Tune's thread ----------------------------------------------------------------------------------
    def submit(self, name: str, trial, *args) -> None:
        self.raise_error()
        tid = str(getattr(trial, "trial_id", trial))
        shard = self.shards[zlib.crc32(tid.encode()) % len(self.shards)]
        if self.synchronous:
            self._process(shard, [(name, trial, args)])
            return
        with shard.cond:
            shard.items.append((name, trial, args))
            if shard.thread is None:
                shard.thread = threading.Thread(
                    target=self._work, args=(shard,), name="cxr-mlflow-writer", daemon=True
                )
                shard.thread.start()
            shard.cond.notify()

    def raise_error(self) -> None:
        """A hook's own error (not an unreachable store), in the caller's thread, once: raised again
        while Tune handles it (its clean-up ends the experiment), it would rewrite its own context."""
        if self.error is not None and not self._error_raised:
            self._error_raised = True
            raise self.error

    def drain(self, grace_s: float, *, raise_error: bool = True) -> list[Item]:
        """Wait until every submitted hook ran, or (the store unreachable) up to ``grace_s`` for the
        queued ones; return those still queued then. Raises a hook's own error (``raise_error``; a
        driver already failing with it must not raise it again: that would rewrite its context)."""
        deadline = time.monotonic() + grace_s
        if self.synchronous:
            shard = self.shards[0]
            while shard.pending and time.monotonic() < deadline:
                time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
                self._flush(shard)
            return list(shard.pending)
        for shard in self.shards:
            with shard.cond:
                while (shard.items or shard.busy) and self.error is None and not self.closed:
                    shard.cond.wait(0.5)
                while shard.pending and self.error is None and time.monotonic() < deadline:
                    shard.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        if raise_error:
            self.raise_error()
        return [item for shard in self.shards for item in shard.pending]

    def close(self) -> None:
        """Stop the workers once their current hook is done; what is still queued is dropped (the
        driver has ended the runs by then: a late write must not reopen or extend one)."""
        self.closed = True
        for shard in self.shards:
            with shard.cond:
                shard.cond.notify_all()

    @property
    def pending(self) -> list[Item]:
        return [item for shard in self.shards for item in shard.pending]

    # -- the workers ----------------------------------------------------------------------------------
    def _work(self, shard: _Shard) -> None:
        while True:
            with shard.cond:
                while not shard.items and not self.closed:
                    if shard.pending:  # the store was unreachable: retry it every RETRY_S
                        shard.cond.wait(RETRY_S)
                        break
                    shard.cond.wait()
                if self.closed:
                    shard.thread = None
                    return
                batch, shard.items = shard.items, []
                shard.busy = True
            try:
                self._process(shard, coalesce(batch))
            except BaseException as e:  # a hook's own error: Tune's thread raises it
                self.error = self.error or e
            finally:
                with shard.cond:
                    shard.busy = False
                    shard.cond.notify_all()

    def _process(self, shard: _Shard, batch: list[Item]) -> None:
        self._flush(shard)
        for item in batch:
            if shard.pending:  # still down: keep the order
                shard.pending.append(item)
                continue
            try:
                self.run(*item)
            except Exception as e:
                if not store_unreachable(e):
                    raise
                self._queue(shard, item, e)

    def _queue(self, shard: _Shard, item: Item, error: Exception) -> None:
        with self._lock:
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                print(
                    f"MLflow tracking store unreachable ({type(error).__name__}): trials go on, updates queue"
                )
        self.forget(item[1])
        shard.pending.append(item)

    def _flush(self, shard: _Shard) -> None:
        while shard.pending:
            try:
                self.run(*shard.pending[0])
            except Exception as e:
                if not store_unreachable(e):
                    raise
                self.forget(shard.pending[0][1])
                return
            shard.pending.pop(0)
        with self._lock:
            if self.unreachable_since is not None and not any(s.pending for s in self.shards):
                down = time.monotonic() - self.unreachable_since
                print(f"MLflow tracking store back after {down:.0f} s: queued updates logged")
                self.unreachable_since = None
