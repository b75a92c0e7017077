"""``einfuse.compile``: frontend -> passes -> codegen, nothing else."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .cache import default_cache_dir
from .errors import EinfuseError
from .ir import Cascade, verify

if TYPE_CHECKING:
    from .codegen.accel import Simulation


def compile(model: Any, args: tuple | None = None, *, target: str = "cpu", pipeline: str = "default",
            dynamic_shapes: Any = None, cache_dir: str | Path | None = None,
            tuning_db: str | Path | bool | None = None, quantize: str | None = None, fallback: bool = False,
            moe: str | None = None) -> Any:
    """Compile a torch model (with example ``args``) or a :class:`~einfuse.ir.Cascade` for ``target``.

    ``pipeline`` is ``"default"``, ``"none"`` or pipeline text (``"canonicalize"``; see
    docs/inspect.md). Returns a :class:`~einfuse.codegen.runtime.CompiledModel`. A compiled
    library is cached under ``cache_dir`` (default ``$EINFUSE_CACHE`` or ``~/.cache/einfuse``), keyed by the cascade, its
    weights, the target, the versions and the code generator's source, so compiling the same
    model again only loads it. Kernels tuned by ``einfuse tune`` (docs/tuning.md) take their best
    schedule from ``tuning_db`` (default: ``<cache_dir>/tuning`` where it exists; ``False``: none).
    ``quantize`` (``"q4_0"``, ``"int8"``, ...: docs/quantization.md) stores the weights quantized
    (the ``quantize`` pass, after ``pipeline``). ``moe`` sets the options of the pipeline's ``moe``
    pass: ``"capacity"`` (Tutel's capacity factor 1.25: tokens over an expert's capacity dropped) or
    ``"mode=capacity,factor=2"``; default dropless (docs/moe.md). With ``fallback``, a torch model using operators
    einfuse has no rule for compiles in parts: each subgraph of supported operators compiled, the
    rest run in eager, a warning naming them (a ``torch.fx.GraphModule`` is returned then;
    docs/torch_compile.md).
    """
    from .codegen.backends import backend_for
    if fallback and not isinstance(model, Cascade):
        return _with_fallback(model, args, dict(target=target, pipeline=pipeline, dynamic_shapes=dynamic_shapes,
                                                cache_dir=cache_dir, tuning_db=tuning_db, quantize=quantize, moe=moe))
    pipeline = with_quantize(with_moe(pipeline, moe), quantize)
    backend = backend_for(target)   # (an unknown name fails here, listing the known ones)
    backend.check_runs()
    cascade = laid_out(optimized(model, args, pipeline=pipeline, dynamic_shapes=dynamic_shapes, target=backend.target),
                       backend.target)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return _compile_cascade(cascade, backend, cache, tuning_database(tuning_db, backend.target, cache))


def _with_fallback(model: Any, args: tuple | None, options: dict) -> Any:
    """``compile(model, args, **options)``, or where operators have no rule the model in parts."""
    from .errors import UnsupportedOperatorError
    from .frontends.partition import partitioned
    from .frontends.torch_export import export_aten
    try:
        return compile(model, args, **options)
    except UnsupportedOperatorError as exc:
        if options["dynamic_shapes"] is not None:
            raise EinfuseError(f"fallback=True takes static shapes only (yet): {exc}") from None
        options.pop("dynamic_shapes")
        module = export_aten(model, tuple(args or ()), {}, None).module()
        return partitioned(module, tuple(args or ()), lambda m, a: compiled_graph(m, a, **options),
                           [op for op, _ in exc.ops])


def compiled_graph(module: Any, args: tuple, **options: Any) -> Any:
    """An ATen graph module compiled, called as the graph is: a tuple back where it returns one."""
    from .frontends.partition import single_output
    model = compile(module, args, **options)

    def run(*inputs: Any) -> Any:
        out = model(*inputs)
        return out if isinstance(out, tuple) else (out,)
    called = single_output(module, run)
    called.einfuse_model = model   # type: ignore[attr-defined]   # (einfuse compile --fallback exports each)
    return called


def kernels(model: Any, args: tuple | None = None, *, target: str, output: str | Path,
            pipeline: str = "default", dynamic_shapes: Any = None, harness: bool = False, data: bool = False,
            quantize: str | None = None) -> Path:
    """Write the source of every kernel of ``model`` for ``target`` into directory ``output``,
    with ``manifest.json`` (see :mod:`einfuse.codegen.emit`); returns the manifest's path.
    ``harness`` (CUDA) adds the host program that runs them with nvcc alone (``make && ./run``,
    :mod:`einfuse.codegen.harness`) and ``data`` its data for ``args``: the inputs, the weights
    and every kernel's output computed here (random inputs for a cascade given none)."""
    from .codegen.emit import write_kernels
    from .targets import Target
    if data and not harness:
        raise EinfuseError("kernels: data= writes the harness's data: give harness=True too")
    t = Target.parse(target)
    pipeline = with_quantize(pipeline, quantize)
    cascade = laid_out(optimized(model, args, pipeline=pipeline, dynamic_shapes=dynamic_shapes, target=t), t)
    inputs = _input_values(cascade, model, args) if data else None
    return write_kernels(cascade, t, Path(output), harness=harness, inputs=inputs)


