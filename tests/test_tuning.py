"""``einfuse tune``: MetaSchedule over a model's kernels, the database ``compile`` reads, a corrupt
or foreign database, measurement through a TVM RPC tracker on loopback, the missing-xgboost
message. Budgets are tiny (4 trials of one small GEMM kernel, the random cost model): these check
the plumbing, not the speed (benchmarks/tune.py measures that)."""
from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

import einfuse
from einfuse.cli import main
from einfuse.errors import EinfuseError
from einfuse.targets import Target
from einfuse.codegen.tuning import TuningDatabase, TuningDatabaseWarning

TRIALS = 4


def small_model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Two layers of one shape (two kernels, one task: equal up to their names), and an output layer."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)]
    return torch.nn.Sequential(*layers).eval(), (torch.randn(16, 64),)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.double() - want).norm() / want.norm())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list[str]]:
    """A database made by tuning the small model over a corrupt one: (root, results, progress)."""
    root = tmp_path_factory.mktemp("tuning")
    database = TuningDatabase.at(root, Target.parse("cpu"))
    database.path.mkdir(parents=True)
    (database.path / "database_workload.json").write_text("this is not json\n")
    (database.path / "database_tuning_record.json").write_text("")
    lines: list[str] = []
    model, args = small_model()
    with pytest.warns(TuningDatabaseWarning, match="unreadable"):
        results = einfuse.tune(model, args, trials=TRIALS, tuning_db=root, cost_model="random",
                               progress=lines.append)
    return root, results, lines


@pytest.mark.slow
def test_tune_measures_each_task_and_reports_progress(tuned: tuple[Path, list, list[str]]) -> None:
    root, results, lines = tuned
    assert len(results) == 2   # (the two GEMM + ReLU kernels are one task)
    for n, task in enumerate(results, 1):
        assert (task.before, task.measured) == (0, TRIALS) and task.best_seconds > 0
        assert any(re.fullmatch(rf"\[{n}/2\] {task.name}: {TRIALS}/{TRIALS} trials, best \d+\.\d+ ms, ETA \d+\.\d min",
                                ln) for ln in lines), lines
    set_aside = TuningDatabase.at(root, Target.parse("cpu")).path / "database_workload.json.corrupt"
    assert set_aside.read_text() == "this is not json\n"   # (the corrupt file was kept, not deleted)


@pytest.mark.slow
def test_second_tune_measures_nothing_and_compile_uses_the_records(tuned: tuple[Path, list, list[str]]) -> None:
    root, _, _ = tuned
    model, args = small_model()
    again = einfuse.tune(model, args, trials=TRIALS, tuning_db=root, cost_model="random", progress=lambda _: None)
    assert [(r.before >= TRIALS, r.measured) for r in again] == [(True, 0), (True, 0)]
    compiled = einfuse.compile(model, args, tuning_db=root, cache_dir=root / "cache")
    assert len(compiled.tuned) == 3   # (the second layer's kernel replays the first's record)
    assert "einfuse.tuned" in compiled.source("tir")
    x = torch.randn(16, 64)
    assert rel_error(compiled(x), model(x)) < 1e-5
    untuned = einfuse.compile(model, args, tuning_db=False, cache_dir=root / "cache")
    assert untuned.tuned == [] and rel_error(untuned(x), model(x)) < 1e-5


