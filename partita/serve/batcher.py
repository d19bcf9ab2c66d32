"""Dynamic batching: requests that arrive close together go through the pipeline as one batch.

The batcher's thread takes the oldest waiting request, then waits up to `window_s` for more,
taking requests while their rows fit in `max_rows` (a request that does not fit starts the next
batch; none is ever split). It concatenates each input along dimension 0, sends the batch with
`submit(flat_inputs)` (which returns a Future of the flat outputs: the pipeline runs it while the
batcher gathers the next), and cuts every output back into each request's rows. `window_s` 0
batches only what is already waiting; `max_rows` 1 turns batching off.

Batches in flight are bounded (`max_batches`, a number or a function read before every batch):
while the pipeline holds that many, requests wait here, so the next batch takes all of them
(up to `max_rows`). Without the bound every request would leave at once, alone, and queue inside
the pipeline instead: batches would stay small exactly when the load is high.

A request accepted is answered: with its rows of the outputs, or with the batch's error.
`close()` stops taking requests, sends what is waiting and waits until every batch is answered.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from partita.errors import RequestError


@dataclass
class _Waiting:
    inputs: tuple[torch.Tensor, ...]
    rows: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Coalesce requests into batches of at most `max_rows` rows, waiting at most `window_s` for more.

    `submit(inputs)` sends one batch (flat input tensors) and returns a Future of its flat outputs.
    `max_batches` bounds the batches sent and not yet answered (see the module docstring).
    `on_batch(rows, requests, queue_s)` is told about every batch sent: its rows, how many requests
    it holds and how long its oldest request waited (seconds), e.g. for metrics.
    """

    def __init__(self, submit: Callable[[tuple[torch.Tensor, ...]], Future], *, max_rows: int, window_s: float,
                 max_batches: int | Callable[[], int] = 4,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.max_rows = max_rows
        self.window_s = window_s
        self._submit = submit
        self._on_batch = on_batch
        self._queue: queue.Queue[_Waiting | None] = queue.Queue()
        self._carry: _Waiting | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._max_batches = max_batches
        self._batches = 0  # sent, not yet answered
        self._slot = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._loop, name="partita-batcher", daemon=True)
        self._thread.start()

    def submit(self, inputs: tuple[torch.Tensor, ...], rows: int) -> Future:
        """Queue one request (flat inputs with `rows` rows at dimension 0); the Future gives its flat outputs."""
        if rows > self.max_rows:
            raise RequestError(f"a request of {rows} rows cannot fit a batch of at most {self.max_rows}")
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise RequestError("the server is shutting down and takes no new requests")
            self._in_flight += 1
        future.add_done_callback(self._done)
        self._queue.put(_Waiting(inputs, rows, future))
        return future

    def close(self, timeout_s: float | None = None) -> bool:
        """Send what waits, then wait until every accepted request is answered; True if all were in time."""
        with self._lock:
            self._closing = True
        self._queue.put(None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        self._thread.join(5.0)
        return True

    # -- the batcher thread --------------------------------------------------------------------
    def _done(self, _future: Future) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _loop(self) -> None:
        stopping = False
        # After close() a request may still land behind the stop mark (it passed the check just
        # before): keep draining until nothing is left.
        while not stopping or self._carry is not None or not self._queue.empty():
            self._wait_for_slot()
            batch, stopping = self._gather(stopping)
            if batch:
                self._send(batch)
            else:
                self._release_slot()

    def _wait_for_slot(self) -> None:
        limit = self._max_batches() if callable(self._max_batches) else self._max_batches
        with self._slot:
            while self._batches >= max(1, limit):
                self._slot.wait()
            self._batches += 1

    def _release_slot(self, _future: Future | None = None) -> None:
        with self._slot:
            self._batches -= 1
            self._slot.notify_all()

    def _gather(self, stopping: bool) -> tuple[list[_Waiting], bool]:
        """The next batch (the carried-over request first); `stopping` once close() was called."""
        first = self._carry
        self._carry = None
        if first is None:
            try:
                first = self._queue.get_nowait() if stopping else self._queue.get()
            except queue.Empty:
                return [], True
            if first is None:
                return [], True
        batch, rows = [first], first.rows
        deadline = first.arrived + self.window_s
        while rows < self.max_rows:
            wait_s = 0.0 if stopping else deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stopping = True
                continue
            if rows + item.rows > self.max_rows:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch, stopping

    def _send(self, batch: list[_Waiting]) -> None:
        rows = [w.rows for w in batch]
        if self._on_batch is not None:
            self._on_batch(sum(rows), len(batch), time.monotonic() - batch[0].arrived)
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = tuple(torch.cat(parts) for parts in zip(*(w.inputs for w in batch), strict=True))
            outer = self._submit(inputs)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error as its answer
            self._release_slot()
            for w in batch:
                w.future.set_exception(exc)
            return
        outer.add_done_callback(self._release_slot)

        def split(done: Future) -> None:
            error = done.exception()
            if error is not None:
                for w in batch:
                    w.future.set_exception(error)
                return
            outputs = done.result()
            pieces = [torch.split(t, rows) for t in outputs]
            for i, w in enumerate(batch):
                w.future.set_result(tuple(p[i] for p in pieces))

        outer.add_done_callback(split)
