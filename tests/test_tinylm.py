"""The tiny LM fixture: it trains, saves and loads (a corrupt copy is caught), its perplexity is
exp(mean NLL), its held-out files are never trained on, and einfuse captures it."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import einfuse
from benchmarks.tinylm import (Config, TinyLM, TinyLMError, Trained, heldout_tokens, load, mean_nll,
                               perplexity, split_files, stdlib_files, train)

TINY = Config(width=32, layers=1, heads=2, hidden=64, context=64, train_context=32, batch=4, lr=3e-3,
              warmup_steps=5)
SECONDS = 3.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    # (1 thread: a model this small gains nothing from 2, and 2 threads on a busy machine can wait
    # at each op's barrier for a core another process holds, 100 times slower)
    return train(TINY, seconds=SECONDS, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None, threads=1)


def test_training_lowers_the_loss(trained: Trained) -> None:
    losses = trained.losses
    assert len(losses) >= 20, f"only {len(losses)} steps in {SECONDS} s"
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_save_and_load_round_trip(trained: Trained) -> None:
    assert trained.path is not None and trained.path.parent.name == "tinylm"
    cache = trained.path.parent.parent
    tokens = heldout_tokens(TINY.context)[None]
    loaded = load(TINY, SECONDS, cache, train_if_missing=False)
    torch.testing.assert_close(loaded(tokens), trained.model(tokens), rtol=0, atol=0)
    with pytest.raises(TinyLMError):   # (another budget is another key: not saved)
        load(TINY, SECONDS + 1, cache, train_if_missing=False)
    with pytest.raises(TinyLMError):
        load(replace(TINY, seed=1), SECONDS, cache, train_if_missing=False)


def test_a_corrupt_weights_file_is_detected(trained: Trained, tmp_path: Path) -> None:
    assert trained.path is not None
    copy = tmp_path / "tinylm"
    copy.mkdir()
    for f in trained.path.parent.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = copy / trained.path.name
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(TinyLMError, match="corrupt"):
        load(TINY, SECONDS, tmp_path, train_if_missing=False)


@pytest.mark.parametrize("context,stride", [(64, 63), (64, 17), (100, 50), (300, 1)])
def test_windows_score_each_byte_once(context: int, stride: int) -> None:
    """A model whose prediction depends on the last byte alone: every windowing gives the NLL of
    the whole text."""
    torch.manual_seed(0)
    table = torch.randn(256, 256)
    tokens = heldout_tokens(300)
    want = F.cross_entropy(table[tokens[:-1]], tokens[1:]).item()
    got = mean_nll(lambda t: table[t], tokens, context=context, stride=stride)
    assert got == pytest.approx(want, rel=1e-6)
    assert perplexity(lambda t: table[t], tokens, context, stride) == pytest.approx(math.exp(want), rel=1e-6)


def test_windows_must_overlap() -> None:
    with pytest.raises(ValueError, match="stride"):
        mean_nll(lambda t: torch.zeros(*t.shape, 256), heldout_tokens(200), context=64, stride=64)


def test_perplexity_of_the_model_is_exp_mean_nll(trained: Trained) -> None:
    tokens = heldout_tokens(TINY.context)
    with torch.no_grad():
        logits = trained.model(tokens[None])[0, :-1]
    want = math.exp(F.cross_entropy(logits, tokens[1:]).item())
    got = perplexity(trained.model, tokens, context=TINY.context)
    assert math.isfinite(got) and 1 < got < 256
    assert got == pytest.approx(want, rel=1e-5)


def test_held_out_files_are_never_trained_on() -> None:
    training, held_out = split_files()
    assert training and held_out and not set(training) & set(held_out)
    assert sorted(training + held_out) == sorted(stdlib_files())
    assert all("site-packages" not in f.parts for f in stdlib_files())
    first = held_out[0].read_bytes()[:100]
    assert bytes(heldout_tokens(len(first)).tolist()) == first


def test_einfuse_captures_the_model() -> None:
    model = TinyLM(TINY).eval()
    cascade = einfuse.capture(model, (torch.randint(0, 256, (1, 16)),))
    assert cascade.name == "tinylm"


def test_quantization_quality_is_perplexity_kl_and_top1() -> None:
    from benchmarks.quant_quality import option, quality
    gen = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(2, 5, 7, generator=gen, dtype=torch.float64), -1)
    other = torch.log_softmax(ref + 0.3 * torch.randn(2, 5, 7, generator=gen, dtype=torch.float64), -1)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    same = quality(ref, ref, targets)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1
    assert same["ppl"] == pytest.approx(math.exp(F.nll_loss(ref.reshape(-1, 7), targets.reshape(-1)).item()))
    got = quality(ref, other, targets)
    p, q = ref.exp(), other.exp()
    assert got["kl"] == pytest.approx(float((p * (p / q).log()).sum(-1).mean())) and got["kl"] > 0
    assert got["top1"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))
    assert option("q4_0:awq") == "format=q4_0,method=awq" and option("int8") == "int8"


def test_as_llama_is_the_same_function(trained: Trained) -> None:
    from benchmarks.tinylm import as_llama
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        want = trained.model(tokens)
        got = as_llama(trained.model, TINY)(tokens).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
