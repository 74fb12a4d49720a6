"""What every calibrated method shares: generated calibration prompts, the `CalibratedMethod` base (a result
computed once per model and key, kept in memory, stored under `cache_folder()/calibration/<model>/`) and access
to the model through the context."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
import warnings
from abc import abstractmethod
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, ClassVar

import torch

from ..pipeline import runtime
from ..errors import InputError
from ..paths import cache_folder
from ..pipeline.models import LoadedModel
from ..evaluation.prompts import passkey_prompt
from .base import CompressionContext, CompressionMethod

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class CalibrationSet:
    """Generated passkey prompts used for calibration: `prompts` of `sentences` filler sentences, seeds from `seed`.

    20 sentences is a few hundred tokens with the SmolLM2 tokenizer. Never downloaded data.
    """

    prompts: int = 4
    sentences: int = 20
    seed: int = 1000

    @property
    def key(self) -> str:
        return f"cal{self.prompts}x{self.sentences}s{self.seed}"

    def texts(self) -> list[str]:
        return [
            passkey_prompt(n_sentences=self.sentences, depth=(i + 1) / (self.prompts + 1), seed=self.seed + i).text
            for i in range(self.prompts)
        ]


def model_slug(name: str) -> str:
    """A folder name for a model name or path: 'smollm2', '/data/my model' → 'data_my_model'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return slug[-100:]


def model_fingerprint(loaded: LoadedModel) -> str:
    """What a calibration result depends on besides the method's parameters: the model and its numerics."""
    config = loaded.config
    return (
        f"{loaded.name}|L{loaded.num_layers}|H{loaded.num_query_heads}/{loaded.num_kv_heads}"
        f"|d{getattr(config, 'hidden_size', '?')}|{str(loaded.dtype).replace('torch.', '')}"
    )


def calibration_path(loaded: LoadedModel, method: str) -> Path:
    """The method's JSON manifest for this model: every stored result, by calibration key."""
    return cache_folder() / "calibration" / model_slug(loaded.name) / f"{method}.json"


