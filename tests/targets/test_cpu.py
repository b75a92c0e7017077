"""The host target and its measured peaks."""
from __future__ import annotations

from pathlib import Path

import pytest

from einfuse.errors import EinfuseError
from einfuse.targets import Peaks, Target, host_cpu, host_peaks


def test_host_cpu_names_a_real_isa() -> None:
    cpu = host_cpu()
    assert cpu.tvm["kind"] == "llvm" and cpu.tvm["mcpu"] not in ("", "native", "generic")
    assert cpu.vector_bytes in (32, 64) and cpu.cores >= 1
    assert Target.parse("cpu") is cpu
    with pytest.raises(EinfuseError, match="unknown target 'tpu'; available: cpu"):
        Target.parse("tpu")


def test_roofline_is_the_slower_of_compute_and_memory() -> None:
    peaks = Peaks(flops=100e9, bandwidth=20e9)
    assert peaks.roofline_seconds(2 * 1024 ** 3, 3 * 4 * 1024 ** 2) == pytest.approx(2 * 1024 ** 3 / 100e9)
    assert peaks.roofline_seconds(1024 ** 2, 3 * 4 * 1024 ** 2) == pytest.approx(3 * 4 * 1024 ** 2 / 20e9)


def test_peaks_are_measured_once_and_cached(tmp_path: Path) -> None:
    first = host_peaks(tmp_path)
    assert first.flops > 1e9 and first.bandwidth > 1e8
    (cached,) = tmp_path.glob("peaks-*.json")
    assert host_peaks(tmp_path) == first
    assert cached.is_file()
