"""The targets einfuse knows by name, besides the host CPU: NVIDIA GPUs and the FuseMax accelerator.

GPU numbers are the vendors' datasheet figures (dense, no sparsity), per device: peak operations
per second per dtype, memory bandwidth, shared memory per SM, SM count, L2 size. (LLM-Viewer's
hardware table, PASS_SPECS.md §4.1, lists the H100 at 3.07 TB/s where the datasheet says 3.35, and
has no H200.) ``cuda:sm_XX`` names an architecture with no numbers: code is emitted for it, and
a roofline estimate says it has none.

The accelerator is FuseMax's (§V): a 2D array of processing elements for the GEMM-like tiles, a
1D vector array for element-wise and reduction work, a global buffer and DRAM; every number is a
field (``accel:fusemax{pe_rows=128,dram_gib_s=800}`` or ``dataclasses.replace``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import EinfuseError


@dataclass(frozen=True)
class GPU:
    """An NVIDIA GPU: architecture and its datasheet numbers (None where unknown)."""

    arch: str                                   # "sm_80"
    peak_ops: dict[str, float] = field(default_factory=dict, hash=False)   # per dtype, dense
    bandwidth: float | None = None              # bytes/s
    shared_bytes: int | None = None             # usable shared memory per thread block
    sms: int | None = None
    l2_bytes: int | None = None
    attention_tile: int = 64                    # keys per tile of the 1-pass attention (a K/V tile in shared memory)
    host: str | None = "llvm"                   # the TVM target of the code that launches the kernels


_TB = 1e12
A100 = GPU("sm_80", {"f32": 19.5 * _TB, "tf32": 156 * _TB, "f16": 312 * _TB, "bf16": 312 * _TB, "i8": 624 * _TB},
           2.039e12, 163 * 1024, 108, 40 << 20)          # A100 SXM 80 GB
H100 = GPU("sm_90", {"f32": 67 * _TB, "tf32": 494.7 * _TB, "f16": 989.4 * _TB, "bf16": 989.4 * _TB,
                     "i8": 1978.9 * _TB}, 3.35e12, 227 * 1024, 132, 50 << 20)   # H100 SXM 80 GB
H200 = replace(H100, bandwidth=4.8e12)                  # H100's compute, HBM3e (141 GB)

GPUS = {"sm_80": A100, "a100": A100, "sm_90": H100, "h100": H100, "h200": H200}


@dataclass(frozen=True)
class Accelerator:
    """FuseMax's spatial accelerator (§V, Table III): every number can be changed."""

    pe_rows: int = 256           # the 2D array of PEs
    pe_cols: int = 256
    vector_pes: int = 256        # the 1D array
    buffer_bytes: int = 16 << 20  # global buffer
    dram_gib_s: float = 400.0
    mhz: float = 940.0
    exp_macs: int = 6            # exp costs 6 MACs and 1 add on a PE
    exp_adds: int = 1
    vector_exp: int = 0          # cycles of an exp on a 1D PE with an exp unit (0: none, exp as above)
    word_bytes: int = 2          # the datapath's word (16-bit) for DRAM traffic
    tile_k: int = 16             # reduction steps of one 2D-array instruction (fm_mac2d)
    host: str | None = None      # (the C kernels are called by the simulator, not launched)

    @property
    def attention_tile(self) -> int:
        """Keys per tile of the 1-pass attention: as wide as the 2D array."""
        return self.pe_cols


ACCELERATORS = {"fusemax": Accelerator()}


def known() -> list[str]:
    """Every target name ``Target.parse`` accepts (``cuda:sm_XX`` for any architecture)."""
    return ["cpu", *(f"cuda:{k}" for k in GPUS), "cuda:sm_XX", *(f"accel:{k}" for k in ACCELERATORS)]


def gpu(spec: str) -> GPU:
    """The GPU named by ``cuda:NAME`` (a preset, or ``sm_XX`` with no numbers)."""
    name = spec.split(":", 1)[1]
    if name in GPUS:
        return GPUS[name]
    if name.startswith("sm_") and name[3:].isdigit():
        return GPU(name)
    raise unknown(spec)


def accelerator(spec: str) -> Accelerator:
    """The accelerator named by ``accel:NAME{field=value,...}``."""
    name, _, options = spec.split(":", 1)[1].partition("{")
    if name not in ACCELERATORS:
        raise unknown(spec)
    base = ACCELERATORS[name]
    changes: dict[str, Any] = {}
    for item in filter(None, options.rstrip("}").split(",")):
        key, _, value = item.partition("=")
        types = {f.name: f.type for f in fields(base)}
        if key.strip() not in types:
            raise EinfuseError(f"target '{spec}': accel:{name} has no field '{key.strip()}'; fields: {', '.join(types)}")
        cast = float if types[key.strip()] in (float, "float") else int
        try:
            changes[key.strip()] = cast(value)
        except ValueError:
            raise EinfuseError(f"target '{spec}': field '{key.strip()}' wants a number, not '{value}'") from None
    return replace(base, **changes)


def unknown(spec: str) -> EinfuseError:
    return EinfuseError(f"unknown target '{spec}'; known targets: {', '.join(known())}")
