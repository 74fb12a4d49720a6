"""Helpers every calibrated method shares: generated calibration prompts, JSON storage of what was learned
under `cache_folder()/calibration/<model>/<method>.json`, and access to the model through the context."""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..pipeline import runtime
from ..errors import InputError
from ..pipeline.models import LoadedModel, cache_folder
from ..evaluation.prompts import passkey_prompt

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
    return cache_folder() / "calibration" / model_slug(loaded.name) / f"{method}.json"


_store_lock = threading.Lock()


def stored_entries(loaded: LoadedModel, method: str) -> dict:
    """Every stored calibration result of `method` for this model, by key (empty when none or unreadable)."""
    path = calibration_path(loaded, method)
    try:
        with _store_lock:
            data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def load_calibration(loaded: LoadedModel, method: str, key: str) -> dict | None:
    """The stored calibration result for `key`, or None."""
    entry = stored_entries(loaded, method).get(key)
    return entry if isinstance(entry, dict) else None


def save_calibration(loaded: LoadedModel, method: str, key: str, result: dict) -> Path:
    """Add `result` under `key` to the method's JSON file for this model (atomic replace)."""
    path = calibration_path(loaded, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _store_lock:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError
        except (OSError, ValueError):
            data = {"method": method, "model": loaded.name, "entries": {}}
        data["entries"][key] = result
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(data, indent=1))
        temporary.replace(path)
    return path


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
