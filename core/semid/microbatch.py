"""Dynamic batching of model calls made by concurrent threads (one process, one copy of the model).

A batch worker on a GPU runs several studies at once on threads: their CPU stages (reading, head mask,
registration, resampling, writing) overlap, and their model calls meet here. ``MicroBatcher`` collects
the calls that arrive within ``max_wait_s`` of each other (up to ``max_batch``) and runs them as one
batch on a single server thread, so the GPU sees a batch of face boxes instead of one box at a time,
and only one thread ever drives the device.

Why not Dask's or MONAI's batching: Dask batches nothing inside a task, and MONAI's inferers batch the
windows of one volume, not calls from different studies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class _Request:
    __slots__ = ("args", "done", "result", "error")

    def __init__(self, args: Any) -> None:
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class MicroBatcher:
    """``batcher(args)`` returns ``fn([args])[0]``, but calls arriving together share one ``fn`` call.

    Args:
        fn: takes a list of per-call arguments (any objects) and returns a list of results, one per call,
            in order. It runs on the batcher's own daemon thread.
        max_batch: most calls per ``fn`` call.
        max_wait_s: how long the first call of a batch waits for others to join it.

    A call that is alone waits ``max_wait_s`` at most; an exception raised by ``fn`` is raised in every
    caller of that batch. ``batch_sizes`` counts the batches run, by size (for tests and benchmarks).
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 4,
                 max_wait_s: float = 0.02) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn, self.max_batch, self.max_wait_s = fn, int(max_batch), float(max_wait_s)
        self.batch_sizes: dict[int, int] = {}
        self._queue: list[_Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __call__(self, args: Any) -> Any:
        if self.max_batch == 1:
            return self.fn([args])[0]
        req = _Request(args)
        with self._cond:
            self._queue.append(req)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="semid-microbatch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                results = list(self.fn([r.args for r in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} calls")
                for req, res in zip(batch, results, strict=True):
                    req.result = res
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for req in batch:
                    req.error = exc
            for req in batch:
                req.done.set()
