"""Comparisons saved into the run store with their whole view, so that the Compare page lists and reopens them.

    save(shown, options, runs_root() / "my-run")     # rows as a run (Runs page, DuckDB) + the view, gzipped wire JSON
    saved_comparisons(runs_root())                   # names, newest first
    shown, options = reopen(runs_root() / "my-run")  # the ComparisonResult and the options it was made with

No Streamlit here; the view is `serving.wire` JSON (no pickle), so a stored file cannot run anything.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import InputError, UserError
from ..evaluation.store import VIEW, RunStore
from ..evaluation.sweep import save_comparison
from ..serving.api import CompareOptions
from .views import ComparisonResult


def save(shown: ComparisonResult, options: CompareOptions, folder: Path) -> RunStore:
    """Store the comparison's rows as a run of one prompt, and its view with the options that made it."""
    from ..serving import wire

    store = save_comparison(shown.comparison, folder)
    record = {"options": options.to_json(), "result": wire.encode(shown)}
    store.write_view(gzip.compress(json.dumps(record).encode("utf-8"), mtime=0))
    return store


def saved_comparisons(root: Path) -> list[str]:
    """Names of the runs under `root` that hold a saved view, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [p.parent for p in root.glob(f"*/{VIEW}")]
    return [p.name for p in sorted(folders, key=lambda p: (p / VIEW).stat().st_mtime, reverse=True)]


def reopen(folder: Path) -> tuple[ComparisonResult, CompareOptions]:
    """The saved view at `folder` and its options; InputError when there is none or it cannot be read."""
    from ..serving import wire

    data = RunStore(folder).view()
    if data is None:
        raise InputError(f"{folder} holds no saved comparison")
    try:
        record = json.loads(gzip.decompress(data))
        shown = wire.decode(record["result"])
        options = CompareOptions.from_json(record["options"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, UserError) as exc:
        raise InputError(f"the saved comparison in {folder} cannot be read ({type(exc).__name__})") from None
    if not isinstance(shown, ComparisonResult):
        raise InputError(f"the saved comparison in {folder} is not a comparison")
    return shown, options
