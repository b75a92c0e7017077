"""Passes over a cascade and the manager that runs them, with instruments.

A :class:`Pass` is a frozen dataclass with a kebab-case ``name`` and typed options (its fields);
``run(cascade, ctx)`` returns the rewritten cascade and counts each pattern it rewrote in
``ctx.stats``; a pass that depends on the machine reads ``ctx.target`` (a
:class:`~einfuse.targets.Target`, parsed once per compile: :class:`PassContext`). Passes never print: the :class:`PassManager` reports through ``log`` what the
instruments ask for (the IR after each pass, after a named one, only on change; numbered
``NNN_<pass>.ein`` dumps; per-pass timing), verifies after each pass if asked, skips disabled
passes, and on a failure writes a reproducer (the input IR and the pipeline) before raising.

Pipelines are text: ``canonicalize,fuse-attention{tile=128}``; options are converted to the
field's type, and unknown passes or options are errors that list what exists.
"""
from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from ..errors import EinfuseError
from ..ir import Cascade, to_text, verify
from ..targets import Target


class PassError(EinfuseError):
    """A pass failed or produced an invalid cascade; the message names the pass and a reproducer."""


@dataclass
class PassContext:
    """What every pass of one run may read: the target (parsed once), the model's example inputs
    by name (calibration data, for ``quantize{method=awq}``; None when not given) and the current
    pass's pattern counts."""

    target: Target = field(default_factory=lambda: Target.parse("cpu"))
    inputs: Mapping[str, Any] | None = None
    stats: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Pass(ABC):
    """A cascade-to-cascade rewrite. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = ""

    @abstractmethod
    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        """The rewritten cascade; each rewrite counted in ``ctx.stats`` by pattern name."""

    def spelled(self) -> str:
        """The pass as pipeline text, with the options that differ from their defaults."""
        return spelled(self)


def spelled(item: Any) -> str:
    """A dataclass of :func:`parse_items`' kind as text: ``name{option=value,...}``, the options
    that differ from their defaults."""
    opts = [f"{f.name}={getattr(item, f.name)}" for f in dataclasses.fields(item)
            if getattr(item, f.name) != f.default]
    return item.name + (f"{{{','.join(opts)}}}" if opts else "")


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline text by its name."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Instruments:
    """What the manager does around each pass."""

    verify_each: bool = False
    print_after_all: bool = False
    print_after: frozenset[str] = frozenset()
    print_after_change: bool = False
    dump_dir: Path | None = None
    time_passes: bool = False
    disabled: frozenset[str] = frozenset()


@dataclass
class PassRecord:
    """What one pass did: its time, whether the cascade changed, and its pattern counts."""

    name: str
    seconds: float
    changed: bool
    stats: Counter = field(default_factory=Counter)


class PassManager:
    """Runs passes in order under the given instruments; ``records`` tells what each did."""

    def __init__(self, passes: list[Pass], instruments: Instruments | None = None,
                 log: Callable[[str], None] = lambda text: None) -> None:
        self.passes, self.instruments, self.log = passes, instruments or Instruments(), log
        self.records: list[PassRecord] = []

    def run(self, c: Cascade, ctx: PassContext | None = None) -> Cascade:
        """The cascade after every enabled pass, each given ``ctx`` (default: the host CPU)."""
        ins, ctx = self.instruments, ctx or PassContext()
        if ins.dump_dir is not None:
            ins.dump_dir.mkdir(parents=True, exist_ok=True)
            (ins.dump_dir / "000_input.ein").write_text(to_text(c))
        for number, p in enumerate(self.passes, start=1):
            if p.name in ins.disabled:
                continue
            c = self._run_one(number, p, c, ctx)
        if ins.time_passes:
            self.log(self.timing_table())
        return c

    def _run_one(self, number: int, p: Pass, c: Cascade, ctx: PassContext) -> Cascade:
        ins = self.instruments
        ctx.stats = stats = Counter()
        start = time.perf_counter()
        try:
            c = dataclasses.replace(c, groups=())   # (the kernel groups describe the cascade before this pass)
            out = p.run(c, ctx)
            if ins.verify_each:
                verify(out)
        except Exception as exc:
            raise PassError(f"pass '{p.name}' failed: {exc} (reproducer: {self._reproducer(p, c)})") from exc
        changed = out != c or out.groups != c.groups
        self.records.append(PassRecord(p.name, time.perf_counter() - start, changed, stats))
        if ins.print_after_all or p.name in ins.print_after or (ins.print_after_change and changed):
            self.log(f"// ----- IR after {p.spelled()} -----\n{to_text(out)}")
        if ins.dump_dir is not None:
            (ins.dump_dir / f"{number:03d}_{p.name}.ein").write_text(to_text(out))
        return out

    def _reproducer(self, p: Pass, c: Cascade) -> str:
        pipeline = ",".join(q.spelled() for q in self.passes)
        with tempfile.NamedTemporaryFile("w", suffix=f"_{p.name}.ein", prefix="einfuse_pass_",
                                         delete=False) as f:
            f.write(f"# einfuse pass '{p.name}' failed on this cascade\n# pipeline: {pipeline}\n")
            f.write(f"# rerun: einfuse ir {f.name} -p {p.spelled()}\n{to_text(c)}")
        return f.name

    def timing_table(self) -> str:
        """Per-pass wall time and pattern counts."""
        lines = ["pass                      ms  changed  patterns"]
        for r in self.records:
            hits = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items())) or "-"
            lines.append(f"{r.name:<22} {r.seconds * 1e3:6.2f}  {'yes' if r.changed else 'no ':<7}  {hits}")
        return "\n".join(lines)


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """``canonicalize,fuse-attention{tile=128}`` as pass objects."""
    return parse_items(text, REGISTRY, "pass", "pipeline")


def parse_items(text: str, registry: Mapping[str, type], noun: str, whole: str) -> list[Any]:
    """``name{option=value,...},...`` as objects of the dataclasses ``registry`` names (passes, or
    the KV-cache policies of :mod:`einfuse.kv`), each option converted to its field's type."""
    items, pos, text = [], 0, text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None or m.end() == pos:
            raise EinfuseError(f"cannot read the {whole} at column {pos + 1}: '{text[pos:]}'")
        items.append(_make(m.group(1), m.group(2) or "", registry, noun))
        pos = m.end()
    return items


def parse_one(text: str, registry: Mapping[str, type], noun: str) -> Any:
    """The one item ``text`` spells (:func:`parse_items`), or an error naming how many it has."""
    items = parse_items(text, registry, noun, noun)
    if len(items) != 1:
        raise EinfuseError(f"{text!r}: give one {noun}, not {len(items)}")
    return items[0]


def _make(name: str, options: str, registry: Mapping[str, type], noun: str) -> Any:
    if name not in registry:
        raise EinfuseError(f"unknown {noun} '{name}'; available: {', '.join(sorted(registry))}")
    cls = registry[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise EinfuseError(f"{noun} '{name}' has no option '{key}'; options: {', '.join(fields) or 'none'}")
        kwargs[key] = _convert(f"{noun} '{name}'", key, fields[key].type, value.strip())
    return cls(**kwargs)


def _convert(what: str, key: str, kind: object, value: str) -> object:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(kind), kind)
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise EinfuseError(f"{what} option '{key}' wants true or false, not '{value}'")
        return value.lower() in ("true", "1")
    try:
        return kind(value)  # type: ignore[operator]
    except (TypeError, ValueError):
        raise EinfuseError(f"{what} option '{key}' wants {getattr(kind, '__name__', kind)}, not '{value}'") from None
