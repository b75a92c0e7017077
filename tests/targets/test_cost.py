"""The cost model's arithmetic on hand-checked kernels, its register-tile choice, and a compiled
model's kernels estimated as the model's GEMM formula says."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import einfuse
from einfuse.api import laid_out
from einfuse import zoo
from einfuse.ir import parse
from einfuse.passes import PassManager, pipeline
from einfuse.passes.group_kernels import group_kernels
from einfuse.targets import Target, cost, host_cpu
from tests.codegen.test_schedules import WEIGHT_GEMM

M = cost.Machine(flops=100e9, dram=10e9, cache=50e9, cache_bytes=1 << 20, llc_bytes=8 << 20, lanes=8,
                 registers=16, launch=1e-6)
MIB = 1 << 20
CASCADES = Path(__file__).parents[1] / "cascades"


def test_gemm_counts_the_tilings_traffic() -> None:
    est = cost.gemm(M, 1, 1024, 1024, 1024, (4, 16))
    # A (4 MiB) is read once per column panel (64): it misses the 1 MiB cache, stays in the 8 MiB
    # last level; the packed 1024 x 16 panel is streamed once per row tile (256 x 64 tiles)
    assert est.dram_bytes == 3 * 4 * MIB
    assert est.cache_bytes == 4 * 256 * 64 * 1024 * 16 + 63 * 4 * MIB
    assert est.work_seconds == pytest.approx(2 * 1024 ** 3 / (100e9 * 8 / 9.6))   # 8 accumulators of 9.6
    pack = 2 * 4 * MIB / 50e9          # the panels copied out first: B read and written
    assert est.seconds == pytest.approx(1e-6 + pack + est.cache_bytes / 50e9) and est.bound == "cache"
    assert est.intensity == pytest.approx(2 * 1024 ** 3 / (12 * MIB))


def test_gemm_counts_padding_and_rereads_past_the_last_level_cache() -> None:
    padded = cost.gemm(M, 1, 785, 64, 64, (4, 24))          # 785 rows: 197 tiles of 4; 64 columns: 3 of 24
    assert padded.work_seconds == pytest.approx(2 * 788 * 72 * 64 / (100e9 * cost.ROW_PADDING))
    assert padded.flops == 2 * 785 * 64 * 64
    big = cost.gemm(M, 1, 4096, 1024, 1024, (4, 16))          # A = 16 MiB: past the 8 MiB last level
    assert big.dram_bytes == 16 * MIB * 64 + 4 * MIB + 16 * MIB
    gemv = cost.gemm(M, 1, 1, 768, 768, (4, 16))              # one token: the weights, from memory
    assert gemv.bound == "memory" and gemv.dram_bytes == 4 * (768 + 768 * 768 + 768)


def test_an_operand_past_the_tlbs_reach_costs_a_page_walk_per_row_of_each_panel() -> None:
    m = replace(M, cores=2)
    small = cost.gemm(m, 1, 1, 1024, 1024, (4, 16))           # 4 MiB: within 8 MiB of pages
    big = cost.gemm(m, 1, 1, 4096, 4096, (4, 16))             # 64 MiB, rows of 16 KiB
    assert small.seconds == pytest.approx(1e-6 + 2 * 4 * MIB / 50e9 + small.dram_bytes / 10e9)
    walks = 4096 * 256 * cost.PAGE_WALK / 2                   # a miss per row of each of 256 panels
    assert big.seconds == pytest.approx(1e-6 + 2 * 64 * MIB / 50e9 + walks + big.dram_bytes / 10e9)


def test_a_few_rows_run_as_a_gemv_where_its_estimate_is_lower() -> None:
    m = replace(M, cores=2)
    one = cost.gemv(m, 1, 4096, 4096)
    assert one.work_seconds == pytest.approx(2 * 4096 ** 2 / (100e9 * cost.GEMV_RATE))
    assert one.dram_bytes == 4 * (4096 + 4096 ** 2 + 4096) and one.bound == "memory"
    assert cost.prefers_gemv(m, 1, 1, 4096, 4096) and cost.prefers_gemv(m, 1, 8, 4096, 4096)
    assert not cost.prefers_gemv(m, 1, 64, 4096, 4096)       # compute-bound: the register tiles
    assert not cost.prefers_gemv(m, 2, 1, 4096, 4096)        # batched: not a GEMV schedule
    assert not cost.prefers_gemv(m, 1, 1, 4100, 4096)        # columns not whole vectors per core
    # panels packed at compile time: no copy, no page walks; both read the weight once from
    # memory up to 8 rows (a tie: the GEMV), from 16 rows the GEMV's compute loses
    packed = cost.gemm(m, 1, 16, 4096, 4096, (4, 16), packed=True)
    assert packed.seconds == pytest.approx(1e-6 + max(packed.work_seconds, packed.dram_bytes / 10e9,
                                                      packed.cache_bytes / 50e9))
    assert not cost.prefers_gemv(m, 1, 16, 4096, 4096, packed=True) and cost.prefers_gemv(m, 1, 8, 4096, 4096, packed=True)


def test_tile_efficiency_needs_independent_accumulators_and_few_loads() -> None:
    assert cost.tile_efficiency(M, 4, 24) == 1.0                   # 12 FMAs, 7 loads per step
    assert cost.tile_efficiency(M, 4, 16) == pytest.approx(8 / 9.6)  # 8 FMAs: the latency, no headroom
    assert cost.tile_efficiency(M, 1, 8) == pytest.approx(1 / 9.6 * 1 / 2)
    assert cost.tile_efficiency(M, 8, 8) == pytest.approx(8 / 9.6 * 8 / 9)   # 8 broadcasts + 1 load for 8 FMAs


def test_accumulators_fill_the_registers_only_where_half_of_them_cannot_hide_the_latency() -> None:
    assert cost.accumulators(32, 4) == 16            # AVX-512: half of 32
    assert cost.accumulators(16, 3) == 12            # AVX2: 16 less 3 vectors of the panel and a broadcast


@pytest.mark.parametrize("vector_bytes, registers, rows, cols, tile", [
    (32, 16, 1024, 1024, (4, 24)),    # AVX2: 12 accumulators, three vectors wide (1032 columns)
    (32, 16, 64, 64, (4, 16)),        # AVX2 on a 64-wide head: 24 would pad 64 to 72
    (32, 16, 1570, 768, (5, 16)),     # ViT's 1570 rows: tiles of 5 do not overhang
    (64, 32, 1024, 1024, (4, 64)),    # AVX-512: 16 accumulators, four vectors wide
    (64, 32, 785, 16, (16, 16)),      # a 16-wide head: one vector, 16 rows
    (32, 16, 1, 768, (4, 16)),        # one token: memory-bound either way, so the widest tile
])
def test_register_tile_minimises_the_estimate(vector_bytes: int, registers: int, rows: int, cols: int,
                                              tile: tuple[int, int]) -> None:
    target = replace(host_cpu(), vector_bytes=vector_bytes, registers=registers)
    assert cost.register_tile(cost.nominal(target), rows, cols) == tile
    assert target.register_tile(cols, rows) == tile
    rule = cost.rule_tile(target.vector_lanes, registers, cols)
    assert replace(target, tiles="fixed").register_tile(cols, rows) == rule


def test_attention_counts_the_products_the_scores_and_the_work_once_per_tile() -> None:
    # one block of 96 queries, one tile of 64 keys, 64-wide heads; M: 3.125 GHz (100 GFLOP/s over
    # 2 pipes of 2 x 8 FLOPs), 16 cache bytes per cycle; the products on 6 x 16 tiles (full rate)
    assert M.hz == 3.125e9 and cost.tile_efficiency(M, 6, 16) == 1.0
    products = 2 * 96 * 64 * 64 / 16                            # FMAs, 16 per cycle
    scores = 96 * 64 * cost.SCORE_OPS / 16                     # vector ops, two vectors per cycle
    per_tile = 96 * (cost.ROW_STEP + cost.RESCALE * 64)         # the running values, once per tile
    assert cost.attention(M, 1, 96, 64, 64, 64, 64) == pytest.approx((products + scores + per_tile) / 3.125e9)
    # 128 keys: twice the products and scores, the same once-per-tile work, and a score tile of
    # 48 KiB (past the 32 KiB L1) read and written SCORE_PASSES times from the core's cache
    spill = cost.SCORE_PASSES * 4 * 96 * 128 / 16
    assert cost.attention(M, 1, 96, 128, 64, 64, 128) == pytest.approx(
        (2 * products + 2 * scores + per_tile + spill) / 3.125e9)
    # 1024 keys in tiles of 8 pay the once-per-tile work 128 times
    assert cost.attention(M, 1, 96, 1024, 64, 64, 8) > 1.5 * cost.attention(M, 1, 96, 1024, 64, 64, 64)


@pytest.mark.parametrize("cache, head, keys, tile", [
    (1 << 19, 64, 1024, 64),     # narrower tiles repeat the per-tile work; a 128-key score tile spills L1
    (1 << 19, 16, 785, 64),      # the zoo ViT's 16-wide heads
    (1 << 17, 64, 1024, 32),     # 4 * 64 * (64 + 64 + 2 * 96) = 80 KiB > half of 128 KiB: 64 does not fit
    (1 << 12, 512, 4096, 8),     # nothing fits: one vector
    (1 << 19, 64, 20, 32),       # 20 keys: one tile of 32 (the keys rounded up) beats 2 of 16, 3 of 8
])
def test_attention_tile_minimises_the_estimate_among_the_tiles_that_fit(cache: int, head: int, keys: int,
                                                                          tile: int) -> None:
    m = replace(M, cache_bytes=cache)
    assert cost.attention_tile(m, keys, keys, head, head) == tile
    fits = [t for t in (8, 16, 32, 64, 128, 256) if 4 * t * (2 * head + 2 * cost.ATTENTION_ROWS) <= cache // 2
            and t < 2 * keys]
    if fits:
        best = min(cost.attention(m, 1, keys, keys, head, head, t) for t in fits)
        assert cost.attention(m, 1, keys, keys, head, head, tile) <= (1 + cost.TILE_MARGIN) * best


def test_a_fused_attention_is_estimated_as_its_tiles() -> None:
    c = parse((CASCADES / "attn_3pass.ein").read_text())    # 40 queries, 48 keys, 32-wide heads
    fused = PassManager(pipeline("canonicalize,fuse-attention{tile=16},defer,canonicalize")).run(c)
    (loop,) = [k for k in group_kernels(fused) if k.kind == "loop"]
    sizes = {r.name: r.size for r in fused.ranks}
    est = cost.kernel_estimate(fused, loop, M, sizes)
    assert est.work_seconds == cost.attention(M, 1, 40, 48, 32, 32, 16, cost.SCORE_OPS)


def test_a_gemm_on_weight_panels_packed_at_compile_time_is_estimated_without_the_copy() -> None:
    laid = laid_out(replace(parse(WEIGHT_GEMM), params={"W": np.ones((256, 768))}), host_cpu())
    (kernel,) = group_kernels(laid)
    assert any(cost.reads_panels(e) for e in kernel.einsums(laid))
    sizes = {r.name: r.size for r in laid.ranks}
    est = cost.kernel_estimate(laid, kernel, M, sizes)
    assert est == cost.gemm(M, 1, 64, 768, 256, cost.register_tile(M, 64, 768), packed=True)
    assert est.seconds < cost.gemm(M, 1, 64, 768, 256, cost.register_tile(M, 64, 768)).seconds


def test_a_compiled_kernel_is_estimated_as_its_gemm() -> None:
    model, args = zoo.build("mlp")
    compiled = einfuse.compile(model, args, tuning_db=False)
    target = Target.parse("cpu")
    sizes = {r.name: int(r.size) for r in compiled.ir.ranks}
    first = compiled.kernels[0]      # input[64, 256] @ W[256, 1024] + bias, GELU
    est = cost.kernel_estimate(compiled.ir, first, M, sizes)
    tile = cost.register_tile(M, 64, 1024)
    gelu_and_bias = est.flops - 2 * 64 * 1024 * 256
    assert gelu_and_bias > 0
    # whether the weight was packed at compile time is the host's decision (its register tile
    # must divide the columns): the estimate follows the layout the kernel really reads
    contraction = next(e for e in first.einsums(compiled.ir) if cost.contraction_dims(compiled.ir, e, sizes))
    same = cost.gemm(M, 1, 64, 1024, 256, tile, _extra(compiled, first, sizes),
                     packed=cost.reads_panels(contraction))
    assert est == same
    assert target.kind == "cpu"


def _extra(compiled: object, kernel: object, sizes: dict[str, int]) -> float:
    c = compiled.ir   # type: ignore[attr-defined]
    return float(sum(cost.points(c, e, sizes) * cost.vector_ops(e) for e in kernel.einsums(c)   # type: ignore[attr-defined]
                     if cost.contraction_dims(c, e, sizes) is None))
