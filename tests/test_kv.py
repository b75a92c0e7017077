"""KV-cache policies (``compile_lm(..., kv=SPEC)``, einfuse/kv): each compiled decode program
against the same program run eagerly (the policy's torch code as the oracle), ``kv-window``
against transformers' eager model under the mask the policy means, exactness where the budget
covers the context, the bounded cache's memory, the quality report, and bad options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import einfuse
from einfuse.errors import EinfuseError
from einfuse.kv import KVPages, KVWindow, parse_kv
from einfuse.kv.quality import attention_recall, compare
from einfuse.lm import CompiledLM, lm_shape, programs
from einfuse.zoo import causal_lm
from tests.conftest import rel_err
from tests.test_generate import prompt


class Eager:
    """A program run by torch: the reference the compiled one is checked against."""

    def __init__(self, program: tuple) -> None:
        self.step = program[0]

    def run_trusted(self, *args: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.step(*args))


def eager_lm(lm: torch.nn.Module, max_len: int, kv: str) -> CompiledLM:
    """``compile_lm``'s host over eager programs: the policy computed by its own torch code."""
    policy, shape = parse_kv(kv), lm_shape(lm)
    sparse = Eager(programs(lm, max_len, 1, shape, sparse=policy)[1]) if policy.sparse(max_len - 1) else None
    return CompiledLM(lambda n: Eager(programs(lm, max_len, 1, shape, prompt=n)[0]),
                      Eager(programs(lm, max_len, 1, shape)[1]), shape, max_len, 1, policy=policy, sparse_decode=sparse)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return causal_lm("llama")


@pytest.mark.parametrize("kv", ["kv-pages{page=4,budget=8}", "kv-pages{page=4,budget=12,recent=4}",
                                "kv-select{k=8,sink=2,recent=4}", "kv-window{sink=2,window=8}"])
def test_the_compiled_decode_steps_match_the_policy_run_eagerly(llama: torch.nn.Module, kv: str,
                                                                 rng: np.random.Generator) -> None:
    compiled, eager = einfuse.compile_lm(llama, max_len=48, kv=kv), eager_lm(llama, 48, kv)
    if not kv.startswith("kv-window"):   # (a window's step is the dense one over its rows)
        assert "select" in [k.kind for k in compiled.sparse_decode.kernels]
    ids, tokens = prompt(rng, 1, 6), prompt(rng, 1, 40)
    got, want = compiled.prefill(ids), eager.prefill(ids)
    assert rel_err(got.numpy(), want.numpy()) < 1e-4
    for i in range(tokens.shape[1]):   # (past 8 pages of 4 and 4 windows of 8)
        got, want = compiled.decode(tokens[:, i]), eager.decode(tokens[:, i])
        assert rel_err(got.numpy(), want.numpy()) < 1e-4, i


