"""Targets: a TVM target plus the hardware numbers the schedules and cost model use.

Names: ``cpu`` (the host), ``cuda:sm_80`` / ``cuda:a100``, ``cuda:sm_90`` / ``cuda:h100`` /
``cuda:h200``, any ``cuda:sm_XX``, and ``accel:fusemax`` (see :mod:`.presets`; a name that is none
of these fails with the list). ``cpu`` detects the host: LLVM's name for its CPU (so AVX2 / AVX-512 code is generated;
``mcpu: native`` is silently ignored by this TVM, TVM_0.27_NOTES.md §1), the vector width and the
core count.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import EinfuseError
from . import presets

_AVX512 = ("avx512", "skylake-avx512", "icelake", "sapphirerapids", "emeraldrapids", "graniterapids",
           "cascadelake", "cooperlake", "tigerlake", "rocketlake", "znver4", "znver5", "x86-64-v4")


@dataclass(frozen=True)
class Target:
    """A compilation target: its name, the TVM target dict, and the numbers schedules need."""

    name: str
    tvm: dict[str, Any] = field(hash=False)
    cores: int = 1
    vector_bytes: int = 16
    registers: int = 16
    cache_bytes: int = 1 << 20   # the private (L2) cache of one core
    llc_bytes: int = 8 << 20     # the last-level cache, shared
    device: Any = field(default=None, hash=False)   # a presets.GPU or presets.Accelerator, None on a CPU
    tiles: str = "model"         # register tiles chosen by the cost model, or "fixed" (the rule of thumb)
    l1_bytes: int = 32 << 10     # a core's L1 data cache

    @property
    def kind(self) -> str:
        """``cpu``, ``cuda`` or ``accel``."""
        return self.name.split(":", 1)[0] if self.device is not None else "cpu"

    def attention_tile(self, head_dim: int, value_dim: int, keys: int | None = None) -> int:
        """Keys per tile of the 1-pass attention. A CPU: the tile whose cost-model estimate is
        lowest (:func:`einfuse.targets.cost.attention_tile`, on the target's nominal numbers;
        4096 keys where the length is not known, as many queries as keys). A device: its preset's
        (an accelerator: as wide as its 2D array; a GPU: 64)."""
        if self.device is not None:
            return self.device.attention_tile
        from . import cost
        keys = keys or 4096
        return cost.attention_tile(cost.nominal(self), keys, keys, head_dim, value_dim)

    def register_tile(self, cols: int | None = None, rows: int | None = None, vectors: int = 4) -> tuple[int, int]:
        """A contraction's register tile, (rows, lanes), for a ``rows x cols`` output, at most
        ``vectors`` vectors wide: the one the cost model prefers
        (:func:`einfuse.targets.cost.register_tile`), or with ``tiles == "fixed"`` the rule of
        thumb (:func:`einfuse.targets.cost.rule_tile`)."""
        from . import cost
        if self.tiles == "model":
            return cost.register_tile(cost.nominal(self), rows, cols, vectors=vectors)
        return cost.rule_tile(self.vector_lanes, self.registers, cols)

    def ragged(self, rows: int, cols: int) -> bool:
        """Whether the register tile leaves a remainder on a ``rows x cols`` output (then the
        contraction is padded, which needs operands indexed by plain variables)."""
        mr, nr = self.register_tile(cols, rows)
        return rows % mr != 0 or cols % nr != 0

    @property
    def vector_lanes(self) -> int:
        """float32 lanes in one vector register."""
        return self.vector_bytes // 4

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` (TVM is imported here, not at module load)."""
        from tvm.target import Target as TVMTarget
        host = getattr(self.device, "host", None)
        return TVMTarget(self.tvm, host={"kind": host}) if host else TVMTarget(self.tvm)

    @staticmethod
    def parse(spec: "str | Target") -> "Target":
        """A Target by name (module docstring), or a Target as it is."""
        if isinstance(spec, Target):
            return spec
        if spec in ("cpu", "llvm"):
            return host_cpu()
        if spec.startswith("cuda:"):
            device = presets.gpu(spec)
            return Target(spec, {"kind": "cuda", "arch": device.arch}, device=device)
        if spec.startswith("accel:"):
            return Target(spec, {"kind": "c"}, device=presets.accelerator(spec))
        raise presets.unknown(spec)


#: ``EINFUSE_CPU_ISA=avx2|avx512`` schedules for that vector ISA whatever the host is, so that a
#: test suite exercises both paths (register tiles, packing, GEMV choices) on any machine.
ISA_VARIABLE = "EINFUSE_CPU_ISA"
_ISAS = {"avx2": (32, 16), "avx512": (64, 32)}   # vector bytes, vector registers


@lru_cache(maxsize=1)
def host_cpu() -> Target:
    """The machine this runs on, with its real ISA in the LLVM target (or the one
    ``$EINFUSE_CPU_ISA`` forces: :func:`_forced_isa`)."""
    import tvm
    mcpu = str(tvm.get_global_func("target.llvm_get_system_cpu")())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wide = any(mcpu.startswith(p) for p in _AVX512)
    isa = _forced_isa() or ("avx512" if wide else "avx2")
    if wide and isa == "avx2":
        mcpu = "haswell"   # (AVX2 code on an AVX-512 host: a subset of its ISA, so it runs there)
    tvm_target: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}
    if wide and isa == "avx512":  # LLVM splits 512-bit vectors in two on these CPUs unless told not to
        tvm_target["mattr"] = ["-prefer-256-bit"]
    vector_bytes, registers = _ISAS[isa]
    # (AVX-512 forced on an AVX2 host keeps the host's mcpu: LLVM splits each 512-bit vector in
    # two, so the code is right, if slower, and exercises the wide tiles)
    return Target("cpu", tvm_target, cores, vector_bytes, registers, _cache_bytes(2, 1 << 20),
                  _cache_bytes(3, 8 << 20), l1_bytes=_cache_bytes(0, 32 << 10))


