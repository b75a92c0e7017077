"""accel:fusemax: the timing model's binding and arithmetic, tensorized C that runs here and
matches the interpreter and torch, the runtime's counters against the model, einfuse kernels."""
from __future__ import annotations

import json
from dataclasses import replace
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse import zoo
from einfuse.api import laid_out, optimized
from einfuse.cli import main
from einfuse.ir import interpret, parse
from einfuse.targets import Target
from einfuse.targets.accel import cascade_timing, kernel_einsums, kernel_work, placement
from tests.conftest import params, rel_err

SMALL = "accel:fusemax{pe_rows=16,pe_cols=16,vector_pes=16}"
CASCADES = Path(__file__).parents[1] / "cascades"


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _grouped(model: object, args: tuple | None, pipeline: str, target: str = SMALL) -> tuple:
    t = Target.parse(target)
    return laid_out(optimized(model, args, pipeline=pipeline, target=t.name), t), t


def test_the_1pass_attention_is_bound_as_fusemax_binds_it() -> None:
    c, t = _grouped(parse((CASCADES / "attn_3pass.ein").read_text()), None, "default")
    (loop,) = [k for k in c.groups if k.kind == "loop"]
    where = placement(c, loop)
    arrays = {e.lhs.tensor.split("_")[-1]: where[i] for i, (e, loops) in enumerate(kernel_einsums(c, loop)) if loops}
    assert arrays == {"bqk": "2d", "lm": "2d", "sln": "2d", "sld": "2d", "slnv": "2d",
                      "rm": "1d", "prm": "1d", "rd": "1d", "rnv": "1d"}
    # per (query, key): E MACs for QK, 1 max, 1 sub + 7 for exp, 1 add, F MACs for P V (E = F = 32,
    # 48 keys in 3 tiles of 16, 40 queries); per (query, tile) on the 1D array: max, sub + exp, 2
    # for the denominator, 2F for the numerator; the division once per (query, f)
    work = kernel_work(c, loop, t.device)
    assert work.ops_2d == 40 * 48 * (32 + 1 + 8 + 1 + 32)
    assert work.ops_1d == 40 * 3 * (1 + 8 + 2 + 2 * 32) + 40 * 32
    assert work.dram_bytes == 2 * (40 * 32 + 48 * 32 + 48 * 32 + 40 * 32)   # Q, K, V, out: 16-bit words


def test_the_unfused_attention_runs_its_softmax_on_the_1d_array_in_phases_through_dram() -> None:
    c, t = _grouped(parse((CASCADES / "attn_3pass.ein").read_text()), None, "unfused")
    kinds = {k.name: placement(c, k) for k in c.groups}
    assert all(set(v.values()) == {"2d"} for k, v in kinds.items() if k.endswith(("QK", "AV")))
    assert not any(k.kind for k in c.groups)   # (no softmax absorbed into P V: one phase per kernel)
    qk = next(k for k in c.groups if k.name.endswith("QK"))
    timing = dict(cascade_timing(c, t.device))[qk.name]
    assert timing.cycles_2d == 40 * 48 * 32 / 256 and timing.latency == max(timing.cycles_2d, timing.dram_cycles)


def test_exp_costs_what_the_target_says_on_each_array() -> None:
    from einfuse.targets.accel import op_cost
    plain, baseline = Target.parse("accel:fusemax").device, Target.parse("accel:fusemax{vector_exp=1}").device
    assert (op_cost("exp", plain, "2d"), op_cost("exp", plain, "1d")) == (7, 7)
    assert (op_cost("exp", baseline, "2d"), op_cost("exp", baseline, "1d"), op_cost("max", baseline, "1d")) == (7, 1, 1)


ROW_MAX = """cascade rowmax
rank M=32, P=16
tensor X[M,P] input f32
tensor Y[M,P] input f32
tensor G[P] output f32
tensor H[M,P] output f32
G[p] = X[m,p] :: reduce[m] max
H[m,p] = max(X[m,p], Y[m,p])
"""


