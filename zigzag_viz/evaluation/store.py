"""Stage 6, stored runs: a folder per run holding `manifest.json` and Parquet shards (and, for a comparison saved
from the Compare page, `view.json.gz`: the whole view, to reopen it), queried with DuckDB.

    store = RunStore.open(Path("runs/smoke"), settings)   # refuses a folder that holds another run's settings
    done = store.done_keys()                             # {(task, family, sample, length, depth, budget, method, mode)}
    store.write_shard(rows)                              # whole or not at all (temporary file, then rename)
    runs_table(Path("runs")); summary(store); export(store, "csv", Path("out.csv"))

A shard that cannot be read (cut short by a crash of the disk, edited by hand) is named in a warning and its rows
count as not done, so the next run recomputes them; nothing else in the folder is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
import time
import uuid
import warnings
from importlib import metadata
from pathlib import Path

import pandas as pd

from ..errors import InputError

KEY_COLUMNS = ("task", "family", "sample", "length", "depth", "budget", "method", "mode")
MANIFEST = "manifest.json"
VIEW = "view.json.gz"
SHARD_GLOB = "shard-*.parquet"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a temporary sibling, flushed, then renamed over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp makes 0600; a stored run or export is an ordinary file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _versions() -> dict:
    names = ("zigzag-viz", "torch", "transformers", "pandas", "pyarrow", "duckdb")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_run_name(name: str) -> str:
    """A run name usable as one folder: letters, digits, '.', '-', '_' (no '..', no separators, no NUL)."""
    if not name or name in (".", "..") or len(name) > 120 or not all(c.isalnum() or c in "._-" for c in name):
        raise InputError(f"a run name holds letters, digits, '.', '-' and '_' only, got {name!r:.60}")
    return name


class RunStore:
    """One run's folder: its manifest (settings, model, versions, git commit, status, rows done) and shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def open(cls, folder: Path, settings: dict) -> RunStore:
        """The run at `folder`, created for `settings` when new; InputError when it holds another run's settings."""
        store = cls(folder)
        manifest = store.manifest() if (store.folder / MANIFEST).exists() else None
        if manifest is not None:
            if manifest.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                                 if settings.get(k) != manifest.get("settings", {}).get(k))
                raise InputError(f"{store.folder} holds a run with other settings ({', '.join(changed[:4])}): "
                                 "choose another run name (--out) or the same settings")
            return store
        store.folder.mkdir(parents=True, exist_ok=True)
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        store._write_manifest({"settings": settings, "versions": _versions(), "git_commit": _git_commit(),
                               "status": "created", "rows_done": 0, "rows_total": None, "created": now, "updated": now})
        return store

    def manifest(self) -> dict:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"no run at {self.folder} (no {MANIFEST})") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"the run manifest {path} cannot be read ({type(exc).__name__})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise InputError(f"the run manifest {path} is not a manifest of this tool")
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        _atomic_write(self.folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))

    def update(self, **fields) -> None:
        """Change manifest fields (status, rows_done, rows_total, …), atomically."""
        manifest = self.manifest()
        manifest.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._write_manifest(manifest)

    @contextlib.contextmanager
    def writing(self):
        """Hold the run for one writer (an flock on the run's folder itself, so the folder keeps only the manifest
        and shards); InputError at once when another process is writing it."""
        handle = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"another sweep is writing {self.folder} now") from None
            yield self
        finally:
            os.close(handle)

    def remove_leftovers(self) -> None:
        """Delete the temporary files a killed writer left (call only from the run's one writer)."""
        for path in self.folder.glob(".*"):
            if path.is_file() and path.name.startswith((".shard-", f".{MANIFEST}.", f".{VIEW}.")):
                path.unlink(missing_ok=True)

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_GLOB))

    def readable_shards(self) -> list[Path]:
        """Shards whose Parquet footer reads; a damaged one is named in a warning and left out."""
        import pyarrow.parquet as pq

        readable = []
        for shard in self.shards():
            try:
                pq.read_metadata(shard)
            except Exception as exc:  # pyarrow raises several types for damaged files
                warnings.warn(f"skipping the damaged shard {shard} ({type(exc).__name__}); its rows will be "
                              "computed again", stacklevel=2)
                continue
            readable.append(shard)
        return readable

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Every row of the readable shards (empty with no shard)."""
        shards = self.readable_shards()
        if not shards:
            return pd.DataFrame(columns=columns or list(KEY_COLUMNS))
        return pd.concat([pd.read_parquet(shard, columns=columns) for shard in shards], ignore_index=True)

    def done_keys(self) -> set[tuple]:
        """Keys (KEY_COLUMNS) of every row already stored."""
        frame = self.frame(list(KEY_COLUMNS))
        return {tuple(row) for row in frame.itertuples(index=False, name=None)}

    def write_shard(self, rows: list[dict], schema=None) -> Path:
        """Store `rows` as one new Parquet shard (columns typed by the pyarrow `schema` when given, so that a
        column that is empty in one shard keeps its type), whole or not at all."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            raise ValueError("no rows to store")
        table = pa.Table.from_pylist(rows, schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        buffer = sink.getvalue().to_pybytes()
        path = self.folder / f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        _atomic_write(path, buffer)
        return path

    def write_view(self, data: bytes) -> Path:
        """Store a saved comparison's whole view (gzipped JSON made by the caller), whole or not at all."""
        _atomic_write(self.folder / VIEW, data)
        return self.folder / VIEW

    def view(self) -> bytes | None:
        """The saved view's bytes, or None when this run has none."""
        try:
            return (self.folder / VIEW).read_bytes()
        except FileNotFoundError:
            return None

    def size_bytes(self) -> int:
        extra = [self.folder / MANIFEST] + [p for p in [self.folder / VIEW] if p.exists()]
        return sum(p.stat().st_size for p in self.shards() + extra)


def runs_table(root: Path) -> pd.DataFrame:
    """One line per run under `root`: name, status, model, rows done of total, size (bytes), created, updated."""
    lines = []
    for folder in sorted(p for p in Path(root).iterdir() if (p / MANIFEST).exists()) if Path(root).is_dir() else []:
        try:
            manifest = RunStore(folder).manifest()
        except InputError as exc:
            warnings.warn(str(exc), stacklevel=2)
            continue
        lines.append({"run": folder.name, "status": manifest.get("status"), "model": manifest["settings"].get("model"),
                      "rows_done": manifest.get("rows_done"), "rows_total": manifest.get("rows_total"),
                      "size_bytes": RunStore(folder).size_bytes(), "created": manifest.get("created"),
                      "updated": manifest.get("updated")})
    return pd.DataFrame(lines, columns=["run", "status", "model", "rows_done", "rows_total", "size_bytes", "created",
                                        "updated"])


def _query(store: RunStore, sql: str) -> pd.DataFrame:
    """`sql` over the run's readable shards, which it reads as the view `rows` (DuckDB)."""
    import duckdb

    shards = store.readable_shards()
    if not shards:
        raise InputError(f"the run at {store.folder} holds no rows yet")
    with duckdb.connect() as connection:
        connection.read_parquet([str(s) for s in shards], union_by_name=True).create_view("rows")
        return connection.execute(sql).df()


def summary(store: RunStore) -> pd.DataFrame:
    """Mean score, kv fraction and KL per task, method, mode and kept fraction, with the number of prompts."""
    return _query(store, """
        SELECT task, method, mode, budget, count(*) FILTER (WHERE NOT isnan(score)) AS prompts,
               round(avg(score) FILTER (WHERE NOT isnan(score)), 4) AS score,
               round(avg(kv_fraction), 4) AS kv_fraction, round(avg(kl_mean), 4) AS kl_mean
        FROM rows GROUP BY ALL ORDER BY task, mode, method, budget""")


def _json_list(values) -> str:
    return json.dumps([v.item() if hasattr(v, "item") else v for v in values])


def export(store: RunStore, fmt: str, out: Path) -> Path:
    """Every row of the run into one CSV or Parquet file at `out` (written whole or not at all)."""
    if fmt not in ("csv", "parquet"):
        raise InputError(f"export format must be csv or parquet, got {fmt!r:.20}")
    frame = _query(store, f"SELECT * FROM rows ORDER BY {', '.join(KEY_COLUMNS)}")
    if fmt == "csv":
        frame = frame.assign(**{c: frame[c].map(_json_list) for c in ("layer_budgets", "expected") if c in frame})
        data = frame.to_csv(index=False).encode("utf-8")
    else:
        data = frame.to_parquet(index=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, data)
    return out
