"""The model server behind `zigzag-viz serve`: the CLI's analyze, compare and methods over HTTP, through the
runner, on models loaded once.

    app = create_app([load_model("smollm2")], token, Limits())

GET /health is open; every other endpoint needs `Authorization: Bearer <token>`. GET /models (with where each
runs: device, dtype, GPU memory), GET /methods, POST /analyze (answers with what `zigzag-viz analyze --json`
prints), POST /compare (a job: 202 with its id), GET /jobs/{id} (status, progress, the rows landed so far, and
when done {"rows": what `compare --json` prints, "comparison": the export}), GET /jobs/{id}/events (server-sent events: `progress` on each change, then one `end`),
DELETE /jobs/{id} (cancel). The app's pages use POST /views/analysis and POST /views/compare (jobs), which take
the same bodies and answer with the pages' own results, exactly, in `wire`'s JSON. Errors are `{"error": one line}`: 401 token, 404 unknown job, 413 body too large,
422 bad input, 429 too many requests (per token; and per client address for wrong tokens), 500 a bug (its
traceback goes to the error log, `failures`), 503 queue full, 507 out of memory. No CORS headers are sent: a web
page elsewhere cannot call the server from a browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError, OutOfMemoryError, UserError
from ..failures import keep_out_of_logs, unexpected
from ..evaluation.runner import LruCache, Runner
from ..methods import parse_specs
from ..paths import cache_folder
from ..pipeline.models import LoadedModel
from .api import AnalyzeOptions, CompareOptions, analysis_report, comparison_result, configured_token, methods_listing
from ..presentation import views
from . import wire
from .jobs import Job, JobStore, ModelQueue, QueueFull

KEEP_ALIVE_S = 15.0
TOKEN_FILE = "server-token"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: body bytes, methods per comparison, generated tokens; jobs waiting per
    model; how long (seconds) and how many finished jobs are kept; prompts whose prefill stays cached; requests
    per minute per token, in bursts of at most `burst`, and wrong-token requests per minute per client address."""

    max_body_bytes: int = 2 * 2**20
    max_methods: int = 16
    max_new_tokens: int = 512
    max_waiting: int = 32
    keep_s: float = 3600.0
    keep_finished: int = 64
    cached_prompts: int = 2
    requests_per_minute: float = 6000.0
    burst: int = 300
    wrong_tokens_per_minute: float = 30.0


class RateLimit:
    """A token bucket per key: `per_minute` requests a minute on average, at most `burst` at once."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (requests left, when counted)
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Take one request from `key`'s bucket and return 0, or, when it is empty, the seconds until one is
        free (nothing taken)."""
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(key, (self.burst, now))
            left = min(self.burst, left + (now - then) * self.rate)
            if left < 1.0:
                self._buckets[key] = (left, now)
                return (1.0 - left) / self.rate
            self._buckets[key] = (left - 1.0, now)
            if len(self._buckets) > 4096:  # forget the fullest buckets of past clients
                self._buckets = dict(sorted(self._buckets.items(), key=lambda item: item[1][0])[:1024])
            return 0.0


