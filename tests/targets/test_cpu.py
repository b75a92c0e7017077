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
    assert Target.parse("cpu") is cpu and cpu.kind == "cpu"


def test_roofline_is_the_slower_of_compute_and_memory() -> None:
    peaks = Peaks(flops=100e9, bandwidth=20e9)
    assert peaks.roofline_seconds(2 * 1024 ** 3, 3 * 4 * 1024 ** 2) == pytest.approx(2 * 1024 ** 3 / 100e9)
    assert peaks.roofline_seconds(1024 ** 2, 3 * 4 * 1024 ** 2) == pytest.approx(3 * 4 * 1024 ** 2 / 20e9)


def test_peaks_are_measured_once_and_cached(tmp_path: Path) -> None:
    first = host_peaks(tmp_path)
    assert first.flops > 1e9 and first.bandwidth > 1e8 and first.cache > 1e8
    assert 0 < first.launch < 0.05   # (a parallel call that does nothing: microseconds, unless the machine is busy)
    (cached,) = tmp_path.glob("peaks-*.json")
    assert host_peaks(tmp_path) == first
    assert cached.is_file()


@pytest.mark.parametrize("vector_bytes, registers, cache, head, tile", [
    (64, 32, 1 << 20, 64, 64),     # AVX-512: 64 keys
    (32, 16, 1 << 20, 64, 64),     # AVX2: 64 keys too
    (64, 32, 1 << 17, 64, 32),     # 4 * 64 * (64 + 64 + 2 * 96) = 80 KiB > 64 KiB: halved once
    (64, 32, 1 << 12, 512, 16),    # never narrower than one vector
])
def test_attention_tile_is_64_keys_unless_they_do_not_fit_the_cache(
        vector_bytes: int, registers: int, cache: int, head: int, tile: int) -> None:
    target = Target("t", {}, 1, vector_bytes, registers, cache)
    assert target.attention_tile(head, head) == tile


@pytest.mark.parametrize("name, arch, sms", [("cuda:a100", "sm_80", 108), ("cuda:sm_90", "sm_90", 132),
                                             ("cuda:h200", "sm_90", 132), ("cuda:sm_75", "sm_75", None)])
def test_cuda_targets_carry_the_datasheet(name: str, arch: str, sms: int | None) -> None:
    t = Target.parse(name)
    assert t.kind == "cuda" and t.tvm == {"kind": "cuda", "arch": arch} and t.device.sms == sms
    if name == "cuda:h200":
        assert t.device.bandwidth == 4.8e12 and Target.parse("cuda:h100").device.bandwidth == 3.35e12


def test_the_accelerator_target_is_fusemax_with_every_number_a_field() -> None:
    t = Target.parse("accel:fusemax")
    assert t.kind == "accel" and (t.device.pe_rows, t.device.buffer_bytes, t.device.mhz) == (256, 16 << 20, 940.0)
    assert Target.parse("accel:fusemax{pe_rows=128,dram_gib_s=800}").device.pe_rows == 128
    with pytest.raises(EinfuseError, match="accel:fusemax has no field 'pes'; fields: pe_rows"):
        Target.parse("accel:fusemax{pes=1}")


@pytest.mark.parametrize("name", ["tpu", "cuda:v100", "accel:tpu", "cuda:sm_x"])
def test_an_unknown_target_lists_the_known_ones(name: str) -> None:
    with pytest.raises(EinfuseError, match=rf"unknown target '{name}'; known targets: cpu, cuda:sm_80, cuda:a100, "
                                           r"cuda:sm_90, cuda:h100, cuda:h200, cuda:sm_XX, accel:fusemax"):
        Target.parse(name)
