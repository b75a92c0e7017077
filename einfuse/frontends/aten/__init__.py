"""ATen -> Einsum translation rules: one small function per op, registered by op name.

A rule receives a :class:`Ctx` (the node's resolved arguments, its output shape and dtype, the
cascade builder) and returns a :class:`~einfuse.frontends.builder.Ref` (or a tuple of them for ops
with several outputs). To support a new op, add a function beside its peers:

    @rule("aten.hardswish.default")
    def hardswish(ctx: Ctx) -> Ref:
        x = ctx.arg(0)
        return ctx.map("mul", x, ctx.map("div", ctx.map("min", ctx.map("relu", ...), 6.0), 6.0))
"""
from .base import RULES, Ctx, Rule, RuleError, broadcast, norm_dim, rule
from . import elementwise, indexing, linalg, nn, recurrent, reductions, views  # noqa: E402,F401  (register rules)

__all__ = ["RULES", "Ctx", "Rule", "RuleError", "broadcast", "norm_dim", "rule"]