@pytest.mark.slow
def test_cli_tune_with_a_tuned_database_measures_nothing(tuned: tuple[Path, list, list[str]],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, results, _ = tuned
    assert main(["tune", f"{__file__}:small_model", "--db", str(root), "--trials", str(TRIALS),
                 "--cost-model", "random"]) == 0
    out = capsys.readouterr().out
    assert "tune: 2 task(s), 2 already tuned, 0 to tune" in out
    assert re.search(r"task\s+records before\s+measured\s+best ms", out)
    assert all(re.search(rf"{r.name}\s+\d+\s+0\s+-", out) for r in results), out


@pytest.mark.slow
def test_rule_based_schedule_is_a_record_and_ties_are_broken_by_trace_text(tuned: tuple[Path, list, list[str]]) -> None:
    from tvm.s_tir import meta_schedule as ms

    from einfuse.codegen.schedules.cpu import rule_schedule
    from einfuse.codegen.tuning import tasks, workload
    root, _, _ = tuned
    target = Target.parse("cpu")
    database = TuningDatabase.at(root, target)
    model, args = small_model()
    task, _ = tasks(einfuse.api.laid_out(einfuse.api.optimized(model, args), target), target)
    assert len(task.kernels) == 2
    records = database.records(task.func)
    rule = rule_schedule(workload(task.func)["main"], task.kernel, target)   # (measured as the search's seed)
    assert str(rule.trace) in {str(r.trace) for r in records}
    best = records[0]
    db = database.open()
    for other in records[1:]:   # every record now as fast as the best: the trace text decides
        db.commit_tuning_record(ms.database.TuningRecord(other.trace, db.commit_workload(workload(task.func)),
                                                         best.run_secs, other.target, other.args_info))
    tied = database.records(task.func)
    fastest = [r for r in tied if float(r.run_secs[0]) == float(best.run_secs[0])]
    assert str(tied[0].trace) == min(str(r.trace) for r in fastest)
    assert [str(r.trace) for r in tied] == [str(r.trace) for r in database.records(task.func)]


def test_foreign_database_is_reported_and_ignored(tmp_path: Path) -> None:
    other = tmp_path / "cpu-00000000-einfuse0.0.1-tvm0.20.0"
    other.mkdir()
    (other / "database_workload.json").write_text("")
    model, args = small_model()
    with pytest.warns(TuningDatabaseWarning, match="only for cpu-00000000-einfuse0.0.1-tvm0.20.0"):
        compiled = einfuse.compile(model, args, tuning_db=tmp_path, cache_dir=tmp_path / "cache")
    x = torch.randn(16, 64)
    assert compiled.tuned == [] and rel_error(compiled(x), model(x)) < 1e-5


def test_corrupt_database_is_ignored_by_compile(tmp_path: Path) -> None:
    database = TuningDatabase.at(tmp_path, Target.parse("cpu"))
    database.path.mkdir(parents=True)
    (database.path / "database_workload.json").write_text('["not", "a workload"\n')
    (database.path / "database_tuning_record.json").write_text("{}\n")
    model, args = small_model()
    with pytest.warns(TuningDatabaseWarning, match="unreadable and is ignored"):
        compiled = einfuse.compile(model, args, tuning_db=tmp_path, cache_dir=tmp_path / "cache")
    x = torch.randn(16, 64)
    assert compiled.tuned == [] and rel_error(compiled(x), model(x)) < 1e-5


def test_missing_xgboost_is_said_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real(name, *a))
    assert main(["tune", "no/such/model.py:build", "--trials", "4"]) == 1   # (fails before loading the model)
    err = capsys.readouterr().err
    assert 'needs xgboost, which is not installed: pip install "einfuse[tune]" (or --cost-model random)' in err
    with pytest.raises(EinfuseError, match="unknown cost model 'gbm'"):
        einfuse.tune(*small_model(), cost_model="gbm")


@pytest.mark.slow
def test_tune_through_an_rpc_tracker_on_loopback(tmp_path: Path) -> None:
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker
    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    server = Server("127.0.0.1", port=9300, port_end=9400, key="einfuse-test",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        model, args = small_model()
        with warnings.catch_warnings():
            warnings.simplefilter("error", TuningDatabaseWarning)   # (a fresh database: nothing to report)
            results = einfuse.tune(model, args, trials=2, tuning_db=tmp_path, cost_model="random",
                                   rpc_tracker=f"127.0.0.1:{tracker.port}", rpc_key="einfuse-test",
                                   progress=lambda _: None)
        assert all(t.measured == 2 and t.best_seconds is not None and t.best_seconds > 0 for t in results)
    finally:
        server.terminate()
        tracker.terminate()
    with pytest.raises(EinfuseError, match="--rpc-tracker and --rpc-key go together"):
        einfuse.tune(model, args, rpc_tracker="127.0.0.1:9190", cost_model="random")