def test_the_accelerators_max_propagates_nan_as_the_interpreters(rng: np.random.Generator) -> None:
    x, y = rng.standard_normal((32, 16)), rng.standard_normal((32, 16))
    x[5, 3], y[7, 9] = np.nan, np.nan   # (fm_reduce's row max and fm_vec's max must keep them)
    sim = einfuse.simulate(parse(ROW_MAX), (x, y), target=SMALL, pipeline="none")
    assert sorted(t for *_, ts in sim.kernels for t in ts) == ["G", "H"]
    want = interpret(parse(ROW_MAX), {"X": x, "Y": y})
    for name in ("G", "H"):
        got = sim.outputs[name]
        assert (np.isnan(got) == np.isnan(want[name])).all() and np.isnan(want[name]).any()
        assert rel_err(np.nan_to_num(got), np.nan_to_num(want[name])) <= 1e-6


@pytest.mark.parametrize("pipeline", ["unfused", "default"])
def test_emitted_c_runs_matches_the_interpreter_and_counts_what_the_model_says(pipeline: str) -> None:
    rng = np.random.default_rng(7)
    source = parse((CASCADES / "attn_3pass.ein").read_text())
    inputs = {t.name: rng.standard_normal([{r.name: r.size for r in source.ranks}[x.rank] for x in t.ranks])
              for t in source.tensors if t.role == "input"}
    sim = einfuse.simulate(source, tuple(inputs.values()), target=SMALL, pipeline=pipeline)
    assert rel_err(sim.outputs["AV"], interpret(source, inputs)["AV"]) <= 1e-5
    c, t = _grouped(source, None, pipeline)
    modelled = dict(cascade_timing(c, t.device))
    for kernel, counted, tiles, tensorized in sim.kernels:
        if tensorized:   # (40 queries pad to three 16-row tiles: the arrays are busy for the padding too)
            assert tiles > 0 and counted.latency >= modelled[kernel.name].latency
        else:
            assert counted.latency == pytest.approx(modelled[kernel.name].latency, rel=1e-9)
    # unfused: QK and AV on fm_mac2d, the row max and sum on fm_reduce, the division on fm_vec (the
    # exp of a difference is charged: no intrinsic computes two ops)
    tensorized = sorted(t for *_, ts in sim.kernels for t in ts)
    assert tensorized == (["A", "AV", "GM", "QK", "SD"] if pipeline == "unfused" else [])


