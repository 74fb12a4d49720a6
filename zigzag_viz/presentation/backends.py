"""Where the app's pages run the model: in this process (the default) or on a model server (`zigzag-viz serve`)
reached over HTTP with a token. Both give the pages the same results; no Streamlit here.

    backend = InProcess(load=load_model, cache=LruCache())   # or Remote("http://127.0.0.1:8765", token)
    result = backend.analysis("smollm2", prompt, window=32, deep=False, progress=report)
    shown = backend.comparison(CompareOptions(model="smollm2", prompt=prompt, ...), progress=report, on_row=show)

`progress(fraction, message)` hears every step and may raise to stop (the app's Cancel button); a remote job
is then cancelled on the server. `on_row(method, text)` hears each row as it lands.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from ..errors import UserError
from ..evaluation.runner import Runner, RowCache
from ..pipeline.models import LoadedModel
from ..serving.api import AnalyzeOptions, CompareOptions
from ..serving.client import Backend as Client
from .views import AnalysisResult, ComparisonResult, DeviceInfo, analysis_result, comparison_result, device_info

Progress = Callable[[float, str], None]
OnRow = Callable[[str, str], None]


class Backend(Protocol):
    """What the pages call; `where` names it in one line ("this process", the server's URL); a backend that
    does not accept any model serves only the models its `devices()` list."""

    where: str
    accepts_any_model: bool

    def devices(self) -> list[DeviceInfo]: ...

    def analysis(self, model: str, prompt: str, window: int, deep: bool, progress: Progress) -> AnalysisResult: ...

    def comparison(self, options: CompareOptions, progress: Progress, on_row: OnRow) -> ComparisonResult: ...


class Turns:
    """First come, first served turns on one model for the sessions of one app: a waiting caller hears its place
    every `poll_s` seconds and may stop waiting by raising from `progress` (the page's Cancel)."""

    def __init__(self, poll_s: float = 0.25):
        self.poll_s = poll_s
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @contextmanager
    def turn(self, progress: Progress, what: str) -> Iterator[None]:
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
        try:
            while True:
                with self._changed:
                    ahead = self._waiting.index(ticket)
                    if ahead:
                        self._changed.wait(self.poll_s)
                        ahead = self._waiting.index(ticket)
                if not ahead:
                    break
                progress(0.0, f"waiting: {ahead} run(s) ahead on {what} in this app")
            yield
        finally:
            with self._changed:
                self._waiting.remove(ticket)
                self._changed.notify_all()


class InProcess:
    """Models loaded in this process by `load(name)` (the app passes its once-per-server loader), rows kept in
    `cache`; the sessions of one app take turns on each model (`Turns`), so a run is never slowed by another
    one's forward passes and every waiting page says it is queued."""

    where = "this process"
    accepts_any_model = True

    def __init__(self, load: Callable[[str], LoadedModel], cache: RowCache):
        self.load = load
        self.cache = cache
        self.loaded: dict[str, LoadedModel] = {}
        self.turns: dict[str, Turns] = {}
        self.lock = threading.Lock()

    def model(self, name: str) -> LoadedModel:
        loaded = self.load(name)
        with self.lock:
            self.loaded[name] = loaded
        return loaded

    def _turns(self, name: str) -> Turns:
        with self.lock:
            return self.turns.setdefault(name, Turns())

    def devices(self) -> list[DeviceInfo]:
        """Where each model loaded so far runs (none before the first run: nothing is loaded to show it)."""
        with self.lock:
            loaded = list(self.loaded.values())
        return [device_info(m) for m in loaded]

    def analysis(self, model: str, prompt: str, window: int, deep: bool, progress: Progress) -> AnalysisResult:
        loaded = self.model(model)
        with self._turns(loaded.name).turn(progress, loaded.name):
            pre = Runner(loaded, progress=progress).analyze(prompt, int(window), deep=bool(deep))
        return analysis_result(loaded, pre, deep)

    def comparison(self, options: CompareOptions, progress: Progress, on_row: OnRow) -> ComparisonResult:
        loaded = self.model(options.model)
        runner = Runner(loaded, progress=progress, cache=self.cache)
        request = options.request(runner)
        with self._turns(loaded.name).turn(progress, loaded.name):
            comparison = runner.compare(request, lambda row: on_row(row.method, row.text))
        return comparison_result(loaded, comparison)


class Remote:
    """A model server at `url` reached with `token`; every failure is one UserError line."""

    accepts_any_model = False

    def __init__(self, url: str, token: str, max_age_s: float = 10.0):
        self.client = Client(url, token)
        self.where = self.client.url
        self.max_age_s = max_age_s
        self._devices: tuple[float, list[DeviceInfo]] | None = None

    def devices(self) -> list[DeviceInfo]:
        """The server's models and where each runs, asked again once the last answer is `max_age_s` old."""
        if self._devices is None or time.monotonic() - self._devices[0] > self.max_age_s:
            self._devices = (time.monotonic(), [
                DeviceInfo(m["name"], m["device"], m["dtype"], m.get("gpu_bytes_in_use"), m.get("gpu_bytes_total"))
                for m in self.client.models()])
        return self._devices[1]

    def analysis(self, model: str, prompt: str, window: int, deep: bool, progress: Progress) -> AnalysisResult:
        options = AnalyzeOptions(model=model, prompt=prompt, window=int(window), deep=bool(deep)).check()
        return self.client.analysis_view(options, _heard(progress))

    def comparison(self, options: CompareOptions, progress: Progress, on_row: OnRow) -> ComparisonResult:
        return self.client.comparison_view(options.check(), _heard(progress, on_row))


def _heard(progress: Progress, on_row: OnRow | None = None) -> Callable[[dict], None]:
    """A job listener that passes the server's progress (or its place in the queue) to `progress` and each
    newly landed row to `on_row`."""
    shown = 0

    def heard(job: dict) -> None:
        nonlocal shown
        landed = job.get("landed", [])
        if on_row is not None:
            for row in landed[shown:]:
                on_row(row["method"], row["text"])
        shown = len(landed)
        step = job["progress"]
        queued = step.get("queue_position")
        waiting = job["status"] == "queued" and queued
        progress(float(step["fraction"]), f"waiting: {queued} job(s) ahead on the server" if waiting else step["message"])

    return heard


def remote(url: str, token: str) -> Remote:
    """A Remote backend, or UserError with one line when the URL or token is missing or malformed."""
    if not url or not url.strip():
        raise UserError("type the model server's URL (http://host:port), or pick the in-process backend")
    return Remote(url.strip(), token.strip() if token else "")
