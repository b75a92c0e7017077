"""The experts section of a mixture-of-experts model's report (issue 22).

Per block the ``moe`` pass rewrote (its tensors ``moe<i>_*``): the mode, and given inputs the
routing they make (``CompiledModel.routing``: the pass's routing outputs): rows (token, slot
pairs) per expert, the load imbalance (the busiest expert's rows over the mean), rows dropped
(capacity mode) and the bytes of expert weights the ``grouped`` kernels read (an expert with no
rows is not read; rows in any order read their experts' weights once per run of equal experts).
Blocks the pass left as they were are listed with its reason.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..ir import Cascade
from ..ir.analysis import format_number, tensors_bytes
from ..ir.grouped import grouped
from ..passes.moe import PREFIX, blocks


def experts_lines(model: Any, args: tuple | None) -> list[str]:
    """The report's lines on ``model``'s experts (none for a model without)."""
    c = model.ir
    lines = [f"experts ({_weights(c, b.contractions)}): not rewritten: {b.problem(c)}" for b in blocks(c)]
    prefixes = sorted({m.group(1) for t in c.tensors if (m := re.fullmatch(rf"({PREFIX}\d+)_expert", t.name))},
                      key=lambda p: int(p[len(PREFIX):]))
    values = model.routing(args) if args is not None and prefixes else {}
    for p in prefixes:
        lines.append(_block_line(c, p, values))
    return lines


def _weights(c: Cascade, stmts: tuple[int, ...]) -> str:
    return ", ".join(a.tensor for i in stmts for a in c.stmts[i].rhs.args   # type: ignore[union-attr]
                     if c.tensor(a.tensor).role == "param")


def _block_line(c: Cascade, p: str, values: dict[str, np.ndarray]) -> str:
    names = {t.name for t in c.tensors}
    mode = "capacity" if f"{p}_queue" in names else "dropless" if f"{p}_place" in names else "unsorted"
    weights = {found.weight for e, _ in c.einsums() if (found := grouped(c, e)) and found.groups.startswith(p + "_")}
    experts = c.rank(c.tensor(next(iter(weights))).ranks[0].rank).size if weights else 0
    per_expert = float(tensors_bytes(c, sorted(weights))) / max(int(experts), 1)
    line = f"experts {p} ({', '.join(sorted(weights))}): {mode}"
    if f"{p}_expert" not in values:
        return line + " (pass inputs to report() for its routing)"
    ids = values[f"{p}_expert"].reshape(-1)
    rows = np.bincount(ids, minlength=int(experts))
    read = {"dropless": int((rows > 0).sum()), "capacity": int(experts),
            "unsorted": int(1 + (ids[1:] != ids[:-1]).sum())}[mode]
    dropped = int((values[f"{p}_place"] >= c.rank(c.tensor(f"{p}_source").ranks[0].rank).size).sum()) \
        if mode == "capacity" else 0
    return (line + f"; rows per expert {rows.tolist()}, imbalance {rows.max() / rows.mean():.2f}x, "
            f"dropped {dropped}; expert weights read {format_number(read * per_expert)} bytes of "
            f"{format_number(int(experts) * per_expert)}")


