"""Tuning: TVM MetaSchedule over a model's kernels, remembered in a database (docs/tuning.md).

``tune`` makes one MetaSchedule task per distinct TE kernel of the laid-out cascade (the loop
kernels, attention and row groups, keep their own schedules), skips a task the database already
holds ``trials`` records of, and tunes the rest together, one progress line per measured batch.
``compile`` then takes each kernel's best record from the database instead of the rule-based
schedule. A database lives in ``DIR/<target>-einfuse<version>-tvm<version>/`` (MetaSchedule's two
JSON files): records are keyed by workload (MetaSchedule's structural hash) inside it, and by target
and versions by the folder, so a database from another version or target is never applied. One
that cannot be read is reported (a :class:`TuningDatabaseWarning`) and ignored.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import linecache
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..cache import read_json, write_atomic
from ..errors import EinfuseError
from ..ir import Cascade

COST_MODELS = ("xgb", "random")
INSTALL = 'pip install "einfuse[tune]"'


class TuningDatabaseWarning(UserWarning):
    """A tuning database could not be used; compilation goes on with the rule-based schedules."""


@dataclass(frozen=True)
class Task:
    """One workload to tune: an unscheduled kernel, and the kernels of the model that share it."""

    name: str
    func: tirx.PrimFunc
    kernels: tuple[str, ...]
    kernel: Any   # (the first of them: what the rule-based schedule needs)


@dataclass(frozen=True)
class TaskResult:
    """What tuning did for one task: records it held before, candidates measured, best time."""

    name: str
    before: int
    measured: int
    best_seconds: float | None


def workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """The module MetaSchedule keys a kernel by: the unscheduled function as ``main``."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)})


