"""The command line's side of a model server: send the options, return the server's JSON as the local run
would have made it.

    backend = Backend("http://127.0.0.1:8765", token)
    report = backend.analyze(AnalyzeOptions(...))                      # what `analyze --json` prints
    result = backend.compare(CompareOptions(...), on_progress=show)     # {"rows": ..., "comparison": ...}
    view = backend.comparison_view(CompareOptions(...), on_progress=show)  # the app's ComparisonResult

The command line's calls import neither torch nor the methods: the server checks the request.
Every failure is a UserError with one line: the server's own message for bad input, a failed job or a full
queue, and `the backend at URL ...` when it cannot be reached, refuses the token or goes away mid-run.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Iterator

import httpx

from ..errors import InputError, OutOfMemoryError, UserError
from .api import AnalyzeOptions, CompareOptions

if TYPE_CHECKING:
    from ..presentation.views import AnalysisResult, ComparisonResult

CONNECT_TIMEOUT_S = 10.0
EVENT_TIMEOUT_S = 60.0  # the server sends a keep-alive every 15 s while a job waits or runs


class BackendError(UserError):
    """The backend cannot be reached, refuses the token, or went away."""


class Backend:
    """A model server at `url` (http://host:port) reached with the bearer `token`."""

    def __init__(self, url: str, token: str | None):
        if not token:
            raise InputError("no token for the backend: give --token-file or set ZIGZAG_VIZ_TOKEN")
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"the backend must be an http:// or https:// URL, got {url!r:.80}")
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def analyze(self, options: AnalyzeOptions) -> dict:
        """The server's `analyze --json` report for `options` (waits for the model's queue)."""
        return self._call("POST", "/analyze", json=options.to_json())

    def compare(self, options: CompareOptions, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Run `options` as a job and wait for it: {"rows", "comparison"}; `on_progress(job)` hears each change
        (status, progress with fraction, message and queue_position, the rows landed so far), the last one
        included. Anything that stops the wait (Ctrl-C, a page rerun raised from `on_progress`) cancels the job
        on the server."""
        return self._follow(self._call("POST", "/compare", json=options.to_json()), on_progress)

    def models(self) -> list[dict]:
        """The server's models: name, device, dtype, GPU memory in use and in all (bytes), layers, queued jobs."""
        return self._call("GET", "/models")["models"]

    def analysis_view(self, options: AnalyzeOptions,
                      on_progress: Callable[[dict], None] | None = None) -> AnalysisResult:
        """The app's analysis of `options.prompt`, run as a job on the server; progress as in `compare`."""
        from ..presentation.views import AnalysisResult

        job = self._call("POST", "/views/analysis", json=options.to_json())
        return self._view(self._follow(job, on_progress), AnalysisResult)

    def comparison_view(self, options: CompareOptions,
                        on_progress: Callable[[dict], None] | None = None) -> ComparisonResult:
        """The app's comparison for `options`, run as a job on the server; progress as in `compare`."""
        from ..presentation.views import ComparisonResult

        job = self._call("POST", "/views/compare", json=options.to_json())
        return self._view(self._follow(job, on_progress), ComparisonResult)

    def _follow(self, job: dict, on_progress: Callable[[dict], None] | None):
        """Wait for `job` through its events and return its result; cancel it when the wait is stopped."""
        try:
            for event, record in self._events(job["id"]):
                if on_progress is not None:
                    on_progress(record)
                if event == "end":
                    break
            else:
                raise BackendError(f"the backend at {self.url} closed the progress stream of job {job['id']} early")
        except BaseException:
            self.cancel(job["id"])
            raise
        return self._result(record)

    def _view(self, value, kind: type):
        from . import wire  # the pages' classes (and torch) only for the app's calls

        result = wire.decode(value)
        if not isinstance(result, kind):
            raise BackendError(f"the backend at {self.url} answered with something that is not a {kind.__name__}")
        return result

    def cancel(self, job_id: str) -> None:
        """Ask the server to cancel a job; silent when the server is already gone."""
        try:
            self.client.delete(f"/jobs/{job_id}", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError:
            pass

    def _result(self, record: dict) -> dict:
        if record["status"] == "done":
            return record["result"]
        if record["status"] == "failed":
            raise UserError(record["error"])
        raise BackendError(f"the backend at {self.url} reports job {record['id']} as {record['status']}")

    def _events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event name, job record) for each server-sent event of the job."""
        try:
            with self.client.stream("GET", f"/jobs/{job_id}/events",
                                    timeout=httpx.Timeout(EVENT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)) as response:
                self._check(response, response.read() if response.status_code != 200 else b"")
                event, data = "message", []
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, json.loads("\n".join(data))
                        event, data = "message", []
        except httpx.HTTPError as exc:
            raise BackendError(f"the backend at {self.url} went away during job {job_id} ({type(exc).__name__})") from None

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._gone(exc) from None
        self._check(response, response.content)
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"the backend at {self.url} answered {path} with something that is not JSON") from None

    def _check(self, response: httpx.Response, body: bytes) -> None:
        """Raise the one-line error for a response that is not a success."""
        if response.status_code < 400:
            return
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        if response.status_code == 401:
            raise BackendError(f"the backend at {self.url} refused the token ({message})")
        if response.status_code in (413, 422, 503):
            raise UserError(message)
        if response.status_code == 507:
            raise OutOfMemoryError(message)
        raise BackendError(f"the backend at {self.url} answered {response.status_code}: {message}")

    def _gone(self, exc: httpx.HTTPError) -> BackendError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return BackendError(f"the backend at {self.url} cannot be reached ({type(exc).__name__})")
        return BackendError(f"the backend at {self.url} went away during the request ({type(exc).__name__})")
