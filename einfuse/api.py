"""``einfuse.compile``: frontend -> passes -> codegen, nothing else."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .cache import default_cache_dir
from .errors import EinfuseError
from .ir import Cascade, verify

if TYPE_CHECKING:
    from .codegen.accel import Simulation


def compile(model: Any, args: tuple | None = None, *, target: str = "cpu", pipeline: str = "default",
            dynamic_shapes: Any = None, cache_dir: str | Path | None = None,
            tuning_db: str | Path | bool | None = None) -> Any:
    """Compile a torch model (with example ``args``) or a :class:`~einfuse.ir.Cascade` for ``target``.

    ``pipeline`` is ``"default"``, ``"none"`` or pipeline text (``"canonicalize"``; see
    docs/inspect.md). Returns a :class:`~einfuse.codegen.runtime.CompiledModel`. A compiled
    library is cached under ``cache_dir`` (default ``$EINFUSE_CACHE`` or ``~/.cache/einfuse``), keyed by the cascade, its
    weights, the target, the versions and the code generator's source, so compiling the same
    model again only loads it. Kernels tuned by ``einfuse tune`` (docs/tuning.md) take their best
    schedule from ``tuning_db`` (default: ``<cache_dir>/tuning`` where it exists; ``False``: none).
    """
    from .targets import Target
    if Target.parse(target).kind == "accel":   # (an unknown name fails here, listing the known ones)
        raise EinfuseError(f"compile: {target} is not a device to run on; einfuse.kernels emits its C and "
                           "einfuse.simulate runs it here counting its cycles (docs/accelerator.md)")
    cascade = optimized(model, args, pipeline=pipeline, dynamic_shapes=dynamic_shapes, target=target)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return _compile_cascade(cascade, target, cache, tuning_database(tuning_db, target, cache))


def kernels(model: Any, args: tuple | None = None, *, target: str, output: str | Path,
            pipeline: str = "default", dynamic_shapes: Any = None) -> Path:
    """Write the source of every kernel of ``model`` for ``target`` into directory ``output``,
    with ``manifest.json`` (see :mod:`einfuse.codegen.emit`); returns the manifest's path."""
    from .codegen.emit import write_kernels
    from .targets import Target
    t = Target.parse(target)
    cascade = laid_out(optimized(model, args, pipeline=pipeline, dynamic_shapes=dynamic_shapes, target=t.name), t)
    return write_kernels(cascade, t, Path(output))


def simulate(model: Any, args: tuple | None = None, *, target: str = "accel:fusemax",
             pipeline: str = "default") -> "Simulation":
    """Run ``model``'s kernels for the accelerator ``target`` on this CPU as the emitted C, on
    ``args`` (static shapes): a :class:`~einfuse.codegen.accel.Simulation` with the outputs (by
    name) and what the runtime counted per kernel (cycles of each array, DRAM bytes, latency)."""
    from .codegen.accel import simulate as run
    from .targets import Target
    t = Target.parse(target)
    if t.kind != "accel":
        raise EinfuseError(f"simulate: {target} is not an accelerator (accel:fusemax{{...}})")
    cascade = laid_out(optimized(model, args, pipeline=pipeline, target=t.name), t)
    inputs = [x.name for x in cascade.tensors if x.role == "input"]
    if len(args or ()) != len(inputs):
        raise EinfuseError(f"simulate: {len(inputs)} inputs ({', '.join(inputs)}), {len(args or ())} given")
    if isinstance(model, Cascade):
        values = dict(zip(inputs, args or ()))
    else:
        values = {n: a.detach().numpy() for n, a in zip(inputs, args)}
    return run(cascade, t, values)


def tune(model: Any, args: tuple | None = None, *, target: str = "cpu", trials: int = 64,
         tuning_db: str | Path | None = None, pipeline: str = "default", rpc_tracker: str | None = None,
         rpc_key: str | None = None, cost_model: str = "xgb", progress: Callable[[str], None] = print) -> list:
    """Tune ``model``'s kernels with MetaSchedule, ``trials`` candidates per kernel, into
    ``tuning_db`` (default ``<cache>/tuning``), measuring on the devices of an RPC tracker
    (``HOST:PORT``, with ``rpc_key``) if given; :func:`compile` then uses the records. Returns a
    :class:`~einfuse.tuning.TaskResult` per task. See docs/tuning.md."""
    from .targets import Target
    from .tuning import TuningDatabase, check_cost_model
    from .tuning import tune as run
    check_cost_model(cost_model)   # (before the minutes of capture and tuning)
    if (rpc_tracker is None) != (rpc_key is None):
        raise EinfuseError("tune: --rpc-tracker and --rpc-key go together")
    t = Target.parse(target)
    cascade = laid_out(optimized(model, args, pipeline=pipeline, target=t.name), t)
    database = TuningDatabase.at(Path(tuning_db) if tuning_db else default_cache_dir() / "tuning", t)
    rpc = (rpc_tracker, rpc_key) if rpc_tracker is not None and rpc_key is not None else None
    return run(cascade, t, trials, database, rpc=rpc, cost_model=cost_model, progress=progress)


