"""The ``einfuse`` command and the shipped examples."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from einfuse.cli import main
from einfuse.ir import interpret, parse

from .conftest import rel_err
from .ir.test_interpret import softmax_attention

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_ir_prints_the_verified_cascade(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "attention.ein"
    assert main(["ir", str(path)]) == 0
    assert capsys.readouterr().out == str(parse(path.read_text()))


def test_ir_stats_reports_costs_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "flash_attention.ein"), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "1   RM[0,p]          0" in out
    assert "4   BQK[m1,m0,p]     192*S**2              4*S**2 + 512*S    48*S/(S + 128)" in out
    assert "compulsory bytes (inputs, params, outputs): 1024*S" in out
    passes = {line.split()[0]: line.split()[1] for line in out.splitlines()[-4:]}
    assert passes == {"E": "1", "M1": "1", "M0": "2", "M1,M0": "1"}


def test_ir_stats_on_three_pass_attention(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "attention.ein"), "--stats"]) == 0
    assert "M     3       QK (full fiber), SN (full fiber)" in capsys.readouterr().out


def test_errors_exit_non_zero_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ein"
    bad.write_text("cascade c\nrank M=4\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = exq(A[m])\n")
    assert main(["ir", str(bad)]) == 1
    assert capsys.readouterr().err == f"einfuse: error: {bad}: line 5: einsum `Z[m] = exq(A[m])`: unknown op 'exq'\n"
    assert main(["ir", str(tmp_path / "missing.ein")]) == 1
    assert capsys.readouterr().err == f"einfuse: error: {tmp_path / 'missing.ein'}: no such file\n"


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "einfuse", "ir", str(EXAMPLES / "attention.ein")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("cascade attention\n")


def test_ir_captures_zoo_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", "zoo:gpt2", "--stats"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cascade gpt2\nrank V=96, D=64, P=512, D3=192, D_2=64, F=256, B=1, S=24")
    assert "attn_probs[b,h,s,s_2] = attn_exp[b,h,s,s_2] / attn_sum[b,h,s]" in out
    assert "\nS_2   7       " in out  # passes over the key rank, across both layers and the mask building


def test_ir_captures_a_model_from_a_python_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", f"{EXAMPLES / 'custom_model.py'}:build"]) == 0
    assert "attn_qk[n1,n16,n16_2:n16_2<=n16] = addmm[n16,n32] * addmm[n16_2,32+n32]" in capsys.readouterr().out
    assert main(["ir", f"{EXAMPLES / 'custom_model.py'}:nope"]) == 1
    assert capsys.readouterr().err.endswith("custom_model.py has no function 'nope' (MODEL is path/to/file.py:function)\n")
    assert main(["ir", "zoo:nope"]) == 1
    assert capsys.readouterr().err == ("einfuse: error: zoo:nope: unknown zoo model 'nope'; the zoo has mlp, convnet, "
                                       "gpt2, llama, bert, vit, mixtral\n")


@pytest.mark.parametrize("length", [64, 192])
def test_examples_compute_causal_attention(length: int, rng: np.random.Generator) -> None:
    x = {n: rng.standard_normal((64, length)) for n in "QKV"}
    causal = np.arange(length)[:, None] <= np.arange(length)[None, :]
    want = softmax_attention(x["Q"], x["K"], x["V"], causal, 0.125)
    for name in ("attention", "flash_attention"):
        got = interpret(parse((EXAMPLES / f"{name}.ein").read_text()), x)["AV"]
        assert rel_err(got, want) < 1e-10, name


def test_compile_writes_library_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "zoo:mlp", "-o", str(tmp_path / "mlp")]) == 0
    out = capsys.readouterr().out
    assert "k0_gelu" in out and "measured: " in out
    assert sorted(p.name for p in (tmp_path / "mlp").iterdir()) == ["kernels.tir", "model.json", "model.so",
                                                                      "report.txt"]
    assert main(["compile", str(EXAMPLES / "attention.ein"), "-o", str(tmp_path / "attn")]) == 0
    assert "k0_QK" in capsys.readouterr().out


def test_a_first_compile_with_an_export_prints_no_warnings(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EINFUSE_CACHE", str(tmp_path / "cache"))   # (a fresh cache: a real first compile)
    assert main(["compile", "zoo:mlp", "-o", str(tmp_path / "mlp")]) == 0
    out, err = capfd.readouterr()   # (file descriptors: TVM's C++ writes its warnings to fd 2)
    assert "measured: " in out and "Warning" not in err and "warning" not in err.lower()


def test_unusable_output_paths_are_one_error_line_and_a_non_zero_exit(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = str(EXAMPLES / "attention.ein")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["compile", model, "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"einfuse: error: {model}: cannot export to {out}: ") and err.count("\n") == 1, err
    assert main(["ir", model, "--dump-ir-to", str(tmp_path / "file")]) == 1   # (an OSError)
    err = capsys.readouterr().err
    assert err.startswith(f"einfuse: error: {model}: ") and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "mine"
    done = subprocess.run([sys.executable, "-m", "einfuse", "compile", model, "-o", str(tmp_path / "file")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("einfuse: error: ")] == \
        [f"einfuse: error: {model}: cannot export to {tmp_path / 'file'}: it is a file, not a directory"]


def test_ir_runs_a_pipeline_with_inspection_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .passes.test_manager import AFTER, BEFORE
    path = tmp_path / "ex.ein"
    path.write_text(BEFORE)
    dump = tmp_path / "dump"
    assert main(["ir", str(path), "-p", "canonicalize", "--print-ir-after-all", "--time-passes",
                 "--dump-ir-to", str(dump)]) == 0
    out, err = capsys.readouterr()
    assert out == AFTER
    assert err.startswith("// ----- IR after canonicalize -----\n" + AFTER)
    assert "cse=1, dead-einsum=1, inline-view=1" in err
    assert sorted(p.name for p in dump.iterdir()) == ["000_input.ein", "001_canonicalize.ein"]


def test_ir_with_an_unknown_pass_lists_the_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "attention.ein"), "-p", "fuse-everything"]) == 1
    assert "unknown pass 'fuse-everything'; available: canonicalize" in capsys.readouterr().err


def test_compile_takes_a_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(EXAMPLES / "attention_3pass.ein"), "-p", "none", "-o", str(tmp_path / "a")]) == 0
    assert "tuned), compiled for cpu" in capsys.readouterr().out
    assert main(["compile", str(EXAMPLES / "attention_3pass.ein"), "-p", "fuse-attention{tile=4},canonicalize",
                 "-o", str(tmp_path / "b")]) == 0
    assert "tuned), compiled for cpu" in capsys.readouterr().out     # the 1-pass attention compiles


def test_cache_status_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import einfuse
    einfuse.compile(parse((EXAMPLES / "attention.ein").read_text()), cache_dir=tmp_path)
    (tmp_path / "peaks-x-2.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not einfuse's")
    records = tmp_path / "tuning" / "cpu-0123abcd-einfuse0.1.0-tvm0.27.0"
    records.mkdir(parents=True)
    (records / "database_tuning_record.json").write_text("")
    assert main(["cache", "status", "--dir", str(tmp_path)]) == 0
    assert f"{tmp_path}: 1 compiled model(s), 1 measured-peaks file(s), 1 tuning database(s)" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tuning"]   # (only what einfuse wrote goes)
    assert records.is_dir()                                   # (tuning records only with --tuning)
    assert main(["cache", "clear", "--tuning", "--dir", str(tmp_path)]) == 0
    main(["cache", "status", "--dir", str(tmp_path)])
    assert "0 compiled model(s), 0 measured-peaks file(s), 0 tuning database(s), 0.0 MiB" in capsys.readouterr().out


def test_report_times_kernels_against_the_estimate_and_plots_the_roofline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EINFUSE_CACHE", str(tmp_path / "cache"))
    assert main(["report", "zoo:mlp", "--plot", str(tmp_path / "roofline.png")]) == 0
    out = capsys.readouterr().out
    assert "predicted ms  bound" in out and "k0_gelu" in out
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from einfuse.errors import EinfuseError
    from einfuse.plot import roofline_plot
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(EinfuseError, match=r'needs matplotlib, which is not installed: pip install "einfuse\[plot\]"'):
        roofline_plot([], None, "unused.png")


def test_dynamic_dimensions_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    assert main(["ir", "zoo:llama", "--dynamic", "input_ids:1=2:256"]) == 0
    assert "INPUT_IDS_1=input_ids_1" in capsys.readouterr().out
    assert main(["ir", "zoo:llama", "--dynamic", "ids:1=2:256"]) == 1
    assert "forward has no argument 'ids'; it has input_ids" in capsys.readouterr().err
    assert main(["ir", "zoo:llama", "--dynamic", "input_ids=2"]) == 1
    assert "write ARG:AXIS=MIN:MAX" in capsys.readouterr().err
    out = tmp_path / "mlp"
    assert main(["compile", "zoo:mlp", "--dynamic", "input:0=1:64", "-o", str(out), "--no-cache"]) == 0
    import einfuse
    from einfuse import zoo
    model, _ = zoo.build("mlp")
    loaded = einfuse.load(out)
    for rows in (3, 40):
        x = torch.randn(rows, 256)
        with torch.no_grad():
            assert rel_err(loaded(x).numpy(), model(x).numpy()) <= 1e-5