def test_a_tensorized_gemm_issues_one_fm_mac2d_per_tile_and_counts_exactly_the_model() -> None:
    torch.manual_seed(0)
    model, args = _Attention(), tuple(torch.randn(1, 2, 64, 16) for _ in range(3))
    sim = einfuse.simulate(model, args, target=SMALL, pipeline="unfused")
    assert rel_err(sim.outputs["out0"], model(*args).numpy()) <= 1e-5
    c, t = _grouped(model, args, "unfused")
    modelled = dict(cascade_timing(c, t.device))
    qk = next(x for x in sim.kernels if x[3])
    assert qk[2] == 2 * (64 // 16) * (64 // 16) * (16 // 16)    # heads x row tiles x column tiles x k chunks
    for kernel, counted, _, _ in sim.kernels:      # (every size divides the tiles: no padding)
        assert counted.latency == pytest.approx(modelled[kernel.name].latency, rel=1e-9)
        assert counted.cycles_2d == pytest.approx(modelled[kernel.name].cycles_2d, rel=1e-9)


@pytest.mark.parametrize("name", params(["mlp", "convnet", "gpt2", "llama", "bert", "vit", "mixtral"],
                                        slow=("gpt2", "llama", "bert", "vit", "mixtral")))
def test_every_zoo_model_runs_as_accelerator_c_and_matches_eager(name: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    model, args = zoo.build(name)
    sim = einfuse.simulate(model, args, target="accel:fusemax")
    with torch.no_grad():
        want = model(*args)
    assert rel_err(next(iter(sim.outputs.values())), want.numpy()) <= 1e-4
    assert sim.total.latency > 0 and any(x[3] for x in sim.kernels)   # (its GEMMs call fm_mac2d)
    assert main(["kernels", f"zoo:{name}", "--target", "accel:fusemax", "-o", str(tmp_path)]) == 0
    assert "Whole model: " in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["kernels"]) == len(sim.kernels) == len(list(tmp_path.glob("k*.c")))


def test_einfuse_kernels_writes_c_the_runtime_and_a_report(tmp_path: Path) -> None:
    model, args = zoo.build("bert")
    manifest = json.loads(einfuse.kernels(model, args, target="accel:fusemax", output=tmp_path).read_text())
    names = [k["kernel"] for k in manifest["kernels"]]
    assert all((tmp_path / f"{n}.c").is_file() for n in names)
    assert (tmp_path / "fusemax.h").is_file() and (tmp_path / "fusemax_rt.c").is_file()
    sources = [(tmp_path / f"{n}.c").read_text() for n in names]
    assert sum("fm_mac2d(" in s for s in sources) >= 6 and all("fm_begin(" in s for s in sources)
    report = (tmp_path / "report.md").read_text()
    assert len(re.findall(r"^\| k\d+_", report, re.M)) == len(names) and "| - |" not in report
    total = re.search(r"^Whole model: (\d+) cycles", report, re.M)
    rows = re.findall(r"^\| k\d+_\w+ \| [^|]+ \| [^|]+ \| [^|]+ \| (\d+) \|", report, re.M)
    assert total and abs(int(total.group(1)) - sum(map(int, rows))) <= len(rows)   # (rows are rounded)


def test_the_model_keeps_symbolic_lengths_and_binds_them_later() -> None:
    n = torch.export.Dim("n", min=2, max=4096)
    model, args = _Attention(), tuple(torch.randn(1, 2, 64, 16) for _ in range(3))
    target = Target.parse("accel:fusemax")
    dynamic = {"q": {2: n}, "k": {2: n}, "v": {2: n}}
    c = laid_out(optimized(model, args, dynamic_shapes=dynamic, target=target.name), target)
    (loop,) = [k for k in c.groups if k.kind == "loop"]
    assert {s.name for s in kernel_work(c, loop, target.device).ops_2d.free_symbols} == {"n"}
    bound = dict(cascade_timing(c, target.device, {"n": 1024}))[loop.name]
    assert bound.cycles_2d == pytest.approx(2 * 1024 * 1024 * (16 + 1 + 8 + 1 + 16) / 65536)


class _CausalAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_masked_contraction_is_tensorized_and_still_masked() -> None:
    torch.manual_seed(1)
    model, args = _CausalAttention(), tuple(torch.randn(1, 2, 48, 16) for _ in range(3))
    sim = einfuse.simulate(model, args, target=SMALL, pipeline="unfused")
    assert rel_err(sim.outputs["out0"], model(*args).numpy()) <= 1e-5
    assert any("attn_qk" in ts for *_, ts in sim.kernels)   # (its scores are computed in attn_qk_value)


def test_kernels_for_a_dynamic_length_and_a_changed_target_carry_their_numbers(tmp_path: Path) -> None:
    n = torch.export.Dim("n", min=2, max=4096)
    model, args = _Attention(), tuple(torch.randn(1, 2, 64, 16) for _ in range(3))
    target = "accel:fusemax{pe_rows=128,pe_cols=64,vector_pes=32,dram_gib_s=800}"
    einfuse.kernels(model, args, target=target, output=tmp_path, pipeline="unfused",
                    dynamic_shapes={"q": {2: n}, "k": {2: n}, "v": {2: n}})
    sources = {p.stem: p.read_text() for p in tmp_path.glob("k*.c")}
    assert sources and all(f"fm_configure(128, 64, 32, (int64_t){800 << 30}, (int64_t)940000000)" in s
                           for s in sources.values())
    # a symbolic length cannot be padded to whole tiles: the scores' contraction is charged
    (scores,) = [s for name, s in sources.items() if name.endswith("attn_qk")]
    assert "fm_2d(" in scores and "fm_mac2d" not in scores


class _ZeroDim(torch.nn.Module):
    """A 0-d buffer and a 0-d parameter, as Gemma's ``embed_scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embed_scale", torch.tensor(2.5))
        self.shift = torch.nn.Parameter(torch.tensor(-0.75))
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.embed_scale) + self.shift


def test_simulate_takes_0d_buffers_and_parameters(rng: np.random.Generator) -> None:
    model = _ZeroDim()
    x = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32))
    sim = einfuse.simulate(model, (x,), target=SMALL)
    with torch.no_grad():
        assert rel_err(sim.outputs["out0"], model(x).numpy()) <= 1e-5


def test_the_kernels_directory_builds_with_cc_alone_and_its_libraries_run(tmp_path: Path,
                                                                          rng: np.random.Generator) -> None:
    import subprocess

    import tvm
    assert shutil.which("cc"), "the test needs a C compiler"
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32))
    einfuse.kernels(model, (x,), target=SMALL, output=tmp_path / "out")
    out = tmp_path / "out"
    command = re.search(r"for one kernel K: `([^`]+)`", (out / "report.md").read_text()).group(1)
    env = {k: v for k, v in os.environ.items() if k not in ("CPATH", "C_INCLUDE_PATH", "LIBRARY_PATH")}
    c, _ = _grouped(model, (x,), "default")
    for k in c.groups:
        build = subprocess.run(command.replace("K.", f"{k.name}."), shell=True, cwd=out, env=env,
                               capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stderr
    # run the libraries cc built, in order, on the laid-out weights: the model's output
    (name,) = [t.name for t in c.tensors if t.role == "input"]
    values = {n: np.asarray(v, np.float32) for n, v in c.params.items()} | {name: x.numpy()}
    for k in c.groups:
        shape = next(tuple(int(c.rank(r.rank).size) for r in t.ranks) for t in c.tensors if t.name == k.output)
        result = tvm.runtime.tensor(np.zeros(shape, np.float32))
        tvm.runtime.load_module(str(out / f"{k.name}.so"))[k.name](
            *[tvm.runtime.tensor(values[n]) for n in k.inputs], result)
        values[k.output] = result.numpy()
    with torch.no_grad():
        assert rel_err(values["out0"], model(x).numpy()) <= 1e-4


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_a_quantized_weight_runs_on_the_accelerator_and_its_packed_bytes_are_counted(fmt: str) -> None:
    rng = np.random.default_rng(3)
    linear = parse("cascade lin\nrank M=16, K=256, N=64\ntensor X[M,K] input f32\ntensor W[N,K] param f32\n"
                   "tensor Y[M,N] output f32\nY[m,n] = X[m,k] * W[n,k]\n")
    linear = replace(linear, params={"W": rng.standard_normal((64, 256))})
    x = rng.standard_normal((16, 256))
    dram = {}
    for pipeline in ("default", f"default,quantize{{format={fmt}}}"):
        sim = einfuse.simulate(linear, (x,), target=SMALL, pipeline=pipeline)
        quantized = optimized(linear, None, pipeline=pipeline, target=SMALL)
        assert rel_err(sim.outputs["Y"], interpret(quantized, {"X": x})["Y"]) <= 1e-5
        c, t = _grouped(linear, None, pipeline)
        modelled = dict(cascade_timing(c, t.device))
        for kernel, counted, _, _ in sim.kernels:
            assert counted.dram_cycles == pytest.approx(modelled[kernel.name].dram_cycles, rel=1e-9)
        dram[pipeline] = sim.total.dram_cycles
    # (a float moves as a 2-byte word; the quantized weight in 18/32 (q4_0) or 34/32 (q8_0) bytes a
    # value: its packed integers and float16 scales; X and Y as before)
    weight, rest = 64 * 256, 16 * 256 + 16 * 64
    expected = (rest * 2 + weight * (18 if fmt == "q4_0" else 34) / 32) / (rest * 2 + weight * 2)
    assert dram[f"default,quantize{{format={fmt}}}"] / dram["default"] == pytest.approx(expected, rel=1e-6)