def _input_values(cascade: Cascade, model: Any, args: tuple | None) -> dict[str, Any]:
    """The cascade's inputs by name: ``args`` (tensors or arrays), or for a cascade given none
    random ones (normal floats, zero integers, true booleans) of its static sizes."""
    import numpy as np

    from .ir.dtypes import DTYPES
    decls = [t for t in cascade.tensors if t.role == "input"]
    if args:
        return {d.name: np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for d, a in zip(decls, args)}
    rng, size = np.random.default_rng(0), {r.name: r.size for r in cascade.ranks}
    out = {}
    for d in decls:
        shape = [size[r.rank] for r in d.ranks]
        kind = DTYPES[d.dtype]
        out[d.name] = rng.standard_normal(shape) if kind.is_float else np.ones(shape, dtype=kind.numpy) \
            if d.dtype == "bool" else np.zeros(shape, dtype=kind.numpy)
    return out


def simulate(model: Any, args: tuple | None = None, *, target: str = "accel:fusemax",
             pipeline: str = "default") -> "Simulation":
    """Run ``model``'s kernels for the accelerator ``target`` on this CPU as the emitted C, on
    ``args`` (static shapes): a :class:`~einfuse.codegen.accel.Simulation` with the outputs (by
    name) and what the runtime counted per kernel (cycles of each array, DRAM bytes, latency)."""
    from .codegen.backends import backend_for
    backend = backend_for(target)
    backend.check_simulates()
    t = backend.target
    cascade = laid_out(optimized(model, args, pipeline=pipeline, target=t), t)
    inputs = [x.name for x in cascade.tensors if x.role == "input"]
    if len(args or ()) != len(inputs):
        raise EinfuseError(f"simulate: {len(inputs)} inputs ({', '.join(inputs)}), {len(args or ())} given")
    if isinstance(model, Cascade):
        values = dict(zip(inputs, args or ()))
    else:
        values = {n: a.detach().numpy() for n, a in zip(inputs, args)}
    return backend.simulate(cascade, values)


def tune(model: Any, args: tuple | None = None, *, target: str = "cpu", trials: int = 64,
         tuning_db: str | Path | None = None, pipeline: str = "default", rpc_tracker: str | None = None,
         rpc_key: str | None = None, cost_model: str = "xgb", progress: Callable[[str], None] = print) -> list:
    """Tune ``model``'s kernels with MetaSchedule, ``trials`` candidates per kernel, into
    ``tuning_db`` (default ``<cache>/tuning``), measuring on the devices of an RPC tracker
    (``HOST:PORT``, with ``rpc_key``) if given; :func:`compile` then uses the records. Returns a
    :class:`~einfuse.codegen.tuning.TaskResult` per task. See docs/tuning.md."""
    from .codegen.tuning import TuningDatabase, check_cost_model
    from .codegen.tuning import tune as run
    from .targets import Target
    check_cost_model(cost_model)   # (before the minutes of capture and tuning)
    if (rpc_tracker is None) != (rpc_key is None):
        raise EinfuseError("tune: --rpc-tracker and --rpc-key go together")
    t = Target.parse(target)
    cascade = laid_out(optimized(model, args, pipeline=pipeline, target=t), t)
    database = TuningDatabase.at(Path(tuning_db) if tuning_db else default_cache_dir() / "tuning", t)
    rpc = (rpc_tracker, rpc_key) if rpc_tracker is not None and rpc_key is not None else None
    return run(cascade, t, trials, database, rpc=rpc, cost_model=cost_model, progress=progress)


