"""The compile cache: what it holds and how to empty it (``einfuse cache status|clear``).

Compiled models live in ``$EINFUSE_CACHE`` (default ``~/.cache/einfuse``), one directory per
cache key (``model.so``, ``model.json``, ``kernels.tir``), beside the host's measured peaks
(``peaks-<cpu>-<cores>.json``) and the tuning databases (``tuning/<target>-einfuse<v>-tvm<v>/``,
removed only by ``clear --tuning``: they hold minutes of measurements). Nothing else there is
einfuse's, and ``clear`` leaves it alone.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

_KEY = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class CacheStatus:
    """What the cache directory holds."""

    path: Path
    models: int
    peaks: int
    tuning: int
    bytes: int

    def __str__(self) -> str:
        return (f"{self.path}: {self.models} compiled model(s), {self.peaks} measured-peaks file(s), "
                f"{self.tuning} tuning database(s), {self.bytes / 2**20:.1f} MiB")


def _entries(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    if not path.is_dir():
        return [], [], []
    models = [p for p in path.iterdir() if p.is_dir() and _KEY.fullmatch(p.name)]
    peaks = [p for p in path.glob("peaks-*.json") if p.is_file()]
    tuning = [p for p in (path / "tuning").glob("*-einfuse*-tvm*") if p.is_dir()]
    return models, peaks, tuning


def status(path: Path) -> CacheStatus:
    """Counts and size of what einfuse keeps in ``path``."""
    models, peaks, tuning = _entries(path)
    size = sum(f.stat().st_size for d in models + tuning for f in d.rglob("*") if f.is_file())
    return CacheStatus(path, len(models), len(peaks), len(tuning), size + sum(p.stat().st_size for p in peaks))


def clear(path: Path, tuning: bool = False) -> CacheStatus:
    """Remove every compiled model and peaks file einfuse wrote in ``path`` (and with ``tuning``
    its tuning databases); returns what was there."""
    before = status(path)
    models, peaks, databases = _entries(path)
    for d in models + (databases if tuning else []):
        shutil.rmtree(d)
    for p in peaks:
        p.unlink()
    return before
