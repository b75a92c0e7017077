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
