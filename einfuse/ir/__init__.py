"""The einsum-cascade IR: nodes, text format, verifier, reference interpreter and analyses."""
from .nodes import (Access, Call, Cascade, Cond, Const, Coord, Einsum, IAccess, IBin, IConst, Index, ISym,
                    IVar, Loop, Populate, Rank, Reduce, TensorDecl, TensorRank)
from .parser import parse
from .text import to_text
from .verify import verify
from .interpret import interpret
from .analysis import analyze_passes, cascade_costs, count_passes, total_cost
from .views import inline_views

__all__ = [
    "Access", "Call", "Cascade", "Cond", "Const", "Coord", "Einsum", "IAccess", "IBin", "IConst", "Index",
    "ISym", "IVar", "Loop", "Populate", "Rank", "Reduce", "TensorDecl", "TensorRank",
    "analyze_passes", "cascade_costs", "count_passes", "inline_views", "interpret", "parse", "to_text",
    "total_cost", "verify",
]
