"""Jobs on loaded models: one worker thread per model runs that model's queued jobs in submission order.

A job's `work(progress)` runs on its model's thread; `progress(fraction, message)` records how far it got and
raises `Cancelled` once the job was cancelled, so a running job stops at its next report. Finished jobs stay
in a `JobStore` for a while so that a client that went away can fetch the result later.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import torch

from ..errors import OutOfMemoryError, UserError
from ..failures import unexpected
from ..pipeline.capture import Cancelled

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
OUT_OF_MEMORY = "the device ran out of memory: try a shorter prompt, fewer methods, or the CPU"

Work = Callable[[Callable[[float, str], None]], Any]


class QueueFull(UserError):
    """A model's queue holds as many waiting jobs as it may."""


class Job:
    """One piece of work on one model: status, progress (fraction in [0, 1], message), and the result or
    the error (one line, with the HTTP status it maps to: 422 bad input, 507 out of memory, 500 otherwise).
    `version` grows with every change; `listen(wake)` calls `wake()` on each change, from any thread."""

    def __init__(self, model: str, kind: str, work: Work):
        self.id = secrets.token_hex(8)
        self.model = model
        self.kind = kind
        self.work = work
        self.status = QUEUED
        self.fraction = 0.0
        self.message = "queued"
        self.result: Any = None
        self.landed: tuple[dict, ...] = ()
        self.error: str | None = None
        self.error_status: int | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.finished_monotonic: float | None = None
        self.version = 0
        self.queue: ModelQueue | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._listeners: list[Callable[[], None]] = []

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def listen(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(wake)

    def unlisten(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._listeners:
                self._listeners.remove(wake)

    def touch(self) -> None:
        """Tell listeners something changed (such as the job's place in the queue)."""
        self._update()

    def _update(self, **changes) -> None:
        with self._lock:
            if self.is_finished:
                return
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1
            if self.is_finished:
                self.finished = time.time()
                self.finished_monotonic = time.monotonic()
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def progress(self, fraction: float, message: str) -> None:
        """The runner's progress callback; raises Cancelled once the job was cancelled."""
        if self._cancel.is_set():
            raise Cancelled("cancelled")
        self._update(fraction=float(fraction), message=message)

    def land(self, summary: dict) -> None:
        """Record one finished row's summary ({"method", "text", ...}) so that clients see rows as they land."""
        self._update(landed=self.landed + (summary,))

    def request_cancel(self) -> None:
        self._cancel.set()

    def start(self) -> None:
        self._update(status=RUNNING, started=time.time(), message="started")

    def succeed(self, result: Any) -> None:
        self._update(status=DONE, result=result, fraction=1.0, message="done")

    def fail(self, error: str, status: int) -> None:
        self._update(status=FAILED, error=error, error_status=status, message="failed")

    def cancel(self) -> None:
        self._update(status=CANCELLED, message="cancelled")

    async def changed(self, version: int, timeout: float) -> None:
        """Return once `version` is out of date, or after `timeout` seconds (from an event loop)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake():
            loop.call_soon_threadsafe(event.set)

        self.listen(wake)
        try:
            if self.version == version:
                await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.unlisten(wake)

    def to_json(self, with_result: bool = True) -> dict:
        """Status, progress (fraction, message, jobs ahead in the queue: 0 while running, null once finished),
        the rows that landed so far (method, text, kv_fraction, seconds), times (Unix seconds), the error when failed and the result when done."""
        position = self.queue.position(self) if self.queue is not None else None
        with self._lock:
            record = {
                "id": self.id,
                "model": self.model,
                "kind": self.kind,
                "status": self.status,
                "progress": {"fraction": round(self.fraction, 4), "message": self.message, "queue_position": position},
                "landed": list(self.landed),
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
            }
            if self.status == FAILED:
                record["error"] = self.error
            if self.status == DONE and with_result:
                record["result"] = self.result
        return record


class ModelQueue:
    """The jobs of one model, run one at a time in submission order on the model's own thread; at most
    `max_waiting` jobs wait at once."""

    def __init__(self, model: str, max_waiting: int = 32):
        self.model = model
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"zigzag-viz model {model}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._condition:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{self.model} already has {self.max_waiting} jobs waiting: try again later")
            job.queue = self
            self.waiting.append(job)
            self._condition.notify()
        return job

    def __len__(self) -> int:
        """Jobs waiting or running."""
        with self._condition:
            return len(self.waiting) + (self.running is not None)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of `job` (the running one included); 0 while it runs, None once it left the queue."""
        with self._condition:
            if job is self.running:
                return 0
            try:
                return self.waiting.index(job) + (self.running is not None)
            except ValueError:
                return None

    def cancel(self, job: Job) -> None:
        """A waiting job is cancelled at once; a running one at its next progress report."""
        with self._condition:
            if job in self.waiting:
                self.waiting.remove(job)
                job.cancel()
                self._touch_waiting()
            elif job is self.running:
                job.request_cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what waits and what runs, and stop the thread (waiting up to `timeout` seconds for it)."""
        with self._condition:
            self._closed = True
            for job in self.waiting:
                job.cancel()
            self.waiting.clear()
            if self.running is not None:
                self.running.request_cancel()
            self._condition.notify_all()
        self._thread.join(timeout)

    def _touch_waiting(self) -> None:
        for job in self.waiting:
            job.touch()

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self.waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                job = self.running = self.waiting.popleft()
                job.start()
                self._touch_waiting()
            try:
                _run(job)
            finally:
                with self._condition:
                    self.running = None
                    self._touch_waiting()


def _run(job: Job) -> None:
    """Run `job.work` and record how it ended; nothing it raises stops the model's thread."""
    try:
        result = job.work(job.progress)
    except Cancelled:
        job.cancel()
    except OutOfMemoryError as exc:
        job.fail(str(exc), 507)
    except torch.OutOfMemoryError:
        job.fail(OUT_OF_MEMORY, 507)
    except UserError as exc:
        job.fail(str(exc), 422)
    except Exception as exc:
        job.fail(unexpected(exc, f"job {job.id} ({job.kind} on {job.model})"), 500)
    else:
        job.succeed(result)


class JobStore:
    """Jobs by id: every unfinished one, and the finished ones for `keep_s` seconds, at most `keep_finished`
    of them (the oldest go first)."""

    def __init__(self, keep_s: float = 3600.0, keep_finished: int = 64):
        self.keep_s = keep_s
        self.keep_finished = keep_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> Job:
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def _prune(self) -> None:
        now = time.monotonic()
        finished = [job for job in self._jobs.values() if job.finished_monotonic is not None]
        finished.sort(key=lambda job: job.finished_monotonic)
        excess = len(finished) - self.keep_finished
        for index, job in enumerate(finished):
            if index < excess or now - job.finished_monotonic > self.keep_s:
                del self._jobs[job.id]
