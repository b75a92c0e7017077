"""The ``einfuse`` command. Subcommands: ``ir`` (capture or read a cascade, run passes over it with
IR-inspection instruments, print and analyse it) and
``compile`` (compile it for a target, write the library and print the report), ``quantize`` (each
weight's error and bytes under a quantization format, and the output's), ``report`` (time
each kernel against the cost model's estimate; ``--plot`` draws the roofline), ``tune`` (tune its
kernels with MetaSchedule into a database that ``compile`` reads), ``generate`` (a causal LM's
prefill and decode programs: time to first token, tokens/s; :mod:`einfuse.lm_cli`), ``kernels``
(write each kernel's source for a target, with a manifest; no device needed) and ``cache``
(``status`` or ``clear`` the compile cache).

MODEL is a ``.ein`` file, ``zoo:NAME`` (a model of :mod:`einfuse.zoo`) or ``path/to/file.py:function``
(a function returning ``(model, example_args)``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from . import lm_cli
from .errors import EinfuseError
from .ir import Cascade, verify
from .ir.parser import parse_file
from .ir.analysis import analyze_passes, cascade_costs, compulsory_bytes, format_number, format_table, total_cost
from .ir.scope import loop_vars, reduced_vars
from .ir.text import access_text


QUANTIZE_HELP = ("store the weights quantized: int8, q8_0, q4_0, int4-g32|64|128, b1, or the quantize pass's "
                 "options (format=q4_0,method=awq,head=true; compute=int8: int8 activations, integer dot products; "
                 "docs/quantization.md)")


DYNAMIC_HELP = ("a dynamic dimension: axis AXIS of forward's argument ARG from MIN to MAX (input_ids:1=2:512); "
                "ARG:AXIS,ARG:AXIS=MIN:MAX shares one size; repeatable")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``einfuse`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="einfuse", description="einfuse: an einsum-cascade compiler for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    ir = sub.add_parser("ir", help="print the verified IR of a model or cascade")
    ir.add_argument("model", help="a .ein file, zoo:NAME, or path/to/file.py:function returning (model, args)")
    ir.add_argument("--stats", action="store_true", help="add FLOPs, bytes, intensity and pass counts")
    ir.add_argument("-p", "--pipeline", default="none",
                    help="passes to run: a named pipeline (default, none), text such as 'canonicalize', and "
                         "'codegen' for the target's codegen passes ('default,codegen': the IR codegen receives)")
    ir.add_argument("--target", default="cpu", help="the target the passes are given (default: cpu, the host)")
    ir.add_argument("--dynamic", action="append", default=[], metavar="ARG:AXIS=MIN:MAX", help=DYNAMIC_HELP)
    ir.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    ir.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                    help="print the IR after the named pass (repeatable)")
    ir.add_argument("--print-ir-after-change", action="store_true", help="print the IR after passes that changed it")
    ir.add_argument("--dump-ir-to", metavar="DIR", help="write NNN_<pass>.ein after every pass")
    ir.add_argument("--time-passes", action="store_true", help="print each pass's time and pattern counts")
    ir.add_argument("--disable-pass", action="append", default=[], metavar="PASS", help="skip a pass by name")
    comp = sub.add_parser("compile", help="compile a model: write its library and print its report")
    comp.add_argument("model", help="a .ein file, zoo:NAME, or path/to/file.py:function returning (model, args)")
    comp.add_argument("--target", default="cpu", help="compilation target (default: cpu, the host)")
    comp.add_argument("-o", "--output", required=True, help="directory for model.so, model.json and report.txt")
    comp.add_argument("--no-cache", action="store_true", help="compile even if the cache has this model")
    comp.add_argument("-p", "--pipeline", default="default", help="passes to run first (default: default)")
    comp.add_argument("--tuning-db", metavar="DIR", help="tuning records to use (default: the cache's tuning/)")
    comp.add_argument("--no-tuning", action="store_true", help="use the rule-based schedules only")
    comp.add_argument("--quantize", metavar="FORMAT", help=QUANTIZE_HELP)
    comp.add_argument("--dynamic", action="append", default=[], metavar="ARG:AXIS=MIN:MAX", help=DYNAMIC_HELP)
    comp.add_argument("--fallback", action="store_true",
                      help="where operators have no rule, compile the subgraphs between them, each written to "
                           "OUTPUT/<subgraph>/ (the rest runs in eager: use einfuse.compile(..., fallback=True))")
    tune = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule; compile then uses the records")
    tune.add_argument("model", help="a .ein file, zoo:NAME, or path/to/file.py:function returning (model, args)")
    tune.add_argument("--target", default="cpu", help="compilation target (default: cpu, the host)")
    tune.add_argument("--trials", type=int, default=64, help="candidates measured per kernel (default 64)")
    tune.add_argument("--db", metavar="DIR", help="the tuning database (default: the cache's tuning/)")
    tune.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on devices of this TVM RPC tracker")
    tune.add_argument("--rpc-key", metavar="KEY", help="the device key registered with the tracker")
    tune.add_argument("--cost-model", default="xgb", choices=("xgb", "random"),
                      help="MetaSchedule's cost model (xgb needs einfuse[tune]; default xgb)")
    tune.add_argument("-p", "--pipeline", default="default", help="passes to run first (default: default)")
    rep = sub.add_parser("report", help="compile a model, time each kernel and compare with the cost model")
    rep.add_argument("model", help="zoo:NAME or path/to/file.py:function returning (model, args)")
    rep.add_argument("--plot", metavar="FILE", help="draw the kernels on the roofline (a .png; needs matplotlib)")
    rep.add_argument("-p", "--pipeline", default="default", help="passes to run first (default: default)")
    rep.add_argument("--quantize", metavar="FORMAT", help=QUANTIZE_HELP)
    quant = sub.add_parser("quantize", help="what quantizing a model does: each weight's error and bytes, the output's error")
    quant.add_argument("model", help="zoo:NAME or path/to/file.py:function returning (model, args)")
    quant.add_argument("--format", required=True, help="int8, q8_0, q4_0, int4-g32|64|128, b1 (docs/quantization.md)")
    quant.add_argument("--method", default="rtn", choices=("rtn", "awq"), help="scales: round to nearest, or AWQ's on the example inputs")
    quant.add_argument("--head", action="store_true", help="quantize the LM head too")
    quant.add_argument("-p", "--pipeline", default="default", help="passes to run first (default: default)")
    kern = sub.add_parser("kernels", help="write each kernel's source for a target, with manifest.json")
    kern.add_argument("model", help="a .ein file, zoo:NAME, or path/to/file.py:function returning (model, args)")
    kern.add_argument("--target", required=True, help="cpu, cuda:sm_80|a100|sm_90|h100|h200|sm_XX, accel:fusemax")
    kern.add_argument("-o", "--output", required=True, help="directory for the sources and manifest.json")
    kern.add_argument("-p", "--pipeline", default="default", help="passes to run first (default: default)")
    kern.add_argument("--quantize", metavar="FORMAT", help=QUANTIZE_HELP)
    kern.add_argument("--harness", action="store_true",
                      help="cuda:*: add main.cu and a Makefile that run the kernels with nvcc alone (make && ./run)")
    kern.add_argument("--data", action="store_true",
                      help="with --harness: write the example inputs, weights and every kernel's CPU reference to data/")
    lm_cli.add_parser(sub)
    cache = sub.add_parser("cache", help="the compile cache: status or clear")
    cache.add_argument("action", choices=("status", "clear"))
    cache.add_argument("--tuning", action="store_true", help="clear: remove the tuning records too")
    cache.add_argument("--dir", help="the cache directory (default: $EINFUSE_CACHE or ~/.cache/einfuse)")
    args = parser.parse_args(argv)
    try:
        commands = {"ir": _ir, "compile": _compile, "tune": _tune, "report": _report, "kernels": _kernels,
                    "cache": _cache, "quantize": _quantize, "generate": lm_cli.generate}
        return commands[args.command](args)
    except EinfuseError as err:
        print(f"einfuse: error: {getattr(args, 'model', args.command)}: {err}", file=sys.stderr)
        return 1
    except OSError as err:   # (a path given on the command line: missing, unwritable, a file for a directory)
        where = f": {err.filename}" if err.filename else ""
        print(f"einfuse: error: {getattr(args, 'model', args.command)}: {err.strerror or err}{where}", file=sys.stderr)
        return 1


def _ir(args: argparse.Namespace) -> int:
    from .api import codegen_pipeline
    from .passes import Instruments, PassContext, PassManager, pipeline
    from .targets import Target
    target = Target.parse(args.target)
    passes = pipeline(args.pipeline, codegen=codegen_pipeline(target))
    before = load_model(args.model, args.dynamic)
    instruments = Instruments(
        verify_each=True, print_after_all=args.print_ir_after_all, print_after=frozenset(args.print_ir_after),
        print_after_change=args.print_ir_after_change, dump_dir=Path(args.dump_ir_to) if args.dump_ir_to else None,
        time_passes=args.time_passes or args.stats, disabled=frozenset(args.disable_pass))
    manager = PassManager(passes, instruments, lambda text: print(text, file=sys.stderr))
    cascade = manager.run(before, PassContext(target))
    print(cascade, end="")
    if args.stats:
        print()
        if manager.records:
            print("before the pipeline:")
            print(stats_text(before))
            print("\nafter the pipeline:")
        print(stats_text(cascade))
    return 0


def _compile(args: argparse.Namespace) -> int:
    import tempfile

    from .api import compile as compile_cascade
    from .cache import default_cache_dir
    from .codegen.persist import check_destination
    out = Path(args.output)
    check_destination(out)   # (before minutes of compiling)
    model, example = load_torch_model(args.model)
    tuning = False if args.no_tuning else args.tuning_db
    if tuning is None and args.no_cache and (default_cache_dir() / "tuning").is_dir():
        tuning = default_cache_dir() / "tuning"   # (the scratch cache below has no tuning records)
    with tempfile.TemporaryDirectory() as scratch:
        compiled = compile_cascade(model, example, target=args.target, pipeline=args.pipeline,
                                   cache_dir=scratch if args.no_cache else None, tuning_db=tuning,
                                   quantize=args.quantize, dynamic_shapes=dynamic_shapes(model, args.dynamic),
                                   fallback=args.fallback and not isinstance(model, Cascade))
    if not hasattr(compiled, "export"):   # (--fallback, in parts)
        return _write_parts(compiled, out)
    report = compiled.report(example if not isinstance(model, Cascade) else None)
    compiled.export(out, {"report.txt": report + "\n"})
    print(report)
    print(f"wrote {out / 'model.so'}, {out / 'model.json'}, {out / 'report.txt'}")
    return 0


def _write_parts(module: Any, out: Path) -> int:
    """Each compiled subgraph of a partitioned model exported to ``out/<subgraph>/`` with its report."""
    from .frontends.partition import compiled_parts
    parts = compiled_parts(module)
    for name, part in parts.items():
        report = part.report()
        part.export(out / name, {"report.txt": report + "\n"})
        print(f"{name}:\n{report}\n")
    print(f"wrote {len(parts)} compiled subgraph(s) under {out}; the operators between them run in eager "
          "(einfuse.compile(model, args, fallback=True) runs the whole model)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .api import compile as compile_model
    from .plot import roofline_plot
    from .targets import cost, host_cpu, host_peaks
    model, example = load_torch_model(args.model)
    if isinstance(model, Cascade):
        raise EinfuseError("report needs example inputs to time the kernels: give zoo:NAME or file.py:function")
    compiled = compile_model(model, example, pipeline=args.pipeline, quantize=args.quantize)
    table = compiled.kernel_times(example)
    print(compiled.report(example, table))
    if args.plot:
        machine = cost.measured(host_cpu(), host_peaks())
        print(f"wrote {roofline_plot(table, machine, args.plot, title=args.model)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .api import tune
    from .codegen.tuning import check_cost_model
    check_cost_model(args.cost_model)   # (before the model is captured)
    model, example = load_torch_model(args.model)
    results = tune(model, example, target=args.target, trials=args.trials, tuning_db=args.db, pipeline=args.pipeline,
                   rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, cost_model=args.cost_model,
                   progress=lambda line: print(line, flush=True))
    rows = [(r.name, str(r.before), str(r.measured), "-" if r.best_seconds is None else f"{r.best_seconds * 1e3:.3f}")
            for r in results]
    print("\n".join(format_table(("task", "records before", "measured", "best ms"), rows, ruler=False)))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from . import cache
    from .cache import default_cache_dir
    path = Path(args.dir) if args.dir else default_cache_dir()
    if args.action == "status":
        print(cache.status(path))
    else:
        print(f"removed {cache.clear(path, tuning=args.tuning)}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    import json

    from .api import kernels
    model, example = load_torch_model(args.model)
    manifest = kernels(model, example, target=args.target, output=args.output, pipeline=args.pipeline,
                       harness=args.harness or args.data, data=args.data, quantize=args.quantize)
    written = json.loads(manifest.read_text())
    print(f"wrote {len(written['kernels'])} kernels and {manifest}")
    if args.harness or args.data:
        data = written["data_bytes"]
        print(f"harness: {manifest.parent / 'main.cu'}, {manifest.parent / 'Makefile'} (make && ./run)"
              + (f"; data/: {data / 2 ** 20:.1f} MiB" if data is not None else "; no data (add --data)"))
    report = manifest.parent / "report.md"
    lines = report.read_text().splitlines() if report.is_file() else []
    for line in lines:
        if line.startswith("Whole model"):   # (an accelerator's modelled timing, its sizes bound)
            print(f"{line} ({report})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .api import quantization_report
    model, example = load_torch_model(args.model)
    if isinstance(model, Cascade):
        raise EinfuseError("quantize needs example inputs to measure the error: give zoo:NAME or file.py:function")
    options = f"format={args.format},method={args.method}" + (",head=true" if args.head else "")
    print(quantization_report(model, example, options, pipeline=args.pipeline).text())
    return 0


def load_torch_model(spec: str) -> tuple:
    """``(model, example_args)`` for zoo:NAME or file.py:function, ``(cascade, None)`` for .ein."""
    if spec.startswith("zoo:"):
        from . import zoo
        return zoo.build(spec[4:])
    path, function = spec.rsplit(":", 1) if ".py:" in spec else (spec, "")
    if not Path(path).is_file():
        raise EinfuseError("no such file")
    if path.endswith(".py"):
        return _call_builder(Path(path), function)
    return verify(parse_file(path)), None


def load_model(spec: str, dynamic: Sequence[str] = ()) -> Cascade:
    """The cascade MODEL names: parsed from a .ein file, or captured from a zoo or user model
    (with the ``--dynamic`` dimensions given)."""
    model, example = load_torch_model(spec)
    if isinstance(model, Cascade):
        return model
    from .api import captured
    return captured(model, example, dynamic_shapes=dynamic_shapes(model, dynamic))


def dynamic_shapes(model: object, specs: Sequence[str]) -> dict | None:
    """``torch.export``'s ``dynamic_shapes`` for ``model`` from ``--dynamic`` specs
    (``ARG:AXIS[,ARG:AXIS...]=MIN:MAX``), or None for none."""
    if not specs:
        return None
    if isinstance(model, Cascade):
        raise EinfuseError("--dynamic applies to a torch model (a .ein file declares its own sizes)")
    import inspect

    import torch
    names = list(inspect.signature(model.forward).parameters)   # type: ignore[attr-defined]
    shapes: dict = {name: None for name in names}
    for spec in specs:
        match = re.fullmatch(r"((?:\w+:\d+,)*\w+:\d+)=(\d+):(\d+)", spec.replace(" ", ""))
        if not match:
            raise EinfuseError(f"--dynamic {spec!r}: write ARG:AXIS=MIN:MAX, e.g. input_ids:1=2:512")
        first, axis = match[1].split(",")[0].split(":")
        dim = torch.export.Dim(f"{first}_{axis}", min=int(match[2]), max=int(match[3]))
        for part in match[1].split(","):
            arg, axis = part.split(":")
            if arg not in shapes:
                raise EinfuseError(f"--dynamic {spec!r}: forward has no argument '{arg}'; it has {', '.join(names)}")
            shapes[arg] = {**(shapes[arg] or {}), int(axis): dim}
    return shapes


def _call_builder(path: Path, function: str) -> tuple:
    import importlib.util
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    builder = getattr(module, function, None)
    if not callable(builder):
        raise EinfuseError(f"{path} has no function '{function}' (MODEL is path/to/file.py:function)")
    built = builder()
    if not (isinstance(built, tuple) and len(built) == 2):
        raise EinfuseError(f"{path}:{function} must return (model, example_args)")
    return built


def stats_text(c: Cascade) -> str:
    """The ``--stats`` report: a cost table per Einsum and pass counts per reduced rank."""
    rows = [(str(i), access_text(e.lhs), format_number(k.flops), format_number(k.bytes), format_number(k.intensity))
            for i, (e, k) in enumerate(cascade_costs(c), 1)]
    total = total_cost(c)
    rows.append(("", "total (unfused)", format_number(total.flops), format_number(total.bytes), format_number(total.intensity)))
    lines = format_table(("#", "einsum", "FLOPs", "bytes", "FLOP/byte"), rows)
    lines.append(f"compulsory bytes (inputs, params, outputs): {format_number(compulsory_bytes(c))}")
    lines.append("")
    pass_rows = []
    for group in pass_rank_groups(c):
        report = analyze_passes(c, group)
        live = ", ".join(t.name + (" (full fiber)" if t.full_fiber else "") for t in report.live) or "-"
        pass_rows.append((",".join(group), str(report.passes), live))
    lines += format_table(("rank", "passes", "live across passes"), pass_rows)
    return "\n".join(lines)


def pass_rank_groups(c: Cascade) -> list[list[str]]:
    """Ranks worth a pass count: each reduced or iterated rank, and split ranks together (M1,M0;
    fuse-attention's key tiles S_2T,S_2I)."""
    var_rank = {r.var: r.name for r in c.ranks}
    names: list[str] = []
    for e, loops in c.einsums():
        names += [var_rank[v] for v in reduced_vars(e, loop_vars(loops))] + [lp.rank for lp in loops]
    singles = list(dict.fromkeys(names))
    groups = [[r] for r in singles]
    stems: dict[str, list[str]] = {}
    for r in c.ranks:
        m = re.fullmatch(r"(.*\D)(\d+)", r.name)
        if m:
            stems.setdefault(m.group(1), []).append(r.name)
    for parts in stems.values():
        if len(parts) > 1 and any(p in singles for p in parts):
            groups.append(sorted(parts, key=lambda p: -int(re.search(r"\d+$", p).group())))
    groups += [[r, r[:-1] + "I"] for r in singles if r.endswith("T") and r[:-1] + "I" in singles]  # fuse-attention's tiles
    return groups
