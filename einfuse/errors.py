"""Every error einfuse raises to a user.

Library code raises these; the CLI turns them into one readable message and a non-zero exit.
"""
from __future__ import annotations


class EinfuseError(Exception):
    """Base class of every einfuse error."""


class IRParseError(EinfuseError):
    """The text of a cascade is malformed. Carries the 1-based ``line`` and ``column``."""

    def __init__(self, message: str, line: int, column: int, text: str = "") -> None:
        self.line = line
        self.column = column
        self.text = text
        where = f"line {line}, column {column}: {message}"
        if text:
            where += f"\n    {text}\n    {' ' * max(column - 1, 0)}^"
        super().__init__(where)


class VerificationError(EinfuseError):
    """A cascade breaks a rule of the IR; the message names the Einsum and the rule."""


class InterpretError(EinfuseError):
    """The reference interpreter cannot evaluate a cascade on the inputs it was given."""


class CompileError(EinfuseError):
    """Code generation or TVM failed; the message names the kernel and ``.reproducer`` is a file
    holding the kernel's IR text."""

    def __init__(self, message: str, reproducer: str | None = None) -> None:
        self.reproducer = reproducer
        super().__init__(message + (f" (reproducer: {reproducer})" if reproducer else ""))


class CaptureError(EinfuseError):
    """A model could not be captured: bad arguments, or torch.export failed."""


class UnsupportedOperatorError(CaptureError):
    """The captured graph uses ops with no translation rule; ``.ops`` lists each with its source."""

    def __init__(self, ops: list[tuple[str, str]]) -> None:
        self.ops = ops
        names = sorted({op for op, _ in ops})
        lines = [f"{len(names)} unsupported operator(s): {', '.join(names)}"]
        for name in dict.fromkeys(op for op, _ in ops):   # (in the graph's order)
            places = [where for op, where in ops if op == name]
            more = f" (and {len(places) - 1} more use(s))" if len(places) > 1 else ""
            lines.append(f"  {name} at {places[0]}{more}")
        lines.append("compile around them with einfuse.compile(..., fallback=True) or torch.compile(model, "
                     "backend='einfuse') (they run in eager), or add a rule: docs/frontend.md, \"Adding a rule\"")
        super().__init__("\n".join(lines))


class LoadError(EinfuseError):
    """A compiled model on disk cannot be loaded: a file is missing, damaged (its size or sha256
    differs from what ``model.json`` recorded) or malformed, or it was written by another einfuse,
    TVM or torch version, or for another CPU; the message names which."""


class InputError(EinfuseError):
    """Inputs a model cannot take: at capture, ``None``, non-tensors, ``meta`` tensors, unsupported
    dtypes or the wrong arguments for ``forward``; at a call of a compiled model, the wrong number,
    dtype, rank or shape for what it was compiled for, or a size outside its ``Dim``'s range."""