class JsonResponse(Response):
    """JSON as `json.dumps` writes it, the same text the CLI prints."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content).encode("utf-8")


def _error(status: int, message: str, headers: dict | None = None) -> JsonResponse:
    return JsonResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _status_of(exc: UserError) -> int:
    if isinstance(exc, OutOfMemoryError):
        return 507
    if isinstance(exc, QueueFull):
        return 503
    return 422


class Server:
    """The loaded models, their queues, the finished jobs and the row cache behind one app."""

    def __init__(self, models: Iterable[LoadedModel], token: str, limits: Limits):
        self.models = {loaded.name: loaded for loaded in models}
        if not self.models:
            raise InputError("the server needs at least one model")
        if not token:
            raise InputError("the server needs a token")
        self._token = token.encode("utf-8")
        keep_out_of_logs(token)
        self.limits = limits
        self.requests = RateLimit(limits.requests_per_minute, limits.burst)
        self.wrong_tokens = RateLimit(limits.wrong_tokens_per_minute, max(1, int(limits.wrong_tokens_per_minute // 6)))
        self.queues = {name: ModelQueue(name, limits.max_waiting) for name in self.models}
        self.jobs = JobStore(limits.keep_s, limits.keep_finished)
        self.cache = LruCache(references=limits.cached_prompts)

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise InputError(f"unknown model '{name:.60}': this server has {', '.join(self.models)}")
        return self.models[name]

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job '{job_id:.40}' (finished jobs are kept for {self.limits.keep_s:g} s)")
        return job

    def check_limits(self, options: CompareOptions) -> None:
        count = len(parse_specs(options.methods))
        if count > self.limits.max_methods:
            raise InputError(f"at most {self.limits.max_methods} methods per comparison on this server, got {count}")
        if options.max_new_tokens > self.limits.max_new_tokens:
            raise InputError(f"max_new_tokens must be at most {self.limits.max_new_tokens} on this server, "
                             f"got {options.max_new_tokens}")

    def close(self) -> None:
        for queue in self.queues.values():
            queue.close()


async def _read_json(request: Request, limit: int):
    """The request's JSON body; 413 past `limit` bytes (declared or received), InputError when not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise InputError("the request body is not JSON") from None


