"""einfuse.compile on the CPU: every zoo model against eager, dynamic shapes, inputs, errors, export."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from benchmarks.capture_zoo import fresh
from einfuse import zoo
from einfuse.codegen.runtime import InputError
from einfuse.errors import CompileError
from einfuse.ir import parse
from tests.conftest import params

warnings.filterwarnings("ignore", category=FutureWarning)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", params(list(zoo.BUILDERS), slow=("gpt2", "llama", "bert", "vit", "mixtral")))
def test_zoo_model_compiles_and_matches_eager(name: str, cache: Path, rng: np.random.Generator) -> None:
    model, example = zoo.build(name)
    compiled = einfuse.compile(model, example, cache_dir=cache)
    args = fresh(name, example, rng)
    with torch.no_grad():
        want = model(*args)
    assert rel(compiled(*args), want) <= 1e-4


@pytest.mark.slow
def test_one_dynamic_compile_serves_two_lengths(cache: Path, rng: np.random.Generator) -> None:
    model, example = zoo.build("llama")
    seq = torch.export.Dim("seq", min=2, max=256)
    compiled = einfuse.compile(model, example, dynamic_shapes={"input_ids": {1: seq}}, cache_dir=cache)
    for length in (9, 40):
        ids = torch.from_numpy(rng.integers(0, 96, (1, length)))
        with torch.no_grad():
            assert rel(compiled(ids), model(ids)) <= 1e-4


@pytest.fixture(scope="module")
def mlp(cache: Path) -> tuple:
    model, example = zoo.build("mlp")
    return model, einfuse.compile(model, example, cache_dir=cache)


def test_unaligned_and_non_contiguous_inputs_are_copied_not_crashed(mlp: tuple, rng: np.random.Generator) -> None:
    model, compiled = mlp
    wide = torch.from_numpy(rng.standard_normal((64, 300)).astype(np.float32))
    strided = wide[:, 7:263]                      # non-contiguous view
    flat = torch.from_numpy(rng.standard_normal(64 * 256 + 1).astype(np.float32))
    shifted = flat[1:].view(64, 256)              # contiguous but 4 bytes past an aligned start
    assert shifted.data_ptr() % 64 != 0
    with torch.no_grad():
        for x in (strided, shifted, strided.t().contiguous().t()):
            assert rel(compiled(x), model(x)) <= 1e-4


def test_wrong_inputs_are_refused_clearly(mlp: tuple) -> None:
    _, compiled = mlp
    with pytest.raises(InputError, match=re.escape("expected 1 input(s) (input), got 2")):
        compiled(torch.zeros(64, 256), torch.zeros(1))
    with pytest.raises(InputError, match=re.escape(
            "input 'input' has dtype torch.float64; the model was compiled for torch.float32")):
        compiled(torch.zeros(64, 256, dtype=torch.float64))
    with pytest.raises(InputError, match=re.escape(
            "'input' dimension 1 (rank D) has extent 100 but the cascade declares 256")):
        compiled(torch.zeros(64, 100))
    with pytest.raises(InputError, match=re.escape("'input' has 1 dimensions (256,) but is declared with 2 ranks [B,D]")):
        compiled(torch.zeros(256))


def test_a_kernel_tvm_cannot_build_is_a_compile_error_with_a_reproducer(cache: Path) -> None:
    cascade = parse("cascade routing\nrank T=4, E=3\ntensor X[T,E] input f32\ntensor Y[T,E] output f32\n"
                    "Y[t,e] = X[t,e] :: populate[e] topk(2)\n")
    with pytest.raises(CompileError) as info:
        einfuse.compile(cascade, cache_dir=cache)
    message = str(info.value)
    assert message.startswith("kernel k0_Y: CompileError: kernel k0_Y: populate (topk) has no CPU code "
                              "generation yet (reproducer: ")
    text = Path(info.value.reproducer).read_text()
    assert text.startswith("# einfuse could not compile kernel k0_Y, which computes:\n"
                           "#   Y[t,e] = X[t,e] :: populate[e] topk(2)\ncascade routing\n")
    assert parse(text) == cascade


def test_export_and_load_round_trip(mlp: tuple, tmp_path: Path, rng: np.random.Generator) -> None:
    model, compiled = mlp
    compiled.export(tmp_path / "mlp")
    loaded = einfuse.load(tmp_path / "mlp")
    x = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32))
    assert torch.equal(loaded(x), compiled(x))
    assert loaded.ir == compiled.ir
    assert "k0_gelu" in loaded.report()      # the GEMM with its bias and GELU epilogue
    with pytest.raises(einfuse.errors.EinfuseError, match="does not hold an exported einfuse model"):
        einfuse.load(tmp_path / "nothing")


def test_second_compile_loads_from_the_cache(cache: Path) -> None:
    model, example = zoo.build("mlp")
    first = einfuse.compile(model, example, cache_dir=cache)
    second = einfuse.compile(model, example, cache_dir=cache)
    assert second.compile_seconds == first.compile_seconds  # loaded: the recorded time of the build


def test_sources_and_report(tmp_path: Path) -> None:
    compiled = einfuse.compile(*zoo.build("mlp"), cache_dir=tmp_path)
    assert "def k0_gelu(" in compiled.source("tir")
    assert "k0_gelu" in compiled.source("llvm")
    assert "zmm" in compiled.source("asm") or "ymm" in compiled.source("asm")
    report = compiled.report((torch.zeros(64, 256),)).splitlines()
    assert report[0].split() == ["kernel", "einsums", "FLOPs", "bytes", "predicted", "ms", "bound", "ms", "share"]
    assert report[1].split()[5] in ("compute", "memory", "cache", "launch")   # (what bounds the estimate)
    assert report[-1].startswith("measured: ")


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path, rng: np.random.Generator) -> None:
    model, example = zoo.build("mlp")
    einfuse.compile(model, example, cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (entry / "model.so").write_bytes(b"not a library")
    rebuilt = einfuse.compile(model, example, cache_dir=tmp_path)
    x = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32))
    with torch.no_grad():
        assert rel(rebuilt(x), model(x)) <= 1e-4


def test_a_kernel_that_fails_only_in_the_whole_module_is_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When TVM fails on the whole model, each kernel is compiled alone to name the one at fault."""
    import tvm
    cascade = parse("cascade two\nrank M=4, N=8\ntensor X[M,N] input f32\ntensor Y[M,N] output f32\n"
                    "tensor Z[M,N] output f32\nY[m,n] = exp(X[m,n])\nZ[m,n] = X[m,n] + 1\n")
    real = tvm.compile

    def failing(module: object, target: object = None) -> object:
        if any(gv.name_hint.endswith("_Z") for gv in module.functions):   # type: ignore[attr-defined]
            raise ValueError("Check failed: made up")
        return real(module, target=target)
    monkeypatch.setattr(tvm, "compile", failing)
    with pytest.raises(CompileError, match=r"^kernel k1_Z \(single\) for cpu: ValueError: Check failed: made up"):
        einfuse.compile(cascade, cache_dir=cache)


def test_an_integer_count_of_comparisons_vectorizes(cache: Path, rng: np.random.Generator) -> None:
    """Top-k's indices (Mixtral's router): an integer sum over ``(rank == j)``; a bool-to-integer
    cast on a vector is a select (TVM refused the cast: "IntImm can only take scalar")."""
    from einfuse.ir import interpret
    cascade = parse("cascade topk\nrank R=12, E=4, E_2=4, J=2\ntensor S[R,E] input f32\ntensor K[R,E] i64\n"
                    "tensor T[R,J] i64\ntensor O[R,J] output i64\n"
                    "K[r,e] = or(S[r,e_2] > S[r,e], and(S[r,e_2] == S[r,e], idx(e_2) < idx(e)))\n"
                    "T[r,j] = idx(e) * (K[r,e] == idx(j))\nO[r,j] = T[r,j]\n")
    s = rng.standard_normal((12, 4)).astype(np.float32)
    got = einfuse.compile(cascade, cache_dir=cache)(torch.from_numpy(s)).numpy()
    assert (got == interpret(cascade, {"S": s})["O"]).all()