def key_file(manifest: Path, key: str, suffix: str) -> Path:
    """A file of one calibration key beside the manifest: `<method>-<16 hex digits of the key><suffix>`."""
    return manifest.with_name(f"{manifest.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}")


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(handle)` writes: into a temporary file in the same folder, then
    `os.replace`, so readers see the old file or the whole new one, never a part. A failed write leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with temporary.open("xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> dict:
    """Stored results by key from a manifest: {} when there is none; ValueError when it is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError("it holds no 'entries' object")
    return data["entries"]


_manifest_lock = threading.Lock()


def store_entry(path: Path, method: str, model: str, key: str, entry: dict) -> None:
    """Add `entry` under `key` to the manifest (a damaged manifest is started afresh), written atomically."""
    with _manifest_lock:
        try:
            entries = read_manifest(path)
        except (OSError, ValueError):
            entries = {}
        entries[key] = entry
        text = json.dumps({"method": method, "model": model, "entries": entries}, indent=1)
        write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


@contextmanager
def file_lock(path: Path, waiting: Callable[[], None]):
    """An exclusive flock on `path`, across processes; `waiting()` is called first when another holder has it.
    No lock when the file cannot be created (a read-only folder, where nothing is stored either)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def context_model(context, method: str) -> LoadedModel:
    """The model a calibrated method needs, from the compression context."""
    loaded = getattr(context, "loaded", None)
    if loaded is None:
        raise InputError(
            f"{method} calibrates on the model: the compression context must carry it (context.loaded = loaded)"
        )
    return loaded


def report_progress(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


computations: Counter[str] = Counter()  # calibrations computed in this process, by method name


@dataclass
class _Held:
    """A calibration result kept in memory, with the notes about it that no report has shown yet."""

    result: dict
    notes: list[str] = field(default_factory=list)


memo: dict[tuple[str, str], _Held] = {}  # (manifest path, key) → result
_key_locks: dict[tuple[str, str], threading.Lock] = {}
_registry_lock = threading.Lock()


def _described(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


class CalibratedMethod(CompressionMethod):
    """A method that learns something once per model (its calibration) and reuses it.

    `calibrate(loaded, progress)` returns the result (a dict) of `compute_calibration` for `calibration_key`:
    kept in memory per (manifest, key), else read from the manifest `calibration_path` (JSON, results by key),
    else computed and stored. Fields named in `weight_fields` (tensors, or lists and dicts of them) go to
    `<method>-<key hash>.pt` beside the manifest instead, written before the manifest and read with
    `torch.load(weights_only=True)`: tensors whose manifest entry is missing are never read. Within a process
    one thread computes a key while the others wait for its result (a lock per key); across processes a file
    lock per key does the same, and every file is replaced atomically. A stored result that cannot be read or
    does not fit the model (`check_calibration`) is computed again, with a warning, a progress message and a
    note for the next report (`calibration_notes`).
    """

    weight_fields: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def calibration_key(self, loaded: LoadedModel) -> str:
        """Everything the result depends on, `model_fingerprint(loaded)` included: results are stored by it."""

    @abstractmethod
    def compute_calibration(self, loaded: LoadedModel, progress: Progress | None) -> dict:
        """Calibrate on the model, reporting progress(fraction, message): JSON values, except `weight_fields`."""

    def check_calibration(self, loaded: LoadedModel, result: dict) -> None:
        """Raise (any exception) when a stored result does not fit `loaded`: it is then computed again."""

    def stored_alternative(self, loaded: LoadedModel, entries: dict) -> dict | None:
        """A result for this method's key made from other stored entries (the manifest's, by key), or None."""
        return None

    @property
    def calibrates(self) -> bool:
        """Whether this instance learns anything per model at all (ZigZag does only with a parameter set to auto)."""
        return True

    def needs_calibration(self, context: CompressionContext) -> bool:
        """False when this row does not use the calibration."""
        return self.calibrates

    def warm_up(self, context: CompressionContext) -> None:
        """Calibrate before the row is timed, reporting through `context.progress`; later calls find it in memory."""
        if self.needs_calibration(context):
            self.calibrate(context_model(context, self.name), context.progress)

    def calibrate(self, loaded: LoadedModel, progress: Progress | None = None) -> dict:
        """This method's calibration of `loaded`: from memory (silently), else stored, else computed and stored.
        A caller that finds another thread or process computing the same key says so through `progress` and waits
        for its result."""
        manifest = calibration_path(loaded, self.name)
        key = self.calibration_key(loaded)
        slot = (str(manifest), key)
        held = memo.get(slot)
        if held is not None:
            return held.result
        with _registry_lock:
            lock = _key_locks.setdefault(slot, threading.Lock())
        if not lock.acquire(blocking=False):
            report_progress(progress, 0.0, f"{self.name}: waiting for the calibration another session is running")
            lock.acquire()
        try:
            held = memo.get(slot)
            if held is None:
                waiting = partial(report_progress, progress, 0.0,
                                  f"{self.name}: waiting for the calibration another process is running")
                with file_lock(key_file(manifest, key, ".lock"), waiting):
                    held = self._stored_or_computed(loaded, manifest, key, progress)
                memo[slot] = held
        finally:
            lock.release()
        return held.result

    def stored_result(self, loaded: LoadedModel) -> dict | None:
        """This method's calibration of `loaded` when it is in memory or stored and usable, else None; never
        computes anything (for showing what a calibration chose)."""
        manifest = calibration_path(loaded, self.name)
        key = self.calibration_key(loaded)
        held = memo.get((str(manifest), key))
        if held is not None:
            return held.result
        try:
            return self._stored(loaded, manifest, key)
        except Exception:  # a damaged file is reported when the calibration is used, not here
            return None

    def calibration_notes(self, loaded: LoadedModel) -> list[str]:
        """Notes about this calibration that no report has shown yet (a stored file that had to be recomputed)."""
        held = memo.get((str(calibration_path(loaded, self.name)), self.calibration_key(loaded)))
        if held is None:
            return []
        with _registry_lock:
            notes, held.notes = held.notes, []
        return notes

    def _stored_or_computed(self, loaded: LoadedModel, manifest: Path, key: str, progress: Progress | None) -> _Held:
        notes = []
        try:
            result = self._stored(loaded, manifest, key)
        except Exception as error:
            result = None
            notes.append(f"{self.name}: the stored calibration in {manifest.parent} could not be used "
                         f"({_described(error)}), so it was computed again")
            warnings.warn(notes[-1], RuntimeWarning, stacklevel=3)
            report_progress(progress, 0.0, notes[-1])
        if result is not None:
            report_progress(progress, 1.0, f"{self.name}: calibration read from {manifest.parent}")
            return _Held(result, notes)
        result = self.compute_calibration(loaded, progress)
        with _registry_lock:
            computations[self.name] += 1
        try:
            self._store(loaded, manifest, key, result)
        except OSError as error:
            notes.append(f"{self.name}: the calibration could not be stored in {manifest.parent} "
                         f"({_described(error)}); it is kept for this process only")
            warnings.warn(notes[-1], RuntimeWarning, stacklevel=3)
        return _Held(result, notes)

    def _stored(self, loaded: LoadedModel, manifest: Path, key: str) -> dict | None:
        """The stored result for `key`, or one made from other entries; None when there is none. Raises when a
        stored file is damaged or its result does not fit the model."""
        entries = read_manifest(manifest)
        entry = entries.get(key)
        if entry is None:
            result = self.stored_alternative(loaded, entries)
        elif not isinstance(entry, dict):
            raise ValueError(f"the entry is a {type(entry).__name__}, not an object")
        else:
            result = dict(entry)
            if self.weight_fields:
                weights = key_file(manifest, key, ".pt")
                if not weights.exists():
                    return None
                tensors = torch.load(weights, map_location="cpu", weights_only=True)
                if not isinstance(tensors, dict) or tensors.get("key") != key:
                    raise ValueError(f"{weights.name} holds another calibration")
                result.update({name: tensors[name] for name in self.weight_fields})
        if result is not None:
            self.check_calibration(loaded, result)
        return result

    def _store(self, loaded: LoadedModel, manifest: Path, key: str, result: dict) -> None:
        """The tensors file first, then the manifest entry: the entry only ever names complete tensors."""
        if self.weight_fields:
            tensors = {"key": key, **{name: result[name] for name in self.weight_fields}}
            write_atomically(key_file(manifest, key, ".pt"), lambda handle: torch.save(tensors, handle))
        entry = {name: value for name, value in result.items() if name not in self.weight_fields}
        store_entry(manifest, self.name, loaded.name, key, entry)


def shallow_cache(loaded: LoadedModel, source) -> object:
    """A new cache whose dense layers start from `source`'s tensors without copying them.

    Feeding tokens through it replaces the layers' tensors (torch.cat makes new ones), so `source` is untouched.
    """
    cache = runtime.new_cache(loaded)
    cache.layers = [copy.copy(layer) for layer in source.layers]
    return cache


def layer_kind(layer) -> tuple:
    """Layers may only share or merge with layers of the same attention kind (global, or the same sliding window)."""
    return bool(getattr(layer, "is_sliding", False)), getattr(layer, "sliding_window", None)