def create_app(models: Iterable[LoadedModel], token: str, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app serving `models` (loaded once, by name), guarded by the bearer `token`;
    `app.state.server.close()` stops its model threads."""
    server = Server(models, token, limits)

    def require_token(request: Request) -> None:
        if not server.authorized(request.headers.get("authorization")):
            address = request.client.host if request.client else "unknown"
            if wait := server.wrong_tokens.wait_s(address):
                raise HTTPException(429, f"too many requests with a wrong token: try again in {wait:.0f} s",
                                    headers={"Retry-After": str(max(1, round(wait)))})
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        if wait := server.requests.wait_s("token"):
            raise HTTPException(429, f"too many requests: at most {limits.requests_per_minute:g} a minute on this "
                                     f"server; try again in {wait:.1f} s", headers={"Retry-After": str(max(1, round(wait)))})

    app = FastAPI(title="zigzag_viz model server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    guarded = [Depends(require_token)]

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return _error(_status_of(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return _error(500, unexpected(exc, f"{request.method} {request.url.path}"))

    @app.get("/health")
    async def health():
        return JsonResponse({"status": "ok"})

    @app.get("/models", dependencies=guarded)
    async def models_loaded():
        return JsonResponse({"models": [
            {"name": name, **views.device_info(loaded).to_json(), "layers": loaded.num_layers,
             "max_context": loaded.max_context, "jobs": len(server.queues[name])}
            for name, loaded in server.models.items()
        ]})

    @app.get("/methods", dependencies=guarded)
    async def methods():
        return JsonResponse(methods_listing())

    async def finished(job: Job) -> JsonResponse:
        """Wait for a job that answers its own request (the analyses) and send its result or its error."""
        while True:
            version = job.version
            if job.is_finished:
                break
            await job.changed(version, KEEP_ALIVE_S)
        if job.error is not None:
            return _error(job.error_status, job.error)
        if job.result is None:
            return _error(503, "the analysis was cancelled: the server is shutting down")
        return JsonResponse(job.result)

    @app.post("/analyze", dependencies=guarded)
    async def analyze(request: Request):
        options = AnalyzeOptions.from_json(await _read_json(request, limits.max_body_bytes))
        loaded = server.model(options.model)
        return await finished(server.queues[loaded.name].submit(
            Job(loaded.name, "analyze", lambda progress: analysis_report(loaded, options, progress))))

    @app.post("/views/analysis", dependencies=guarded, status_code=202)
    async def analysis_view(request: Request):
        options = AnalyzeOptions.from_json(await _read_json(request, limits.max_body_bytes))
        loaded = server.model(options.model)

        def work(progress):
            pre = Runner(loaded, progress).analyze(options.prompt, options.window, deep=options.deep)
            return wire.encode(views.analysis_result(loaded, pre, options.deep))

        job = server.jobs.add(server.queues[loaded.name].submit(Job(loaded.name, "analysis", work)))
        return JsonResponse(job.to_json(), status_code=202)

    async def submit_comparison(request: Request, kind: str, result_of) -> JsonResponse:
        """Check a comparison before queuing it (422 at once), then queue it as a job whose rows land one by
        one (`Job.land`) and whose result is `result_of(loaded, comparison)`."""
        options = CompareOptions.from_json(await _read_json(request, limits.max_body_bytes))
        server.check_limits(options)
        loaded = server.model(options.model)
        checked = await run_in_threadpool(options.request, Runner(loaded))

        def land(row) -> None:
            seconds = row.prefill_s + row.analysis_s + row.compress_s + row.decode_s
            job.land({"method": row.method, "text": row.text[:200], "kv_fraction": round(row.kv_fraction, 6),
                      "seconds": round(seconds, 3)})

        def work(progress):
            return result_of(loaded, Runner(loaded, progress, server.cache).compare(checked, land))

        job = Job(loaded.name, kind, work)  # made before it is queued: `land` may run as soon as it is
        server.jobs.add(server.queues[loaded.name].submit(job))
        return JsonResponse(job.to_json(), status_code=202)

    @app.post("/compare", dependencies=guarded, status_code=202)
    async def compare(request: Request):
        return await submit_comparison(request, "compare", lambda _loaded, comparison: comparison_result(comparison))

    @app.post("/views/compare", dependencies=guarded, status_code=202)
    async def comparison_view(request: Request):
        return await submit_comparison(
            request, "comparison", lambda loaded, comparison: wire.encode(views.comparison_result(loaded, comparison)))

    @app.get("/jobs/{job_id}", dependencies=guarded)
    async def job_status(job_id: str):
        return JsonResponse(server.job(job_id).to_json())

    @app.delete("/jobs/{job_id}", dependencies=guarded, status_code=202)
    async def cancel(job_id: str):
        job = server.job(job_id)
        server.queues[job.model].cancel(job)
        return JsonResponse(job.to_json(), status_code=202)

    @app.get("/jobs/{job_id}/events", dependencies=guarded)
    async def events(job_id: str):
        job = server.job(job_id)

        async def stream():
            sent = -1
            while True:
                version = job.version
                if version != sent:
                    sent = version
                    if job.is_finished:
                        yield f"event: end\ndata: {json.dumps(job.to_json())}\n\n"
                        return
                    yield f"event: progress\ndata: {json.dumps(job.to_json(with_result=False))}\n\n"
                else:
                    yield ": keep-alive\n\n"
                await job.changed(sent, KEEP_ALIVE_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_token(token: str) -> Path:
    """Write `token` to cache_folder()/server-token, readable by its owner only (mode 0600)."""
    path = cache_folder() / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(token + "\n")
    return path


def server_token(token_file: str | None, host: str) -> str:
    """The token from `token_file` or ZIGZAG_VIZ_TOKEN; else, on a loopback `host` only, a new random one,
    printed once on standard output and written by `write_token`."""
    token = configured_token(token_file)
    if token is not None:
        return token
    if not is_loopback(host):
        raise InputError(f"--host {host} is not a loopback address: serving beyond this machine needs a token "
                         "of your own (--token-file or ZIGZAG_VIZ_TOKEN)")
    token = secrets.token_urlsafe(32)
    path = write_token(token)
    print(f"token: {token} (also in {path})", flush=True)
    return token


def serve(models: Iterable[LoadedModel], token: str, host: str = "127.0.0.1", port: int = 8765,
          limits: Limits = Limits()) -> None:
    """Serve `models` with uvicorn until interrupted; only warnings and errors are logged."""
    import uvicorn

    app = create_app(models, token, limits)
    names = ", ".join(app.state.server.models)
    print(f"zigzag-viz: serving {names} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.server.close()
