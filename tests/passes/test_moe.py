"""``moe``: a mixture-of-experts block's rows sorted by expert (dropless: exact; capacity: Tutel's
drops), or read row by row (few rows); each checked in the interpreter against a float64
reference written here, then compiled (the ``grouped`` kernels) on routings chosen by the test."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import einfuse
from einfuse.ir import Cascade, interpret, parse, to_text
from einfuse.passes import Moe
from einfuse.passes.manager import PassContext

from ..conftest import rel_err

E, K, D, N, F = 4, 2, 32, 48, 24
BLOCK = """cascade moe_block
rank T={t}, K=2, TK={tk}, D=32, N=48, F=24, E=4, O=32
tensor X[T,D] input f32
tensor IDX[T,K] input i64
tensor G[T,K] input f32
tensor W1[E,N,D] param f32
tensor W2[E,O,F] param f32
tensor Y[T,O] output f32
H[tk,n] = W1[IDX[tk//2,tk%2],n,d] * X[tk//2,d]
A[tk,f] = silu(H[tk,f]) * H[tk,24+f]{extra}
Z[tk,o] = W2[IDX[tk//2,tk%2],o,f] * A[tk,f]
Y[t,o] = Z[t*2+k,o] * G[t,k]
"""


def block(tokens: int, rng: np.random.Generator) -> Cascade:
    c = parse(BLOCK.format(t=tokens, tk=tokens * K, extra=""))
    c.params["W1"] = rng.standard_normal((E, N, D)).astype(np.float32) / 4
    c.params["W2"] = rng.standard_normal((E, D, F)).astype(np.float32) / 4
    return c


def routing(kind: str, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Each token's two experts: ``random``; ``one`` (expert 2 first for every token); ``unused``
    (expert 3 never chosen)."""
    first = {"random": rng.integers(0, E, tokens), "one": np.full(tokens, 2), "unused": rng.integers(0, 3, tokens)}[kind]
    second = (first + 1 + rng.integers(0, E - 2 if kind == "unused" else E - 1, tokens)) % (E - (kind == "unused"))
    return np.stack([first, second], 1).astype(np.int64)


def inputs(tokens: int, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"X": rng.standard_normal((tokens, D)).astype(np.float32), "IDX": idx,
            "G": rng.random((tokens, K)).astype(np.float32)}


def reference(c: Cascade, v: dict[str, np.ndarray], capacity: int | None = None) -> np.ndarray:
    """The block in float64, a (token, slot) dropped where its place in its expert's queue
    (every token's first choice before any second, tokens in order: Tutel's) is ``capacity`` or more."""
    w1, w2 = c.params["W1"].astype(np.float64), c.params["W2"].astype(np.float64)
    x, idx, g = v["X"].astype(np.float64), v["IDX"], v["G"].astype(np.float64)
    y, queued = np.zeros((len(x), D)), Counter()
    for j in range(K):
        for t in range(len(x)):
            e = idx[t, j]
            queued[e] += 1
            if capacity is not None and queued[e] > capacity:
                continue
            h = w1[e] @ x[t]
            y[t] += g[t, j] * (w2[e] @ (h[:F] / (1 + np.exp(-h[:F])) * h[F:]))
    return y


def rewritten(c: Cascade, **options: object) -> tuple[Cascade, Counter]:
    ctx = PassContext()
    out = Moe(**options).run(c, ctx)   # type: ignore[arg-type]
    return out, ctx.stats


@pytest.mark.parametrize("kind", ["random", "one", "unused"])
def test_dropless_sorts_rows_by_expert_exactly(kind: str, rng: np.random.Generator) -> None:
    c = block(12, rng)
    out, stats = rewritten(c)
    assert stats == Counter({"moe:dropless": 1})
    text = to_text(out)
    assert "moe0_place[tk] = moe0_key[moe_r] < moe0_key[tk]" in text
    assert "W1[moe0_sorted_expert[moe_p],n,d] * moe0_X[moe_p,d]" in text
    assert "Y[t,o] = Z[moe0_place[t*2+k],o] * G[t,k]" in text
    v = inputs(12, routing(kind, 12, rng), rng)
    assert rel_err(interpret(out, v)["Y"], reference(c, v)) < 1e-12


def test_capacity_mode_drops_what_tutel_drops(rng: np.random.Generator) -> None:
    c = block(10, rng)
    out, stats = rewritten(c, mode="capacity", factor=1.25)
    assert stats == Counter({"moe:capacity": 1})
    capacity = K * int(1.25 * math.ceil(10 / E))   # 6: expert 2, first for all 10 tokens, drops 4
    v = inputs(10, routing("one", 10, rng), rng)
    want = reference(c, v, capacity)
    assert rel_err(interpret(out, v)["Y"], want) < 1e-12
    assert rel_err(want, reference(c, v)) > 1e-2   # (tokens were dropped)


def test_few_rows_read_their_own_experts_unsorted(rng: np.random.Generator) -> None:
    c = block(3, rng)
    out, stats = rewritten(c)
    assert stats == Counter({"moe:unsorted": 1})
    assert "W1[moe0_expert[tk],n,d] * moe0_X[tk,d]" in to_text(out) and "place" not in to_text(out)
    v = inputs(3, routing("random", 3, rng), rng)
    assert rel_err(interpret(out, v)["Y"], reference(c, v)) < 1e-12


def test_a_block_reading_by_its_row_from_outside_is_left_and_says_why(rng: np.random.Generator) -> None:
    c = parse(BLOCK.format(t=12, tk=24, extra=" * S[tk]").replace("tensor Y[", "tensor S[TK] input f32\ntensor Y["))
    out, stats = rewritten(c)
    assert out == c and stats == Counter({"moe:not rewritten: A reads S by the row": 1})


@pytest.mark.parametrize("mode,tokens,kind", [("dropless", 12, "random"), ("dropless", 12, "one"),
                                              ("dropless", 12, "unused"), ("capacity", 10, "one"),
                                              ("dropless", 3, "random")])
def test_compiled_block_runs_grouped_kernels(mode: str, tokens: int, kind: str, rng: np.random.Generator,
                                            tmp_path: Path) -> None:
    c = block(tokens, rng)
    compiled = einfuse.compile(c, pipeline=f"moe{{mode={mode}}}", cache_dir=tmp_path)
    assert [k.kind for k in compiled.kernels].count("grouped") == 2
    v = inputs(tokens, routing(kind, tokens, rng), rng)
    capacity = K * int(1.25 * math.ceil(tokens / E)) if mode == "capacity" else None
    got = compiled(*(v[n] for n in ("X", "IDX", "G"))).numpy()
    assert rel_err(got, reference(c, v, capacity)) < 1e-5
