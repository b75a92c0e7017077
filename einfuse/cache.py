"""The compile cache: what it holds, how to empty it (``einfuse cache status|clear``), and how
einfuse writes files: never in place.

Compiled models live in ``$EINFUSE_CACHE`` (default ``~/.cache/einfuse``), one directory per
cache key (``model.so``, ``model.json``, ``kernels.tir``), beside the host's measured peaks
(``peaks-<cpu>-<cores>.json``) and the tuning databases (``tuning/<target>-einfuse<v>-tvm<v>/``,
removed only by ``clear --tuning``: they hold minutes of measurements). Nothing else there is
einfuse's, and ``clear`` leaves it alone.

Every file einfuse writes goes to a temporary name beside its place and is renamed there
(:func:`write_atomic`); a directory (a cache entry, an export) is built in a temporary directory
beside it and renamed into place (:func:`staged_dir`, :func:`install_dir`). A reader sees the old
file or the new one, never part of one, and a file a process has memory-mapped (a loaded
``model.so``) is never rewritten: a replaced one keeps its inode until it is unmapped.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

_KEY = re.compile(r"[0-9a-f]{24}")
_LEFTOVER = re.compile(r"\.([0-9a-f]{24}|peaks-.+\.json)\.(tmp|old)-[0-9a-f]{8}")   # (left by a killed writer)
_warned: set[str] = set()


def default_cache_dir() -> Path:
    """Where compiled models are cached: ``$EINFUSE_CACHE`` or ``~/.cache/einfuse``."""
    return Path(os.environ.get("EINFUSE_CACHE", Path.home() / ".cache" / "einfuse"))


class CacheWarning(UserWarning):
    """A cache file could not be read or written; einfuse goes on without it."""


def warn_once(key: str, message: str, category: type[Warning] = CacheWarning) -> None:
    """``warnings.warn(message)`` the first time this process meets ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


def _fresh(path: Path, kind: str) -> Path:
    """A new name beside ``path`` for its temporary (``tmp``) or set-aside (``old``) copy."""
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name beside it, renamed into place."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path, "tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A new empty directory beside ``dest`` to build it in (:func:`install_dir` moves it to
    ``dest``); removed on exit if it is still there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = _fresh(dest, "tmp")
    staged.mkdir()   # (the umask's mode, not mkdtemp's 0o700: an export is for others to read)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def install_dir(staged: Path, dest: Path, keep: Callable[[Path], bool] = lambda _: False) -> bool:
    """Rename ``staged`` to ``dest``; whether it was installed. An existing ``dest`` stays where
    ``keep(dest)`` (a valid cache entry another process wrote first), else it is renamed aside and
    then removed, never rewritten: a process that mapped a library from it keeps a valid file."""
    for _ in range(8):
        try:
            os.rename(staged, dest)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if keep(dest):
            return False
        old = _fresh(dest, "old")
        try:
            os.rename(dest, old)
        except FileNotFoundError:
            continue   # (another process set it aside first)
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(errno.EBUSY, "another process keeps replacing it", str(dest))


def positive(value: Any) -> bool:
    """Whether ``value`` is a positive finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_json(path: Path, valid: Callable[[Any], bool], category: type[Warning] = CacheWarning) -> Any:
    """What the JSON file ``path`` holds, or None where it is missing; one that cannot be read
    or parsed, or that ``valid`` refuses, is reported (a ``category`` warning) and is None."""
    try:
        data = json_loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path} is unreadable and is ignored ({type(exc).__name__}: {exc})", category, stacklevel=3)
        return None
    if not valid(data):
        warnings.warn(f"{path} holds malformed values and is ignored", category, stacklevel=3)
        return None
    return data


def json_loads(text: str) -> Any:
    """``json.loads`` refusing NaN and infinities (which the json module accepts)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")
    return json.loads(text, parse_constant=refuse)


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


def _entries(path: Path) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    if not path.is_dir():
        return [], [], [], []
    models = [p for p in path.iterdir() if p.is_dir() and _KEY.fullmatch(p.name)]
    peaks = [p for p in path.glob("peaks-*.json") if p.is_file()]
    tuning = [p for p in (path / "tuning").glob("*-einfuse*-tvm*") if p.is_dir()]
    leftovers = [p for p in path.iterdir() if _LEFTOVER.fullmatch(p.name)]
    return models, peaks, tuning, leftovers


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def status(path: Path) -> CacheStatus:
    """Counts and size of what einfuse keeps in ``path``."""
    models, peaks, tuning, leftovers = _entries(path)
    return CacheStatus(path, len(models), len(peaks), len(tuning), sum(map(_size, models + peaks + tuning + leftovers)))


def clear(path: Path, tuning: bool = False) -> CacheStatus:
    """Remove every compiled model and peaks file einfuse wrote in ``path``, and what writes
    that were interrupted left (with ``tuning``, its tuning databases too); returns what was there."""
    before = status(path)
    models, peaks, databases, leftovers = _entries(path)
    for p in models + (databases if tuning else []) + peaks + leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return before
