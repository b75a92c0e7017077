"""The compile cache and exports on disk: written atomically, checked before they are loaded, a
damaged one rebuilt or refused (a LoadError), never trusted and never a crash; two processes
compiling into one cache; unwritable caches; corrupt peaks and budgets files (docs/compile.md).

What could crash the process on a regression (loading a truncated library: SIGBUS; rewriting a
mapped one: SIGSEGV) runs in a subprocess, so a regression fails its test, not the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.cache import CacheWarning
from einfuse.codegen.persist import FORMAT, valid
from einfuse.errors import EinfuseError, LoadError
from einfuse.ir import interpret, parse
from einfuse.targets import host_cpu, host_peaks
from einfuse.codegen.tuning import TuningDatabase, TuningDatabaseWarning

from ..conftest import rel_err

MATMUL = """cascade matmul
rank M=8, K=16, N=8
tensor A[M,K] input f32
tensor B[K,N] input f32
tensor C[M,N] output f32
C[m,n] = A[m,k] * B[k,n] * {scale}
"""

# A subprocess's prelude: the cascade of scale 1, inputs from the seed in argv[1], and `check`,
# which exits 1 where a model's output is not A B * scale.
PRELUDE = f"""
import sys
import numpy as np, torch, einfuse
from einfuse.ir import parse
TEXT = {MATMUL!r}
g = np.random.default_rng(int(sys.argv[1]))
a = torch.from_numpy(g.standard_normal((8, 16)).astype(np.float32))
b = torch.from_numpy(g.standard_normal((16, 8)).astype(np.float32))
def check(model, scale, what):
    want = (a.double() @ b.double()) * scale
    err = float((model(a, b).double() - want).abs().max() / want.abs().max())
    if err > 1e-5:
        sys.exit(f"{{what}}: relative error {{err}}")
"""


def matmul(scale: float = 1.0) -> einfuse.ir.Cascade:
    return parse(MATMUL.format(scale=scale))


def inputs(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32)))


def check(model: object, rng: np.random.Generator, scale: float = 1.0) -> None:
    """``model`` computes the cascade of ``scale`` (against the float64 interpreter)."""
    a, b = inputs(rng)
    want = interpret(matmul(scale), {"A": a.numpy(), "B": b.numpy()})["C"]
    assert rel_err(model(a, b).numpy(), want) <= 1e-5   # type: ignore[operator]


def run(script: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``PRELUDE + script`` in a fresh Python with ``args``; its output is shown on failure."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    print(done.stdout, done.stderr)
    return done


def entry_of(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """An export of the cascade of scale 1."""
    return einfuse.compile(matmul(), cache_dir=tmp_path / "cache").export(tmp_path / "model")


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip(file: Path) -> None:
    """Flip 256 bytes in the middle of ``file``, keeping its size."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(x ^ 0xFF for x in data[middle:middle + 256])
    file.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "flipped"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(damage: object, tmp_path: Path,
                                                        rng: np.random.Generator) -> None:
    einfuse.compile(matmul(), cache_dir=tmp_path)
    library = entry_of(tmp_path) / "model.so"
    damage(library)   # type: ignore[operator]
    done = run("check(einfuse.compile(parse(TEXT.format(scale=1)), cache_dir=sys.argv[2]), 1, 'rebuilt')",
               rng.integers(1 << 31), tmp_path)
    assert done.returncode == 0   # (before: SIGBUS, -7, on every later compile; or a flipped library trusted)
    assert valid(entry_of(tmp_path))
    check(einfuse.compile(matmul(), cache_dir=tmp_path), rng)


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "model.so"), r"model.so has \d+ bytes where model.json recorded \d+"),
    (lambda d: flip(d / "model.so"), "model.so is damaged: its sha256 differs"),
    (lambda d: truncate(d / "kernels.tir"), "kernels.tir is damaged"),
    (lambda d: truncate(d / "model.json"), "model.json is unreadable: JSONDecodeError"),
    (lambda d: (d / "model.json").unlink(), "does not hold an exported einfuse model"),
], ids=["library-truncated", "library-flipped", "tir-truncated", "json-truncated", "json-missing"])
def test_loading_a_damaged_or_half_written_export_is_a_load_error(damage: object, message: str,
                                                                   exported: Path) -> None:
    damage(exported)   # type: ignore[operator]
    with pytest.raises(LoadError, match=message):
        einfuse.load(exported)