def test_kv_window_is_transformers_under_the_sink_and_window_mask(llama: torch.nn.Module,
                                                                 rng: np.random.Generator) -> None:
    policy = KVWindow(sink=2, window=8)
    model = einfuse.compile_lm(llama, max_len=16, kv=policy.spelled())
    ids = prompt(rng, 1, 6)
    seq = model.generate(ids, 40, eos_token_id=None)[0]   # (40 tokens through a cache of 10 rows: past max_len)
    n = torch.arange(seq.shape[0])
    mask = torch.where(policy.sees(n[:, None], n[None, :], prompt=6), 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = llama(seq[None], attention_mask=mask[None, None]).logits[0, 5:-1]
    top2 = logits.topk(2, -1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-5 * top2[:, 0].abs()
    assert bool(((logits.argmax(-1) == seq[6:]) | near_tie).all())
    s = model.shape
    assert model.length == 45 and model.kv_bytes == s.layers * 2 * 10 * s.kv_heads * s.head_dim * 4   # (rows: 2 + 8)


def test_a_bounded_cache_keeps_its_memory(llama: torch.nn.Module, rng: np.random.Generator) -> None:
    model = einfuse.compile_lm(llama, max_len=16, kv="kv-window{sink=2,window=6}")
    buffers = [c.data_ptr() for c in model.cache]
    model.generate(prompt(rng, 1, 5), 4 * 6 + 1, eos_token_id=None)   # (4 windows)
    assert [c.data_ptr() for c in model.cache] == buffers and model.cache[0].shape[0] == 8
    n = model.length
    assert n == 5 + 24 and sorted(model.slot_pos.tolist()) == [0, 1] + list(range(n - 6, n))   # (sinks, the last 6)
    with pytest.raises(EinfuseError, match="cannot be cropped"):
        model.crop(3)


@pytest.mark.parametrize("kv", ["kv-pages{page=4,budget=48}", "kv-window{sink=4,window=44}",
                                "kv-select{k=40,sink=4,recent=4}"])
def test_a_budget_covering_the_context_is_dense_attention_exactly(llama: torch.nn.Module, kv: str,
                                                                  rng: np.random.Generator) -> None:
    dense, sparse = einfuse.compile_lm(llama, max_len=48), einfuse.compile_lm(llama, max_len=48, kv=kv)
    ids = prompt(rng, 1, 7)
    assert torch.equal(sparse.generate(ids, 40, eos_token_id=None), dense.generate(ids, 40, eos_token_id=None))


def test_all_pages_chosen_is_dense_attention(rng: np.random.Generator) -> None:
    b, g, r, d, n = 2, 3, 4, 8, 23
    q, key, value = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in
                     ((b, g, r, d), (b, g, 1, d), (b, g, 1, d)))
    k_past, v_past = (torch.from_numpy(rng.standard_normal((n, b, g, d)).astype(np.float32)) for _ in range(2))
    policy = KVPages(page=4, budget=24)
    padded = torch.cat([k_past, k_past[-1:].expand(24 - n, b, g, d)]).reshape(6, 4, b, g, d)
    mask = torch.zeros(b, 1, 1, n + 1)
    mask[1, ..., :5] = torch.finfo(torch.float32).min   # (row 1 padded on the left)
    got = policy.attend(q, key, value, mask, (k_past, v_past, padded.amin(1), padded.amax(1)), d ** -0.5, None)
    keys, values = torch.cat([k_past.permute(1, 2, 0, 3), key], 2), torch.cat([v_past.permute(1, 2, 0, 3), value], 2)
    want = ((q @ keys.transpose(-1, -2)) * d ** -0.5 + mask[:, :, 0, None]).softmax(-1) @ values
    assert rel_err(got.numpy(), want.numpy()) < 1e-6


def test_the_quality_report(llama: torch.nn.Module, rng: np.random.Generator) -> None:
    dense = einfuse.compile_lm(llama, max_len=48)
    sparse = einfuse.compile_lm(llama, max_len=48, kv="kv-pages{page=4,budget=8}")
    ids = prompt(rng, 1, 8)
    out, q = compare(llama, sparse, dense, ids, 30)
    assert out.shape == (1, 38) and q.steps == 30
    report = sparse.report(cached=30)
    head = "kv-pages{page=4,budget=8} decode program (after 30 cached tokens)"
    assert head in report and "topk" in report.split(head)[1] and "page bounds" in report
    assert 0 <= q.top1 <= 1 and q.kl >= 0 and 0 < q.recall < 1 and q.attention_error > 0
    recall, error = attention_recall(llama, out, parse_kv(None))
    assert recall == pytest.approx(1.0) and error < 1e-6   # (dense reads every key)


@pytest.mark.parametrize("kv,message", [
    ("kv-pages{budget=0}", "page and budget must be at least 1"),
    ("kv-pages{page=16,budget=100}", "the budget's pages \\(100 tokens\\) are not a whole number of pages of 16"),
    ("kv-pages{budget=64,recent=64}", "recent at least 0 and less than the budget"),
    ("kv-window{window=64}", "more than max_len=32"),
    ("kv-window{sink=-1}", "sink must be at least 0"),
    ("kv-route", "unknown KV policy 'kv-route'; available: kv-pages, kv-select, kv-window"),
    ("kv-select{k=0}", "k must be at least 1"),
    ("kv-pages{size=3}", "KV policy 'kv-pages' has no option 'size'; options: page, budget, recent"),
    ("kv-pages,kv-window", "give one KV policy, not 2"),
])
def test_bad_options_are_clear_errors(llama: torch.nn.Module, kv: str, message: str) -> None:
    with pytest.raises(EinfuseError, match=message.replace("{", r"\{")):
        einfuse.compile_lm(llama, max_len=32, kv=kv)


@pytest.mark.slow
def test_the_generate_command_with_a_policy(capsys: pytest.CaptureFixture) -> None:
    from einfuse.cli import main
    assert main(["generate", "llama", "--prompt-len", "6", "--new-tokens", "30", "--max-len", "16",
                 "--kv", "kv-window{sink=2,window=8}", "--compare-dense"]) == 0   # (past max_len: dense gets 36)
    assert "kv-window{sink=2,window=8} vs dense over 30 steps" in capsys.readouterr().out
    assert main(["generate", "llama", "--prompt-len", "6", "--new-tokens", "20", "--max-len", "32",
                 "--kv", "kv-pages{page=4,budget=8}", "--compare-dense"]) == 0
    out = capsys.readouterr().out
    assert "kv-pages{page=4,budget=8} vs dense over 20 steps: top-1 agreement" in out and "recall" in out
    assert main(["generate", "llama", "--compare-dense"]) == 1
    assert "give --kv SPEC too" in capsys.readouterr().err