def optimized(model: Any, args: tuple | None = None, *, pipeline: str = "default", dynamic_shapes: Any = None,
              target: Any = "cpu") -> Cascade:
    """The cascade of ``model`` (captured with example ``args``, or a Cascade) after ``pipeline``
    (in which ``codegen`` stands for the target's codegen pipeline), each pass given ``target``
    (a Target or its name) in its context."""
    from .passes import PassContext, PassManager
    from .passes import pipeline as named_pipeline
    from .targets import Target
    t = Target.parse(target)
    passes = named_pipeline(pipeline, codegen=codegen_pipeline(t))   # (bad text fails before capture)
    if isinstance(model, Cascade):
        cascade = verify(model)
    else:
        if args is None:
            raise EinfuseError("compile: a torch model needs example args, e.g. einfuse.compile(model, (x,))")
        cascade = captured(model, args, dynamic_shapes=dynamic_shapes)
    inputs = _input_values(cascade, model, args) if args else None   # (calibration data, for quantize's awq)
    return PassManager(passes).run(cascade, PassContext(t, inputs=inputs))


def captured(model: Any, args: tuple, *, dynamic_shapes: Any = None) -> Cascade:
    """The cascade of torch ``model``, each weight quantized before capture (by torchao, or loaded
    from a GGUF file by :func:`einfuse.load_gguf`) read through its own integers and scales, as the
    ``quantize`` pass writes them (docs/quantization.md, "Importing pre-quantized weights")."""
    from .frontends import capture, prequantized
    from .passes.quantize import read_imported
    model, weights = prequantized.split(model)
    return read_imported(capture(model, args, dynamic_shapes=dynamic_shapes), weights)


def with_moe(pipeline: str, moe: str | None) -> str:
    """``pipeline`` with its ``moe`` pass given ``moe``'s options (a mode, ``"capacity"``, or the
    pass's options, ``"mode=capacity,factor=2"``); appended where the pipeline has none."""
    if not moe:
        return pipeline
    from .passes.pipeline import NAMED_TEXT
    options = f"moe{{{moe if '=' in moe else 'mode=' + moe}}}"
    items = [NAMED_TEXT.get(item.strip(), item) for item in re.split(r",(?![^{]*\})", pipeline)]
    items = [part for item in items for part in re.split(r",(?![^{]*\})", item) if part.strip()]
    found = [i for i, item in enumerate(items) if item.strip().split("{")[0] == "moe"]
    if not found:
        return ",".join(items + [options])
    return ",".join(options if i in found else item for i, item in enumerate(items))


def with_quantize(pipeline: str, quantize: str | None) -> str:
    """``pipeline`` with the ``quantize`` pass last, if ``quantize`` is given: a format
    (``"q4_0"``) or the pass's options (``"format=q4_0,method=awq,head=true"``)."""
    if not quantize:
        return pipeline
    return f"{pipeline},quantize{{{quantize if '=' in quantize else 'format=' + quantize}}}"


@dataclass(frozen=True)
class QuantizationReport:
    """:func:`quantization_report`'s findings: per weight (:class:`~einfuse.passes.quant_report.LayerRow`)
    and end to end, the compiled quantized model's outputs against the compiled float32 model's
    on the example inputs (relative error and cosine, each output)."""

    format: str
    layers: list
    output_error: dict[str, float]
    cosine: dict[str, float]

    def text(self) -> str:
        from .passes.quant_report import layers_table
        ends = [f"output {name}: relative error {self.output_error[name]:.3e}, cosine {self.cosine[name]:.6f} "
                f"(vs float32, compiled, on the example inputs)" for name in self.output_error]
        return "\n".join([layers_table(self.layers, self.format), *ends])