def edit_meta(path: Path, change: object) -> None:
    meta = json.loads((path / "model.json").read_text())
    change(meta)   # type: ignore[operator]
    (path / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(tvm="0.1.0"), r"was built with TVM 0\.1\.0, and this is TVM "),
    (lambda m: m.update(einfuse="0.0.1"), r"was built with einfuse 0\.0\.1, and this is einfuse "),
    (lambda m: m.update(torch="1.0.0"), r"was built with torch 1\.0\.0, and this is torch "),
    (lambda m: m.update(mcpu="pentium"), "was compiled for cpu with mcpu pentium, and this host's is "),
    (lambda m: m.update(format=7), f"has format 7; this einfuse reads format {FORMAT}"),
    (lambda m: m.pop("format"), "has no format version"),
    (lambda m: m.pop("cascade"), "lacks the field 'cascade'"),
    (lambda m: m.update(compile_seconds="fast"), "the field 'compile_seconds' holds str"),
    (lambda m: m.update(target="tpu:v9"), "unknown target"),
    (lambda m: m["files"].pop("model.so"), "the size and sha256 of model.so are missing or malformed"),
    (lambda m: m.update(cascade="cascade broken\nrank M=\n"), "its cascade is malformed"),
    (lambda m: m["kernels"][0].pop("output"), "its cascade is malformed"),
], ids=["tvm", "einfuse", "torch", "mcpu", "format", "no-format", "no-cascade", "bad-type", "target", "no-hash",
        "bad-cascade", "bad-kernel"])
def test_a_foreign_or_tampered_model_json_is_a_load_error_naming_it(change: object, message: str,
                                                                    exported: Path) -> None:
    edit_meta(exported, change)
    with pytest.raises(LoadError, match=message):
        einfuse.load(exported)


def test_export_records_versions_target_and_hashes_and_round_trips(exported: Path, rng: np.random.Generator) -> None:
    meta = json.loads((exported / "model.json").read_text())
    assert {"format", "einfuse", "tvm", "torch", "target", "mcpu", "files"} <= set(meta)
    assert meta["files"]["model.so"]["bytes"] == (exported / "model.so").stat().st_size
    assert len(meta["files"]["model.so"]["sha256"]) == 64
    check(einfuse.load(exported), rng)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["cache", "model"]   # (no temporary left)


def test_exporting_over_a_loaded_model_leaves_it_running(tmp_path: Path, rng: np.random.Generator) -> None:
    done = run("""
        first = einfuse.compile(parse(TEXT.format(scale=1)), cache_dir=sys.argv[2])
        second = einfuse.compile(parse(TEXT.format(scale=0.5)), cache_dir=sys.argv[2])
        first.export(sys.argv[3])
        second.export(sys.argv[4])
        loaded = einfuse.load(sys.argv[3])
        check(loaded, 1, "loaded")
        einfuse.load(sys.argv[4]).export(sys.argv[3])   # (before: copied over the mapped model.so in place)
        check(loaded, 1, "loaded, after a loaded model was exported over its directory")
        check(einfuse.load(sys.argv[3]), 0.5, "the new export")   # (not the library loaded from there before)
        first.export(sys.argv[3])
        check(loaded, 1, "loaded, after a compiled model was exported over its directory")
        check(einfuse.load(sys.argv[3]), 1, "the export of the compiled model")
        """, rng.integers(1 << 31), tmp_path / "cache", tmp_path / "one", tmp_path / "two")
    assert done.returncode == 0


# A: compiles, pausing as it writes its model.json until B is done (or until its directory is
# gone: what the old cache did to a half-written entry it found).
PAUSED = """
    import pathlib, time
    write, paused = pathlib.Path.write_text, pathlib.Path(sys.argv[3])
    def slow_write(self, text, *args, **kwargs):
        if self.name == "model.json" and not paused.exists():
            paused.write_text("")
            limit = time.time() + 300
            while self.parent.exists() and not paused.with_name("resume").exists() and time.time() < limit:
                time.sleep(0.05)
        return write(self, text, *args, **kwargs)
    pathlib.Path.write_text = slow_write
    check(einfuse.compile(parse(TEXT.format(scale=1)), cache_dir=sys.argv[2]), 1, "A")
    """


@pytest.mark.slow
def test_two_processes_compiling_into_one_cache_both_succeed(tmp_path: Path, rng: np.random.Generator) -> None:
    cache, seed = tmp_path / "cache", rng.integers(1 << 31)
    a = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(PAUSED), str(seed), str(cache),
                          str(tmp_path / "paused")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        limit = time.time() + 300
        while not (tmp_path / "paused").exists() and a.poll() is None and time.time() < limit:
            time.sleep(0.05)
        assert (tmp_path / "paused").exists(), a.communicate()
        b = run("check(einfuse.compile(parse(TEXT.format(scale=1)), cache_dir=sys.argv[2]), 1, 'B')", seed, cache)
        (tmp_path / "resume").write_text("")
        out, err = a.communicate(timeout=300)
    finally:
        a.kill()
    print(out, err)
    assert b.returncode == 0 and a.returncode == 0   # (before: B deleted A's entry as A wrote it)
    assert sorted(p.name for p in cache.iterdir()) == [entry_of(cache).name]   # (one entry, no temporaries)
    assert valid(entry_of(cache))
    check(einfuse.compile(matmul(), cache_dir=cache), rng)


