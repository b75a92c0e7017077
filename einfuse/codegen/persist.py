"""A compiled model on disk: ``model.so`` (kernels, graph, weights), ``kernels.tir`` and
``model.json`` (the cascade, the versions and target it was built for, and each file's size and
sha256). Written by :func:`export` (and the compile cache, :func:`store`), read by :func:`read`.

An export is built in a fresh directory beside its destination and renamed into place
(:mod:`einfuse.cache`), so a reader sees a whole export or none; one it replaces is set aside,
never rewritten, so a process that loaded its library keeps running. :func:`read` checks
``model.json``'s fields and versions and every file's size and sha256 before the library is
loaded: a damaged, half-written, tampered or foreign export is a :class:`~einfuse.errors.LoadError`,
never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import tvm_ffi

from ..cache import install_dir, json_loads, staged_dir
from ..errors import EinfuseError, LoadError
from ..ir import Cascade, parse, to_text
from ..ir.kernels import Kernel, kernel_from_record, kernel_record
from ..version import versions
from .tuning import TuningDatabase

FORMAT = 2   # (model.json's layout; a reader of another refuses it)
LIBRARY, META, TIR = "model.so", "model.json", "kernels.tir"
EXPORT_FILES = frozenset({LIBRARY, META, TIR, "report.txt"})   # (what an export directory may hold)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int, "einfuse": str, "tvm": str, "torch": str, "target": str, "mcpu": (str, type(None)),
    "cascade": str, "compile_seconds": (int, float), "tuned": list, "tuning": (str, type(None)), "files": dict,
    "size_ranges": dict, "kernels": list}
_VERSIONS = {"einfuse": "einfuse", "tvm": "TVM", "torch": "torch"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Library:
    """A ``model.so`` checked against the size and sha256 ``model.json`` recorded. The file
    stays open, so the bytes checked are the bytes loaded and the bytes a re-export copies,
    whatever is renamed over its path later."""

    def __init__(self, path: Path, record: Mapping[str, Any]) -> None:
        self.path = path
        self.sha256 = record["sha256"]
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        if size != record["bytes"]:
            self._file.close()
            raise LoadError(f"{path} has {size} bytes where {META} recorded {record['bytes']}: it is damaged "
                            "or was not written completely")
        if _sha256(self._file) != self.sha256:
            self._file.close()
            raise LoadError(f"{path} is damaged: its sha256 differs from the one {META} recorded")

    def module(self) -> Any:
        """The loaded library. It is opened through a link of a new name to the open file: the
        dynamic loader hands back the library it loaded before under the same name, even where
        another file has been renamed over that name since."""
        own = Path(f"/proc/self/fd/{self._file.fileno()}")
        with tempfile.TemporaryDirectory(prefix="einfuse-load-") as scratch:
            link = Path(scratch) / LIBRARY
            link.symlink_to(own if own.exists() else self.path.resolve())
            return tvm_ffi.load_module(str(link))

    def copy_to(self, dest: Path) -> None:
        """Write the checked bytes to ``dest``, checking them again on the way."""
        with open(dest, "wb") as out:
            digest = _sha256(self._file, out)
        if digest != self.sha256:
            raise LoadError(f"{self.path} changed on disk since it was loaded; compile the model again to export it")


def export(model: Any, path: str | Path, extra: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` (a CompiledModel) into directory ``path``, with the text files ``extra``
    (name -> text, such as the CLI's ``report.txt``); an export already there is replaced (one
    a link points to: in its place)."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    check_destination(path)
    with staged_dir(path) as staged:
        write(model, staged, extra)
        install_dir(staged, path)
    return path


def store(model: Any, entry: Path) -> bool:
    """Write ``model`` as the cache entry ``entry`` unless a valid one is already there (another
    process wrote it first); whether this one was installed. A damaged entry is replaced."""
    with staged_dir(entry) as staged:
        write(model, staged)
        return install_dir(staged, entry, keep=valid)


def check_destination(path: Path) -> None:
    """Refuse to export to ``path`` where that would lose something (a file, or a directory
    holding files that are not an einfuse export) or cannot work (under a file, or in a
    directory this process cannot write)."""
    if path.exists() and not path.is_dir():
        raise EinfuseError(f"cannot export to {path}: it is a file, not a directory")
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise EinfuseError(f"cannot export to {path}: {above} is a file, not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise EinfuseError(f"cannot export to {path}: the directory {above} is not writable")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES) if path.is_dir() else []
    if foreign:
        raise EinfuseError(f"cannot export to {path}: it holds files that are not an einfuse export "
                           f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); choose a new directory")


def write(model: Any, directory: Path, extra: Mapping[str, str] | None = None) -> None:
    """The files of ``model`` in the (new, private) ``directory``, ``model.json`` last."""
    library = directory / LIBRARY
    checked = model._library or model.stored
    if checked is not None:   # (checked bytes: a loaded model's, or its cache entry's; linking the
        checked.copy_to(library)   # library again after it has run makes TVM print warnings)
    else:
        model.executable.export_library(str(library))
    (directory / TIR).write_text(model.source("tir"))
    meta = {"format": FORMAT, **versions(), "target": model.target, "mcpu": _mcpu(model.backend.target),
            "cascade": to_text(model.ir), "compile_seconds": model.compile_seconds, "tuned": list(model.tuned),
            "tuning": str(model.tuning.path) if model.tuning is not None else None,
            "files": {name: _record(directory / name) for name in (LIBRARY, TIR)},
            "size_ranges": {name: list(bounds) for name, bounds in model.ir.size_ranges.items()},
            "kernels": [kernel_record(k) for k in model.kernels]}
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    (directory / META).write_text(json.dumps(meta, indent=1))


@dataclass(frozen=True)
class Export:
    """What an export directory holds, checked and loaded (:func:`read`)."""

    cascade: Cascade
    executable: Any
    kernels: list[Kernel]
    meta: dict[str, Any]
    tir: str
    library: Library
    tuning: Any


def read(path: str | Path) -> Export:
    """The model exported in directory ``path``, every file checked before its library is
    loaded; a :class:`~einfuse.errors.LoadError` says what is wrong."""
    path = Path(path)
    if not (path / LIBRARY).is_file() or not (path / META).is_file():
        raise LoadError(f"{path} does not hold an exported einfuse model ({LIBRARY}, {META})")
    meta = read_meta(path)
    try:
        library = Library(path / LIBRARY, meta["files"][LIBRARY])
        tir = _read_checked(path / TIR, meta["files"][TIR])
    except OSError as exc:
        raise LoadError(f"{path}: cannot read {exc.filename}: {exc.strerror}") from None
    try:
        cascade = replace(parse(meta["cascade"]), size_ranges=_size_ranges(meta["size_ranges"]))
        kernels = [kernel_from_record(cascade, k) for k in meta["kernels"]]
        cascade = replace(cascade, groups=tuple(kernels))
    except (EinfuseError, KeyError, TypeError) as exc:
        raise LoadError(f"{path / META}: its cascade is malformed: {exc}") from None
    try:
        executable = library.module()
    except Exception as exc:   # (the checks passed: TVM's own error, named)
        raise LoadError(f"{path / LIBRARY} could not be loaded: {type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[-1]}") from None
    tuning = TuningDatabase.at(Path(meta["tuning"])) if meta["tuning"] else None
    return Export(cascade, executable, kernels, meta, tir, library, tuning)


def _size_ranges(ranges: Mapping[str, Any]) -> dict[str, tuple[int, int | None]]:
    """The ``Dim`` ranges as ``model.json`` records them (``name: [min, max or null]``), checked."""
    def bound(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not all(isinstance(v, list) and len(v) == 2 and bound(v[0]) and (v[1] is None or bound(v[1]))
               for v in ranges.values()):
        raise EinfuseError(f"size_ranges must map each size to [min, max or null], not {ranges!r}")
    return {name: (lo, hi) for name, (lo, hi) in ranges.items()}


def stored_library(entry: Path) -> Library | None:
    """The checked library of the export or cache entry ``entry``, or None where it has none."""
    try:
        return Library(entry / LIBRARY, read_meta(entry)["files"][LIBRARY])
    except (LoadError, OSError):
        return None


def valid(path: Path) -> bool:
    """Whether ``path`` holds an export that :func:`load` would accept (its library not loaded)."""
    try:
        meta = read_meta(path)
        Library(path / LIBRARY, meta["files"][LIBRARY])
        _read_checked(path / TIR, meta["files"][TIR])
    except (LoadError, OSError):
        return False
    return True


def read_meta(path: Path) -> dict[str, Any]:
    """``path``'s ``model.json``, its fields and versions checked."""
    file = path / META
    try:
        meta = json_loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{file} is unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise LoadError(f"{file} has no format version: it was written by an older einfuse, or is not einfuse's; "
                        "compile the model again")
    if meta["format"] != FORMAT:
        raise LoadError(f"{file} has format {meta['format']!r}; this einfuse reads format {FORMAT}")
    for key, kind in _FIELDS.items():
        if key not in meta:
            raise LoadError(f"{file} lacks the field '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise LoadError(f"{file}: the field '{key}' holds {type(meta[key]).__name__} {meta[key]!r:.60}")
    for name in (LIBRARY, TIR):
        record = meta["files"].get(name)
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and record["bytes"] >= 0
                and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
            raise LoadError(f"{file}: the size and sha256 of {name} are missing or malformed")
    if not all(isinstance(k, str) for k in meta["tuned"]):
        raise LoadError(f"{file}: the field 'tuned' holds something other than kernel names")
    _check_versions(meta, file)
    return meta


def _check_versions(meta: dict[str, Any], file: Path) -> None:
    for key, value in versions().items():
        if meta[key] != value:
            raise LoadError(f"{file.parent} was built with {_VERSIONS[key]} {meta[key]}, and this is "
                            f"{_VERSIONS[key]} {value}: compile the model again")
    try:
        mcpu = _mcpu(meta["target"])
    except EinfuseError as exc:
        raise LoadError(f"{file}: unknown target: {exc}") from None
    if meta["mcpu"] != mcpu:
        raise LoadError(f"{file.parent} was compiled for {meta['target']} with mcpu {meta['mcpu']}, and this host's "
                        f"is {mcpu} (einfuse.targets.host_cpu): compile the model here")


def _mcpu(target: Any) -> str | None:
    """The LLVM CPU name of a target (a Target or its name) that has one (a CPU), else None."""
    from ..targets import Target
    mcpu = Target.parse(target).tvm.get("mcpu")
    return str(mcpu) if mcpu else None


def _record(file: Path) -> dict[str, Any]:
    """A file's size and sha256, as ``model.json`` records them."""
    with open(file, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": _sha256(f)}


def _sha256(file: BinaryIO, copy: BinaryIO | None = None) -> str:
    """The sha256 of the whole of the open ``file`` (read from its start), copied to ``copy``."""
    digest = hashlib.sha256()
    file.seek(0)
    while chunk := file.read(1 << 20):
        digest.update(chunk)
        if copy is not None:
            copy.write(chunk)
    return digest.hexdigest()


def _read_checked(file: Path, record: Mapping[str, Any]) -> str:
    """The text of ``file`` if its size and sha256 are the recorded ones."""
    data = file.read_bytes()
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise LoadError(f"{file} is damaged: its size or sha256 differs from the one {META} recorded")
    return data.decode()
