"""Where zigzag_viz keeps the files it builds: one folder, light to import (no torch)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder() -> Path:
    """Where zigzag_viz keeps files it builds once (ZIGZAG_VIZ_CACHE, else ~/.cache/zigzag_viz)."""
    folder = Path(os.environ.get("ZIGZAG_VIZ_CACHE", Path.home() / ".cache" / "zigzag_viz"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