def test_an_unwritable_cache_warns_once_and_the_model_works(tmp_path: Path, rng: np.random.Generator) -> None:
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"   # (under a regular file: unwritable, even for root)
    with pytest.warns(CacheWarning, match="cannot write the compile cache .*the model works but is not cached"):
        model = einfuse.compile(matmul(), cache_dir=cache)
    check(model, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)   # (once: not again for the same cache)
        check(einfuse.compile(matmul(0.5), cache_dir=cache), rng, 0.5)


def test_an_unwritable_home_warns_and_the_model_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      rng: np.random.Generator) -> None:
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EINFUSE_CACHE", raising=False)
    with pytest.warns(CacheWarning, match="cannot write the compile cache"):
        model = einfuse.compile(matmul(), tuning_db=False)
    check(model, rng)


def test_exporting_onto_a_file_or_over_other_files_is_refused(tmp_path: Path) -> None:
    model = einfuse.compile(matmul(), cache_dir=tmp_path / "cache")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(EinfuseError, match="it is a file, not a directory"):
        model.export(tmp_path / "file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(EinfuseError, match=r"holds files that are not an einfuse export \(todo.txt\)"):
        model.export(tmp_path / "notes")
    assert (tmp_path / "file").read_text() == (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("text", ["{not json", '{"flops": 0, "bandwidth": 1e10, "cache": 1e11, "launch": 1e-6}',
                                  '{"flops": "fast", "bandwidth": 1e10, "cache": 1e11, "launch": 1e-6}',
                                  '{"flops": NaN, "bandwidth": 1e10, "cache": 1e11, "launch": 1e-6}', "[1, 2]"],
                         ids=["garbage", "zero", "string", "nan", "list"])
def test_a_corrupt_peaks_file_is_measured_again_and_replaced(text: str, tmp_path: Path) -> None:
    path = tmp_path / f"peaks-{host_cpu().tvm['mcpu']}-{host_cpu().cores}.json"
    path.write_text(text)
    with pytest.warns(CacheWarning, match=path.name):
        peaks = host_peaks(tmp_path)
    assert all(np.isfinite(v) and v > 0 for v in peaks.__dict__.values())
    assert json.loads(path.read_text()) == peaks.__dict__   # (rewritten, whole)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_report_with_corrupt_peaks_warns_and_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     rng: np.random.Generator) -> None:
    monkeypatch.setenv("EINFUSE_CACHE", str(tmp_path))
    model = einfuse.compile(matmul(), cache_dir=tmp_path / "models")
    path = tmp_path / f"peaks-{host_cpu().tvm['mcpu']}-{host_cpu().cores}.json"
    path.write_text('{"flops": 0, "bandwidth": 0, "cache": 0, "launch": 0}')   # (before: ZeroDivisionError)
    with pytest.warns(CacheWarning, match="malformed"):
        report = model.report(inputs(rng))
    assert "measured: " in report


@pytest.mark.parametrize("text", ["{not json", '{"a": null}', '{"a": -4}', '{"a": 2.5}', "[4]"],
                         ids=["garbage", "null", "negative", "float", "list"])
def test_corrupt_tuning_budgets_are_ignored_and_rewritten(text: str, tmp_path: Path) -> None:
    database = TuningDatabase(tmp_path)
    (tmp_path / "budgets.json").write_text(text)
    with pytest.warns(TuningDatabaseWarning, match="budgets.json"):
        assert database.budgets() == {}    # (before: TypeError for null and a list)
    with pytest.warns(TuningDatabaseWarning):
        database.record_budgets({"b": 8})
    assert json.loads((tmp_path / "budgets.json").read_text()) == {"b": 8}
    assert database.budgets() == {"b": 8}


def test_clear_removes_what_interrupted_writes_left(tmp_path: Path) -> None:
    from einfuse import cache
    (tmp_path / f".{'0' * 24}.tmp-0123abcd").mkdir()       # (a compile killed while writing its entry)
    (tmp_path / f".{'1' * 24}.old-0123abcd").mkdir()       # (... while replacing a damaged one)
    (tmp_path / ".peaks-x-2.json.tmp-89abcdef").write_text("{")
    (tmp_path / ".notes.txt").write_text("not einfuse's")
    assert cache.status(tmp_path).bytes == 1
    cache.clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".notes.txt"]
