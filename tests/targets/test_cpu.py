"""The host target and its measured peaks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from einfuse.errors import EinfuseError
from einfuse.targets import Peaks, Target, cost, host_cpu, host_peaks


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


@pytest.mark.parametrize("vector_bytes, registers, cache, head, keys, tile", [
    (32, 16, 1 << 19, 64, 1024, 64),    # AVX2, 512 KiB (this CI's Zen 3): 64 keys
    (32, 16, 1 << 19, 16, None, 64),    # 16-wide heads too; an unknown length is taken as 4096
    (64, 32, 1 << 17, 64, 1024, 32),    # 4 * 64 * (64 + 64 + 2 * 96) = 80 KiB > 64 KiB: 64 does not fit
    (64, 32, 1 << 12, 512, 1024, 16),   # nothing fits: one vector
    (32, 16, 1 << 19, 64, 20, 32),      # 20 keys: one tile
])
def test_a_cpu_takes_the_attention_tile_the_cost_model_estimates_fastest(
        vector_bytes: int, registers: int, cache: int, head: int, keys: int | None, tile: int) -> None:
    target = Target("t", {}, 1, vector_bytes, registers, cache)
    assert target.attention_tile(head, head, keys) == tile
    assert tile == cost.attention_tile(cost.nominal(target), keys or 4096, keys or 4096, head, head)


def test_accelerators_and_gpus_take_their_own_attention_tile() -> None:
    assert Target.parse("accel:fusemax").attention_tile(64, 64, 1024) == Target.parse("accel:fusemax").device.pe_cols
    assert Target.parse("cuda:h100").attention_tile(64, 64, 1024) == 64


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


@pytest.mark.parametrize("isa, vector_bytes, registers", [("avx2", 32, 16), ("avx512", 64, 32)])
def test_the_isa_can_be_forced_and_its_code_runs_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       rng: np.random.Generator, isa: str, vector_bytes: int,
                                                       registers: int) -> None:
    import torch
    import einfuse
    monkeypatch.setenv("EINFUSE_CPU_ISA", isa)
    host_cpu.cache_clear()
    try:
        cpu = host_cpu()
        assert (cpu.vector_bytes, cpu.registers) == (vector_bytes, registers)
        model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        x = torch.from_numpy(rng.standard_normal((8, 48)).astype(np.float32))
        got = einfuse.compile(model, (x,), cache_dir=tmp_path, tuning_db=False)(x)
        want = model(x).detach()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    finally:
        host_cpu.cache_clear()


def test_an_unknown_forced_isa_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EINFUSE_CPU_ISA", "sse2")
    host_cpu.cache_clear()
    try:
        with pytest.raises(EinfuseError, match="EINFUSE_CPU_ISA='sse2'"):
            host_cpu()
    finally:
        monkeypatch.delenv("EINFUSE_CPU_ISA")
        host_cpu.cache_clear()