class TuningDatabase:
    """The records of one target and version pair in a tuning directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: Any = None

    @classmethod
    def at(cls, root: str | Path, target: Any = None) -> "TuningDatabase":
        """The database of ``target`` and these versions under directory ``root`` (with no
        target: the folder ``root`` itself)."""
        from ..version import __version__
        if target is None:
            return cls(Path(root))
        return cls(Path(root) / f"{_slug(target)}-einfuse{__version__}-tvm{tvm.__version__}")

    def open(self, create: bool = False) -> Any:
        """MetaSchedule's JSONDatabase, or None if it is missing or unreadable (reported as a
        :class:`TuningDatabaseWarning`). With ``create``, a missing one is made and an unreadable
        one is set aside (renamed ``*.corrupt``) for a new one."""
        if self._db is not None:
            return self._db
        files = [self.path / "database_workload.json", self.path / "database_tuning_record.json"]
        if not create and not all(f.is_file() for f in files):
            return None
        try:
            self._db = _load(files, create)
        except Exception as exc:  # a damaged or foreign file: say which, then go on without it
            why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:200]}"
            if not create:
                warnings.warn(f"tuning database {self.path} is unreadable and is ignored ({why})",
                              TuningDatabaseWarning, stacklevel=2)
                return None
            for f in files:
                if f.is_file():
                    f.rename(f.with_name(f.name + ".corrupt"))
            warnings.warn(f"tuning database {self.path} was unreadable ({why}); set aside as *.corrupt, "
                          "starting a new one", TuningDatabaseWarning, stacklevel=2)
            self._db = _load(files, create)
        return self._db

    def records(self, func: tirx.PrimFunc, limit: int = 1 << 30) -> list[Any]:
        """The records of ``func`` (fastest first; equal times ordered by trace text)."""
        db = self.open()
        mod = workload(func)
        if db is None or not db.has_workload(mod):
            return []
        found = db.get_top_k(db.commit_workload(mod), limit)
        return sorted(found, key=lambda r: (_mean(r), str(r.trace)))

    def schedule(self, func: tirx.PrimFunc, name: str) -> tirx.PrimFunc | None:
        """``func`` scheduled by its best record, named ``name``; None if there is none, or if
        the record does not apply (reported). The trace is replayed on the record's own
        workload: a kernel equal to it up to names (another layer's) has other block names."""
        best = self.records(func)
        if not best:
            return None
        try:
            sch = s_tir.Schedule(best[0].workload.mod)
            best[0].trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as exc:  # (a record TVM cannot replay: the rule-based schedule instead)
            warnings.warn(f"the tuning record of {name} in {self.path} does not apply and is ignored "
                          f"({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})",
                          TuningDatabaseWarning, stacklevel=2)
            return None
        return sch.mod["main"].with_attr("global_symbol", name)

    def budgets(self) -> dict[str, int]:
        """The trials each workload was tuned with (by :func:`_key`): a search that ran out of
        candidates before its budget holds fewer records, and is done all the same. A file that
        is unreadable or holds anything but positive integers is reported and ignored (its tasks
        are tuned again, and the file rewritten)."""
        def whole(budgets: Any) -> bool:
            return isinstance(budgets, dict) and all(type(v) is int and v > 0 for v in budgets.values())
        return read_json(self.path / "budgets.json", whole, TuningDatabaseWarning) or {}

    def record_budgets(self, tuned: dict[str, int]) -> None:
        """Note that these workloads were tuned with these budgets (written atomically)."""
        budgets = self.budgets()
        budgets.update({k: max(v, budgets.get(k, 0)) for k, v in tuned.items()})
        write_atomic(self.path / "budgets.json", json.dumps(budgets, indent=0, sort_keys=True))

    def digest(self) -> str:
        """A digest of the records (part of a compiled model's cache key)."""
        record = self.path / "database_tuning_record.json"
        return hashlib.sha256(record.read_bytes()).hexdigest()[:16] if record.is_file() else ""


def tasks(cascade: Cascade, target: Any) -> list[Task]:
    """The distinct tunable kernels of a laid-out cascade (static shapes, TE kernels only)."""
    from ..ir.kernels import KINDS, kernels_of
    from .backends import backend_for
    from .lower import SizeVars
    backend = backend_for(target)
    found: dict[str, Task] = {}
    for kernel in kernels_of(cascade):
        if KINDS[kernel.kind].loop or kernel.gathers:
            continue
        sizes = SizeVars()
        func = backend.lower(cascade, kernel, sizes)
        if sizes.vars:
            continue  # (a symbolic shape: MetaSchedule tunes static workloads)
        key = _key(func)
        old = found.get(key)
        found[key] = Task(old.name, func, old.kernels + (kernel.name,), old.kernel) if old else \
            Task(kernel.name, func, (kernel.name,), kernel)
    return list(found.values())


def tune(cascade: Cascade, target: Any, trials: int, database: TuningDatabase, *,
         rpc: tuple[str, str] | None = None, cost_model: str = "xgb", seed: int = 0,
         progress: Callable[[str], None] = print) -> list[TaskResult]:
    """Tune every task of ``cascade`` (laid out) that ``database`` holds fewer than ``trials``
    records of; ``rpc`` = (tracker ``HOST:PORT``, key) measures on the tracker's devices."""
    check_cost_model(cost_model)
    if trials < 1:
        raise EinfuseError(f"tune: --trials must be at least 1 (got {trials})")
    if database.open(create=True) is None:
        raise EinfuseError(f"tune: cannot write the tuning database {database.path}")
    todo, results = [], {}
    budgets = database.budgets()
    for task in tasks(cascade, target):
        results[task.name] = TaskResult(task.name, len(database.records(task.func)), 0, None)
        if budgets.get(_key(task.func), 0) < trials:
            todo.append(task)
    progress(f"tune: {len(results)} task(s), {len(results) - len(todo)} already tuned, "
             f"{len(todo)} to tune with {trials} trials each")
    if todo:
        measured = _run(todo, target, trials, database, rpc, cost_model, seed, progress)
        database.record_budgets({_key(t.func): trials for t in todo})
        for task in todo:
            best = database.records(task.func, 1)
            results[task.name] = TaskResult(task.name, results[task.name].before, measured[task.name],
                                            _mean(best[0]) if best else None)
    return list(results.values())


def check_cost_model(cost_model: str) -> None:
    """Fail before any work if the cost model is unknown or its package is missing."""
    if cost_model not in COST_MODELS:
        raise EinfuseError(f"tune: unknown cost model {cost_model!r}; choose one of {', '.join(COST_MODELS)}")
    missing = [m for m in ("psutil", "cloudpickle") + (("xgboost",) if cost_model == "xgb" else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise EinfuseError(f"tune: MetaSchedule needs {' and '.join(missing)}, which {verb} not installed: "
                           f"{INSTALL}" + (" (or --cost-model random)" if missing == ["xgboost"] else ""))


def _run(todo: list[Task], target: Any, trials: int, database: TuningDatabase, rpc: tuple[str, str] | None,
         cost_model: str, seed: int, progress: Callable[[str], None]) -> dict[str, int]:
    """MetaSchedule over ``todo``, each search seeded with the rule-based schedule; the
    candidates measured per task."""
    from tvm.s_tir import meta_schedule as ms
    work = str(database.path / "work")
    builder, runner = _builder(), _runner(rpc)
    seeds = _seed(todo, target, database.open(), builder, runner, progress)
    counter = _progress_callback([t.name for t in todo], trials, progress, seeds)
    ms.tune_tasks(tasks=_contexts(todo, target, work, seed), task_weights=[1.0] * len(todo), work_dir=work,
                  max_trials_global=trials * len(todo), max_trials_per_task=trials,
                  num_trials_per_iter=min(trials, 32), builder=builder, runner=runner,
                  database=database.open(), cost_model=cost_model,
                  measure_callbacks=ms.MeasureCallback.create("default") + [counter], task_scheduler="round-robin")
    return counter.done


def _seed(todo: list[Task], target: Any, db: Any, builder: Any, runner: Any,
          progress: Callable[[str], None]) -> dict[str, float]:
    """Measure each task's rule-based schedule as MetaSchedule measures its candidates and
    commit it as a record: the evolutionary search starts from it, and the best record is
    never slower than what compiling without tuning gives. Its seconds per task."""
    from tvm.s_tir import meta_schedule as ms

    from .backends import backend_for
    backend = backend_for(target)
    tvm_target = target.tvm_target()
    schedules = [backend.rule_schedule(workload(t.func)["main"], t.kernel) for t in todo]
    if None in schedules:
        return {}   # (the target's rules give no trace to start from)
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for sch in schedules])
    args = [ms.arg_info.ArgInfo.from_prim_func(t.func) for t in todo]
    ok = [n for n, b in enumerate(built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(built[n].artifact_path, "cpu", args[n]) for n in ok])
    results = dict(zip(ok, (f.result() for f in futures)))
    seconds = {}
    for n, task in enumerate(todo):
        error = built[n].error_msg or results[n].error_msg
        if error:
            progress(f"{task.name}: the rule-based schedule could not be measured: {error.strip().splitlines()[-1]}")
            continue
        record = ms.database.TuningRecord(schedules[n].trace, db.commit_workload(workload(task.func)),
                                          results[n].run_secs, tvm_target, args[n])
        db.commit_tuning_record(record)
        seconds[task.name] = _mean(record)
        progress(f"{task.name}: the rule-based schedule takes {seconds[task.name] * 1e3:.3f} ms "
                 "(the search starts there)")
    return seconds


def _contexts(todo: list[Task], target: Any, work: str, seed: int) -> list[Any]:
    """A MetaSchedule TuneContext per task, logging to files under ``work`` (MetaSchedule's
    tables go there, not to stdout, unless its logger was configured otherwise)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed
    with _frames_without_modules():
        import tvm.s_tir.tensor_intrin  # noqa: F401  (what TuneContext imports first)
    if logging.getLogger("tvm.s_tir.meta_schedule").level == logging.NOTSET:
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    loggers = get_loggers_from_work_dir(work, [t.name for t in todo])
    return [ms.TuneContext(mod=workload(t.func), target=target.tvm_target(), space_generator="post-order-apply",
                           search_strategy="evolutionary", task_name=t.name, rand_state=state,
                           num_threads="physical", logger=log).clone()
            for t, log, state in zip(todo, loggers, fork_seed(seed, len(todo)))]


@contextlib.contextmanager
def _frames_without_modules() -> Iterator[None]:
    """Within: ``inspect.stack()`` gives each frame's line without looking up its module. TVMScript
    takes the stack at each ``@T.prim_func``, and the lookup walks every loaded module: importing
    MetaSchedule's tensor intrinsics (hundreds of them) took 59 s in a process that had loaded
    torch and transformers (2,800 modules), 3.9 s so."""
    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame, frames = sys._getframe(1), []
        while frame is not None:
            code, line = frame.f_code, linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0))
            frame = frame.f_back
        return frames
    saved, inspect.stack = inspect.stack, stack
    try:
        yield
    finally:
        inspect.stack = saved


def _builder() -> Any:
    from tvm.s_tir import meta_schedule as ms
    return ms.builder.LocalBuilder(timeout_sec=60, initializer=_register_build, f_build="einfuse.tuning.build")


def _register_build() -> None:
    """Runs in each builder worker: registers :func:`_build`. (MetaSchedule's default build
    imports every tensor intrinsic first, 50 s here, in each new worker of each batch; a float32
    CPU or CUDA candidate uses none.)"""
    tvm.register_global_func("einfuse.tuning.build", _build, override=True)


def _build(mod: tvm.IRModule, target: Any, _params: Any) -> Any:
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _runner(rpc: tuple[str, str] | None) -> Any:
    from tvm.s_tir import meta_schedule as ms
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=10)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    tracker, key = rpc
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise EinfuseError(f"tune: --rpc-tracker wants HOST:PORT, got {tracker!r}")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                 session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def _progress_callback(names: list[str], trials: int, progress: Callable[[str], None],
                       seeds: dict[str, float]) -> Any:
    """A MetaSchedule measure callback printing, after each measured batch, the task's trials,
    its best time so far (``seeds`` counted) and the estimated time left; ``.done`` counts
    candidates per task."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.done = {n: 0 for n in names}
            self.best: dict[str, float] = dict(seeds)
            self.start = time.perf_counter()

        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
            name = names[task_id]
            self.done[name] += len(runs)
            for r in runs:
                if r.error_msg is None and r.run_secs:
                    self.best[name] = min(self.best.get(name, float("inf")), _mean_secs(r.run_secs))
            total, spent = sum(self.done.values()), time.perf_counter() - self.start
            left = spent / total * (trials * len(names) - total) if total else 0.0
            best = f"{self.best[name] * 1e3:.3f} ms" if name in self.best else "no valid candidate yet"
            progress(f"[{task_id + 1}/{len(names)}] {name}: {self.done[name]}/{trials} trials, best {best}, "
                     f"ETA {left / 60:.1f} min")   # (at most: a search may run out of candidates sooner)

    return Progress()


def _key(func: tirx.PrimFunc) -> str:
    """A workload's structural hash, as text (MetaSchedule's own equality)."""
    return str(tvm_ffi.structural_hash(workload(func)))


def _mean_secs(secs: Any) -> float:
    values = [float(s) for s in secs]
    return sum(values) / len(values)


def _mean(record: Any) -> float:
    return _mean_secs(record.run_secs) if record.run_secs else float("inf")


def _slug(target: Any) -> str:
    """A folder name for a target: its name and a digest of its TVM options."""
    options = json.dumps(target.tvm, sort_keys=True, default=str)
    return f"{target.name.replace(':', '_')}-{hashlib.sha256(options.encode()).hexdigest()[:8]}"


def _load(files: list[Path], create: bool) -> Any:
    """MetaSchedule's JSONDatabase over ``files``, each line checked first (TVM aborts on some
    bad input rather than raising)."""
    from tvm.s_tir import meta_schedule as ms
    if create:
        files[0].parent.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not f.is_file():
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip() and not isinstance(json.loads(line), list):
                raise ValueError(f"{f.name} line {n} is not a MetaSchedule record")
    return ms.database.JSONDatabase(str(files[0]), str(files[1]), allow_missing=create)