def quantization_report(model: Any, args: tuple, quantize: str, *, pipeline: str = "default",
                        target: str = "cpu") -> QuantizationReport:
    """What quantizing ``model`` as ``quantize`` (as :func:`compile` takes it) does: each
    weight's error and bytes, and the compiled model's output error on ``args``."""
    import numpy as np

    from .passes import pipeline as named_pipeline
    from .passes.quant_report import layer_rows
    (options,) = named_pipeline(with_quantize("none", quantize))
    cascade = optimized(model, args, pipeline=pipeline, target=target)
    rows = layer_rows(cascade, options.format, options.method, options.head, _input_values(cascade, model, args))
    outs = [np.asarray(o, dtype=np.float64) for o in _outputs(compile(model, args, target=target, pipeline=pipeline), args)]
    got = _outputs(compile(model, args, target=target, pipeline=pipeline, quantize=quantize), args)
    names = [t.name for t in cascade.tensors if t.role == "output"]
    errors, cosines = {}, {}
    for name, ref, q in zip(names, outs, got):
        q = np.asarray(q, dtype=np.float64)
        errors[name] = float(np.linalg.norm(q - ref) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny))
        cosines[name] = float((q.ravel() @ ref.ravel()) / max(np.linalg.norm(q) * np.linalg.norm(ref), np.finfo(np.float64).tiny))
    return QuantizationReport(options.format, rows, errors, cosines)


def _outputs(compiled: Any, args: tuple) -> list:
    """``compiled``'s outputs on ``args`` as numpy arrays, a list even for one."""
    out = compiled(*args)
    return [o.detach().numpy() if hasattr(o, "detach") else o for o in (out if isinstance(out, (list, tuple)) else [out])]


def laid_out(cascade: Cascade, target: Any) -> Cascade:
    """``cascade`` as ``target``'s backend receives it: its codegen pipeline (the operand layouts,
    then the grouping into kernels, the side table) run over it."""
    from .passes import PassContext, PassManager, pipeline
    from .targets import Target
    t = Target.parse(target)
    return PassManager(pipeline(codegen_pipeline(t))).run(cascade, PassContext(t))


def codegen_pipeline(target: Any) -> str:
    """The pipeline text of ``target``'s backend (what ``codegen`` stands for in pipeline text)."""
    from .codegen.backends import backend_for
    return backend_for(target).pipeline


def tuning_database(tuning_db: str | Path | bool | None, target: str, cache: Path | None = None) -> Any:
    """The :class:`~einfuse.codegen.tuning.TuningDatabase` of ``target`` that ``tuning_db`` names (see
    :func:`compile`), or None where there is none to read."""
    from .codegen.tuning import TuningDatabase
    from .targets import Target
    if tuning_db is False:
        return None
    explicit = tuning_db not in (None, True)
    root = Path(tuning_db) if explicit else (cache or default_cache_dir()) / "tuning"  # type: ignore[arg-type]
    database = TuningDatabase.at(root, Target.parse(target))
    if database.open() is not None:
        return database
    if explicit and not database.path.is_dir():  # (an unreadable one was reported by open())
        import warnings
        from .codegen.tuning import TuningDatabaseWarning
        held = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        warnings.warn(f"{root} holds no tuning records for {database.path.name}"
                      + (f" (only for {', '.join(held)})" if held else "") + "; compiling untuned",
                      TuningDatabaseWarning, stacklevel=3)
    return None


def _compile_cascade(cascade: Cascade, backend: Any, cache: Path, tuning: Any = None) -> Any:
    """The model of a laid-out cascade: from the compile cache where its backend caches and the
    entry is sound, else built (and stored there)."""
    from .codegen.build import cache_key
    from .codegen.runtime import build
    if not backend.cached:
        return build(cascade, backend.target, tuning)
    entry = cache / cache_key(cascade, backend.target, tuning)
    model = _cached(entry)
    if model is None:
        model = build(cascade, backend.target, tuning)
        _store(model, cache, entry)
    return model


def _cached(entry: Path) -> Any:
    """The model the cache entry holds, or None where it has none or a damaged one (rebuilt and
    replaced, never trusted: every file is checked before the library is loaded)."""
    from .codegen.runtime import load
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
