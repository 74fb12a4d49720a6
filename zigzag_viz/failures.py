"""Unexpected failures: one line for the user, the whole traceback in a log file under the cache folder.

    except Exception as exc:
        print(unexpected(exc, "the comparison"))   # "the comparison failed unexpectedly (KeyError); details in …"

The log is `cache_folder()/logs/errors.log`, kept under `MAX_LOG_BYTES` by moving the full file to
`errors.log.1`. Secrets registered with `keep_out_of_logs` (the server's token) are written as `***`.
"""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path

from .paths import cache_folder

MAX_LOG_BYTES = 2 * 2**20
_WRITING = threading.Lock()
_SECRETS: set[str] = set()


def keep_out_of_logs(secret: str) -> None:
    """Write `secret` as `***` wherever it would appear in the error log."""
    if secret:
        _SECRETS.add(secret)


def error_log() -> Path:
    """The file that holds the tracebacks of unexpected failures."""
    folder = cache_folder() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "errors.log"


def log_failure(exc: BaseException, what: str) -> Path | None:
    """Append `exc`'s traceback, stamped with the time and `what` failed, to `error_log()`; None when even the
    log cannot be written (a full disk must not turn one failure into two)."""
    entry = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what} failed\n"
    entry += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n"
    for secret in _SECRETS:
        entry = entry.replace(secret, "***")
    try:
        path = error_log()
        with _WRITING:
            if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
                path.replace(path.with_name(path.name + ".1"))
            with path.open("a", encoding="utf-8") as handle:
                handle.write(entry)
        return path
    except OSError:
        return None


def unexpected(exc: BaseException, what: str) -> str:
    """Log `exc` (`log_failure`) and return one line for the user: what failed, the exception's type, where the
    details are."""
    path = log_failure(exc, what)
    where = f"details in {path}" if path else "the error log could not be written"
    return f"{what} failed unexpectedly ({type(exc).__name__}); {where}"