def optimized(model: Any, args: tuple | None = None, *, pipeline: str = "default", dynamic_shapes: Any = None,
              target: str = "cpu") -> Cascade:
    """The cascade of ``model`` (captured with example ``args``, or a Cascade) after ``pipeline``;
    ``fuse-attention`` without a tile of its own takes ``target``'s."""
    from dataclasses import replace

    from .passes import FuseAttention, PassManager
    from .passes import pipeline as named_pipeline
    passes = named_pipeline(pipeline)  # a named pipeline or pipeline text; bad text fails before capture
    passes = [replace(p, target=target) if isinstance(p, FuseAttention) and not p.tile and p.target == "cpu" else p
              for p in passes]
    if isinstance(model, Cascade):
        cascade = verify(model)
    else:
        if args is None:
            raise EinfuseError("compile: a torch model needs example args, e.g. einfuse.compile(model, (x,))")
        from .frontends import capture
        cascade = capture(model, args, dynamic_shapes=dynamic_shapes)
    return PassManager(passes).run(cascade)


def laid_out(cascade: Cascade, target: Any) -> Cascade:
    """``cascade`` with the target's operand layouts, then grouped into kernels (the side table)."""
    from .codegen.layout import materialize_operands, pack_weights, transpose_weights
    from .codegen.schedules.cpu import ragged
    from .passes import GroupKernels, PassManager
    cascade = pack_weights(transpose_weights(cascade), target)
    cascade = materialize_operands(cascade, lambda rows, cols: ragged(target, rows, cols))
    grouping = GroupKernels(attention=target.kind != "accel")   # (an accelerator's phases go through DRAM)
    return PassManager([grouping]).run(cascade)   # (last: the groups of the code generated)


def tuning_database(tuning_db: str | Path | bool | None, target: str, cache: Path | None = None) -> Any:
    """The :class:`~einfuse.tuning.TuningDatabase` of ``target`` that ``tuning_db`` names (see
    :func:`compile`), or None where there is none to read."""
    from .targets import Target
    from .tuning import TuningDatabase
    if tuning_db is False:
        return None
    explicit = tuning_db not in (None, True)
    root = Path(tuning_db) if explicit else (cache or default_cache_dir()) / "tuning"  # type: ignore[arg-type]
    database = TuningDatabase.at(root, Target.parse(target))
    if database.open() is not None:
        return database
    if explicit and not database.path.is_dir():  # (an unreadable one was reported by open())
        import warnings
        from .tuning import TuningDatabaseWarning
        held = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        warnings.warn(f"{root} holds no tuning records for {database.path.name}"
                      + (f" (only for {', '.join(held)})" if held else "") + "; compiling untuned",
                      TuningDatabaseWarning, stacklevel=3)
    return None


def _compile_cascade(cascade: Cascade, target_name: str, cache: Path, tuning: Any = None) -> Any:
    from .codegen.build import build, cache_key
    from .targets import Target
    target = Target.parse(target_name)
    cascade = laid_out(cascade, target)
    if target.kind != "cpu":   # (a GPU library holds CUDA source that loads only where a GPU is: not cached)
        return build(cascade, target, tuning)
    entry = cache / cache_key(cascade, target, tuning)
    model = _cached(entry)
    if model is None:
        model = build(cascade, target, tuning)
        _store(model, cache, entry)
    return model


def _cached(entry: Path) -> Any:
    """The model the cache entry holds, or None where it has none or a damaged one (rebuilt and
    replaced, never trusted: every file is checked before the library is loaded)."""
    from .codegen.persist import load
    from .errors import LoadError
    try:
        return load(entry) if (entry / "model.so").is_file() else None
    except (LoadError, OSError):
        return None


def _store(model: Any, cache: Path, entry: Path) -> None:
    """Write ``model`` as the cache entry ``entry`` (built beside it, renamed into place: an entry
    another process wrote first is kept) and keep the entry's checked library on the model for its
    exports; a cache that cannot be written is reported once."""
    from .cache import warn_once
    from .codegen.persist import store, stored_library
    try:
        store(model, entry)
        model.stored = stored_library(entry)
    except (OSError, RuntimeError) as exc:   # (RuntimeError: TVM's linker, e.g. on a full disk)
        warn_once(f"store {cache}", f"einfuse cannot write the compile cache {cache} ({type(exc).__name__}: "
                  f"{exc}); the model works but is not cached (set EINFUSE_CACHE or cache_dir=)")
