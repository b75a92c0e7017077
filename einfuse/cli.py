"""The ``einfuse`` command. Subcommands: ``ir`` (print, verify and analyse a cascade)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import sympy

from .errors import EinfuseError
from .ir import Cascade, parse, verify
from .ir.analysis import analyze_passes, cascade_costs, compulsory_bytes, total_cost
from .ir.scope import loop_vars, reduced_vars
from .ir.text import access_text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``einfuse`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="einfuse", description="einfuse: an einsum-cascade compiler for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    ir = sub.add_parser("ir", help="print the verified IR of a cascade (.ein file)")
    ir.add_argument("model", help="a .ein cascade file")
    ir.add_argument("--stats", action="store_true", help="add FLOPs, bytes, intensity and pass counts")
    args = parser.parse_args(argv)
    try:
        return _ir(args)
    except EinfuseError as err:
        print(f"einfuse: error: {args.model}: {err}", file=sys.stderr)
        return 1


def _ir(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if not path.is_file():
        raise EinfuseError("no such file")
    cascade = verify(parse(path.read_text()))
    print(cascade, end="")
    if args.stats:
        print()
        print(stats_text(cascade))
    return 0


def stats_text(c: Cascade) -> str:
    """The ``--stats`` report: a cost table per Einsum and pass counts per reduced rank."""
    rows = [(str(i), access_text(e.lhs), _num(k.flops), _num(k.bytes), _num(k.intensity))
            for i, (e, k) in enumerate(cascade_costs(c), 1)]
    total = total_cost(c)
    rows.append(("", "total (unfused)", _num(total.flops), _num(total.bytes), _num(total.intensity)))
    lines = _table(("#", "einsum", "FLOPs", "bytes", "FLOP/byte"), rows)
    lines.append(f"compulsory bytes (inputs, params, outputs): {_num(compulsory_bytes(c))}")
    lines.append("")
    pass_rows = []
    for group in pass_rank_groups(c):
        report = analyze_passes(c, group)
        live = ", ".join(t.name + (" (full fiber)" if t.full_fiber else "") for t in report.live) or "-"
        pass_rows.append((",".join(group), str(report.passes), live))
    lines += _table(("rank", "passes", "live across passes"), pass_rows)
    return "\n".join(lines)


def pass_rank_groups(c: Cascade) -> list[list[str]]:
    """Ranks worth a pass count: each reduced or iterated rank, and split ranks together (M1,M0)."""
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
    return groups


def _num(x: sympy.Expr) -> str:
    x = sympy.sympify(x)
    if x.is_Integer:
        return f"{int(x):,}"
    if x.is_number:
        return f"{float(x):.3g}"
    return str(sympy.nsimplify(x) if x.is_rational_function() else x)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
