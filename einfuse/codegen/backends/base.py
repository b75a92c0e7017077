"""The backend protocol: what code generation does for one kind of target, registered by kind.

A :class:`Backend` turns a grouped cascade's kernels into code for its target: it names the
codegen pipeline that shapes the IR for it (operand layouts, grouping), lowers and schedules
each kernel (:meth:`Backend.kernel_function`), builds the whole model into one executable,
emits each kernel's source for ``einfuse kernels``, and says where the model runs. The API,
``einfuse kernels``, tuning and the report ask the backend of their target
(:func:`backend_for`), never the target's kind. A new target kind is one module that subclasses
:class:`Backend` and is registered with :func:`register_backend` (see docs/architecture.md).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ...errors import EinfuseError
from ...ir import Cascade
from ...ir.kernels import KINDS, Kernel
from ...targets import Target
from ..build import TUNED
from ..lower import KernelBuilder, SizeVars

BACKENDS: dict[str, type["Backend"]] = {}


class Backend(ABC):
    """Code generation for targets of one ``kind``."""

    kind: ClassVar[str] = ""
    #: The codegen pipeline (pipeline text) run after the user's passes: the IR as this backend
    #: receives it (``einfuse ir -p default,codegen`` shows it).
    pipeline: ClassVar[str] = "group-kernels"
    #: Whether compiled models go into the compile cache (a library that loads only where its
    #: device is does not).
    cached: ClassVar[bool] = False
    #: Where a compiled model's inputs go and its outputs are (a torch device type).
    torch_device: ClassVar[str] = "cpu"
    #: Whether ``einfuse kernels --harness`` can write a host program that runs the kernels.
    harness: ClassVar[bool] = False

    def __init__(self, target: Target) -> None:
        self.target = target

    @abstractmethod
    def kernel_function(self, c: Cascade, k: Kernel, sizes: SizeVars, tuning: Any = None) -> Any:
        """Kernel ``k`` lowered and scheduled, a PrimFunc named ``k.name``."""

    def lower(self, c: Cascade, k: Kernel, sizes: SizeVars) -> Any:
        """Kernel ``k`` through TE, unscheduled (what tuning searches from)."""
        return KernelBuilder(c, k, sizes).prim_func()

    @abstractmethod
    def emit(self, c: Cascade, k: Kernel, sizes: SizeVars, index: int) -> tuple[dict[str, str], dict, str]:
        """Kernel ``k`` (the ``index``-th) compiled alone: its source files, launch grid and
        scheduled TIR."""

    def compiled_alone(self, func: Any, name: str) -> Any:
        """``func`` compiled by itself for this target (what ``emit`` reads its source from)."""
        import tvm
        return tvm.compile(tvm.IRModule({name: func}), target=self.target.tvm_target())

    def rule_schedule(self, func: Any, k: Kernel) -> Any:
        """The rules' schedule of ``func`` as an ``s_tir.Schedule`` with its trace (tuning's
        seed), or None where the rules give no trace."""
        return None

    def compile(self, c: Cascade, tuning: Any = None) -> tuple[Any, list[Kernel], str, list[str]]:
        """(the executable, the kernels, their scheduled TIR, the tuned kernels' names)."""
        from ..build import compile_executable
        self.check_runs()
        return compile_executable(c, self, tuning)

    def device(self) -> Any:
        """The TVM device the model runs on."""
        import tvm
        return tvm.cpu()

    def machine(self) -> Any:
        """The cost model's machine for a report's estimates, or None where it has none."""
        return None

    def check_runs(self) -> None:
        """Raise, before any capture, where a compiled model cannot run (:func:`einfuse.compile`)."""

    def check_simulates(self) -> None:
        """Raise, before any capture, where the kernels cannot be simulated (:func:`einfuse.simulate`)."""
        raise EinfuseError(f"simulate: {self.target.name} is not an accelerator (accel:fusemax{{...}})")

    def simulate(self, c: Cascade, values: dict[str, Any]) -> Any:
        """Run the kernels here as the target would, counting its cycles (an accelerator's)."""
        self.check_simulates()

    def write_extras(self, c: Cascade, directory: Path, at: dict) -> None:
        """Files beside the kernels that ``einfuse kernels`` writes (a runtime, a report)."""


class TEBackend(Backend):
    """A backend building loop kernels as TIR and the others through TE, then its schedule rules."""

    def kernel_function(self, c: Cascade, k: Kernel, sizes: SizeVars, tuning: Any = None) -> Any:
        """A kernel of a loop kind (``KINDS[k.kind].loop``) built as TIR by :meth:`loop_function`;
        any other lowered through TE (:meth:`lower`) and scheduled by its best record in
        ``tuning`` (marked with the attribute ``einfuse.tuned``) or else by :meth:`schedule`."""
        if KINDS[k.kind].loop:
            return self.loop_function(c, k, sizes)
        func = self.lower(c, k, sizes)
        tuned = tuning.schedule(func, k.name) if tuning is not None else None
        if tuned is not None:
            return tuned.with_attr(TUNED, True)
        return self.schedule(func, k)

    @abstractmethod
    def loop_function(self, c: Cascade, k: Kernel, sizes: SizeVars) -> Any:
        """A loop kernel (the 1-pass attention) built as scheduled TIR."""

    @abstractmethod
    def schedule(self, func: Any, k: Kernel) -> Any:
        """``func``, kernel ``k`` lowered through TE, scheduled by this target's rules."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: the backend of targets of ``cls.kind``."""
    BACKENDS[cls.kind] = cls
    return cls


def backend_for(target: Target | str) -> Backend:
    """The backend of ``target`` (a Target or its name)."""
    t = Target.parse(target)
    if t.kind not in BACKENDS:
        raise EinfuseError(f"no backend for targets of kind '{t.kind}'; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[t.kind](t)
