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


@pytest.mark.parametrize("vector_bytes, registers, cache, head, tile", [
    (64, 32, 1 << 20, 64, 64),     # AVX-512: four 16-lane vectors of keys
    (32, 16, 1 << 20, 64, 16),     # AVX2: two 8-lane vectors
    (64, 32, 1 << 16, 64, 32),     # 4 * 64 * (64 + 64 + 128) = 64 KiB > 32 KiB: halved once
    (64, 32, 1 << 12, 512, 16),    # never narrower than one vector
])
def test_attention_tile_is_a_register_tile_of_keys_that_fits_the_cache(
        vector_bytes: int, registers: int, cache: int, head: int, tile: int) -> None:
    target = Target("t", {}, 1, vector_bytes, registers, cache)
    assert target.attention_tile(head, head) == tile