#: LLVM CPU names with the integer dot product (VNNI ``vpdpbusd``): AVX-512 VNNI, and AVX-VNNI on AVX2 hosts.
_VNNI512 = ("cascadelake", "cooperlake", "icelake", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
            "graniterapids", "znver4", "znver5")
_AVXVNNI = ("alderlake", "raptorlake", "meteorlake", "arrowlake", "lunarlake", "pantherlake", "sierraforest",
            "grandridge", "clearwaterforest", "gracemont")


def int8_isa(target: Target) -> str | None:
    """The integer dot product ``target`` has for ``quantize{compute=int8}``'s kernels: ``avx512``
    (AVX-512 VNNI, 16 int32 lanes), ``avxvnni`` (AVX-VNNI, 8), ``avx2`` (no VNNI: ``vpmaddubsw`` then
    ``vpmaddwd``, 8), or None (not an x86 CPU, or AVX-512 without VNNI)."""
    if target.kind != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    mcpu = str(target.tvm.get("mcpu", ""))
    if target.vector_bytes == 64:
        return "avx512" if mcpu.startswith(_VNNI512) else None
    return "avxvnni" if mcpu.startswith(_AVXVNNI) or "+avxvnni" in target.tvm.get("mattr", ()) else "avx2"


def _forced_isa() -> str | None:
    """The ISA ``$EINFUSE_CPU_ISA`` names, or None when it is unset; anything else is an error."""
    isa = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if isa and isa not in _ISAS:
        raise EinfuseError(f"{ISA_VARIABLE}={isa!r}: expected one of {', '.join(_ISAS)}")
    return isa or None


def _cache_bytes(index: int, otherwise: int) -> int:
    """The size of the host's cache ``index`` (0: L1 data, 2: L2, 3: L3; Linux sysfs), or ``otherwise``."""
    try:
        text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError):
        return otherwise


@dataclass(frozen=True)
class Peaks:
    """What the host sustains: float32 FLOP/s (a large GEMM), memory bytes/s (a large copy),
    cache bytes/s (copies that stay in a core's cache, all cores) and the seconds a call of a
    parallel TVM kernel costs with nothing to do."""

    flops: float
    bandwidth: float
    cache: float = 0.0
    launch: float = 0.0

    def roofline_seconds(self, flops: float, moved: float) -> float:
        """The plain roofline: the slower of computing and moving ``moved`` bytes from memory."""
        return max(flops / self.flops, moved / self.bandwidth)


def host_peaks(cache_dir: "str | os.PathLike[str] | None" = None) -> Peaks:
    """The host's peaks, measured once by micro-benchmarks (a few seconds) and cached per CPU. A
    cached file that is unreadable or holds anything but positive finite numbers is reported and
    measured again (and replaced, atomically); a cache that cannot be written is reported once."""
    import json

    from ..cache import default_cache_dir, positive, read_json, warn_once, write_atomic
    target = host_cpu()
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    path = base / f"peaks-{target.tvm['mcpu']}-{target.cores}.json"
    fields = ("flops", "bandwidth", "cache", "launch")
    data = read_json(path, lambda d: isinstance(d, dict) and all(positive(d.get(f)) for f in fields))
    if data is not None:
        return Peaks(*(float(data[f]) for f in fields))
    peaks = _measure_peaks(target)
    try:
        write_atomic(path, json.dumps(peaks.__dict__))
    except OSError as exc:
        warn_once(f"peaks {base}", f"einfuse cannot write {path} ({type(exc).__name__}: {exc}); "
                  "the host's peaks will be measured again in the next process")
    return peaks


def _best(fn: Any, reps: int = 5) -> float:
    import time
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure_peaks(target: Target) -> Peaks:
    import numpy as np
    n = 1024
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    src, dst = np.random.rand(1 << 24).astype(np.float32), np.empty(1 << 24, np.float32)
    small = np.random.rand(target.cache_bytes // 16).astype(np.float32)   # (a quarter of the cache)
    into = np.empty_like(small)
    gemm = _best(lambda: a @ b)
    copy = _best(lambda: np.copyto(dst, src))
    cached = _best(lambda: [np.copyto(into, small) for _ in range(64)])   # (one core: numpy's copy)
    return Peaks(2 * n ** 3 / gemm, 2 * src.nbytes / copy, target.cores * 64 * 2 * small.nbytes / cached,
                 _launch_seconds(target))


def _launch_seconds(target: Target) -> float:
    """The median time of calling a parallel TVM kernel that does almost nothing."""
    import numpy as np
    import tvm
    from tvm import te
    x = te.placeholder((target.cores * 16,), "float32", name="x")
    y = te.compute(x.shape, lambda i: x[i] + 1.0, name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    sch.parallel(sch.get_loops(sch.get_sblock("y"))[0])
    lib = tvm.compile(sch.mod, target=target.tvm_target())
    args = [tvm.runtime.tensor(np.zeros(target.cores * 16, np.float32)) for _ in range(2)]
    return float(lib.mod.time_evaluator("main", tvm.cpu(), number=100, repeat=5)(*args).median)
