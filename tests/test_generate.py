"""``einfuse.compile_lm``: greedy generation identical to transformers' ``generate`` for each causal-LM
family, batches of left-padded prompts identical to each prompt alone, the cache's edges (sliding
windows, ``max_len``) and seeded sampling; the programs' logits against eager by relative error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import einfuse
from einfuse.errors import EinfuseError, InputError
from einfuse.targets import host_cpu, int8_isa
from einfuse.zoo import causal_lm
from tests.conftest import params, rel_err

#: Families whose compile is in the fast tier: Llama (GQA, RoPE) and Gemma 2 (sliding and full
#: layers mixed, soft-capping); each compile of two programs is some 20 s on two cores.
FAST = ("llama", "gemma2")
FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "gpt_neox")


def prompt(rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(3, 96, (batch, length))).long()


def assert_same_greedy(lm: torch.nn.Module, ids: torch.Tensor, got: torch.Tensor, **kwargs) -> None:
    """``got`` is what ``lm.generate(ids, do_sample=False)`` gives, token for token; where they part,
    only at a near-tie of transformers' own two best logits (a float32 rounding apart)."""
    ref = lm.generate(ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    want = ref.sequences
    assert got.shape[0] == want.shape[0] and got.shape[1] <= want.shape[1], (got.shape, want.shape)
    if torch.equal(got, want):
        return
    step = int((got != want[:, :got.shape[1]]).any(0).nonzero()[0]) - ids.shape[1]
    top2 = ref.scores[step].topk(2, -1).values
    gap = float((top2[:, 0] - top2[:, 1]).min() / top2[:, 0].abs().max())
    assert gap < 1e-5, f"generation differs at new token {step} (logit gap {gap:.2e}):\n{got}\n{want}"


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, einfuse.lm.CompiledLM]:
    lm = causal_lm("llama")
    return lm, einfuse.compile_lm(lm, max_len=32)


@pytest.mark.parametrize("family", params(list(FAMILIES), slow=tuple(f for f in FAMILIES if f not in FAST)))
def test_greedy_is_transformers_generate(family: str, rng: np.random.Generator, request: pytest.FixtureRequest) -> None:
    lm, model = request.getfixturevalue("llama") if family == "llama" else \
        (lm := causal_lm(family), einfuse.compile_lm(lm, max_len=32))
    ids = prompt(rng, 1, 7)
    # 7 + 16 tokens: past the sliding window (8) of Mistral's and Gemma's
    assert_same_greedy(lm, ids, model.generate(ids, max_new_tokens=16), max_new_tokens=16)


def test_logits_match_eager(llama: tuple, rng: np.random.Generator) -> None:
    lm, model = llama
    ids = prompt(rng, 1, 9)
    with torch.no_grad():
        want = lm(ids).logits[0].double().numpy()
    got = [model.prefill(ids[:, :5]).numpy()[0]] + [model.decode(ids[:, i]).numpy()[0] for i in range(5, 9)]
    for i, g in enumerate(got):
        assert rel_err(g, want[4 + i]) < 1e-4, i
    assert model.length == 9


@pytest.mark.slow
def test_int8_compute_reaches_every_projection_of_both_programs(rng: np.random.Generator) -> None:
    """``compute=int8``: each layer's seven projections on integer dot products in the prefill and
    the decode program alike (their activations read through a batch of one, the attention output
    through its reshape), the head too with ``head=true``; logits those of the float compute of the
    same format but for the activations' rounding (float64 interpreter checks: tests/codegen/test_int8_dot.py)."""
    lm = causal_lm("llama")
    model, floats = (einfuse.compile_lm(lm, max_len=32, quantize=f"format=q4_0,head=true{extra}")
                     for extra in (",compute=int8", ""))
    expected = 7 * lm.config.num_hidden_layers + 1 if int8_isa(host_cpu()) else 0
    for program in (model.decode_model, model.prefill_program(5)):
        assert [k.kind for k in program.kernels].count("int8-dot") == expected
    ids = prompt(rng, 1, 9)
    got, want = ([m.prefill(ids[:, :5]).numpy()[0]] + [m.decode(ids[:, i]).numpy()[0] for i in range(5, 9)]
                 for m in (model, floats))
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errors) < 0.06, errors


def test_a_one_token_prompt(llama: tuple) -> None:
    lm, model = llama
    ids = torch.tensor([[17]])
    assert_same_greedy(lm, ids, model.generate(ids, max_new_tokens=6), max_new_tokens=6)


def test_batched_prompts_of_different_lengths_are_each_alone(llama: tuple, rng: np.random.Generator) -> None:
    lm, alone = llama
    batched = einfuse.compile_lm(lm, max_len=32, batch=2)
    long, short = prompt(rng, 1, 9), prompt(rng, 1, 4)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    both = batched.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
    assert torch.equal(both[0], alone.generate(long, max_new_tokens=8, eos_token_id=None)[0])
    assert torch.equal(both[1, 5:], alone.generate(short, max_new_tokens=8, eos_token_id=None)[0])
    assert_same_greedy(lm, ids, both, attention_mask=mask, max_new_tokens=8, eos_token_id=None)   # (no end token either side)


def test_the_cache_edges(llama: tuple, rng: np.random.Generator) -> None:
    _, model = llama
    ids = prompt(rng, 1, 20)
    with pytest.raises(InputError, match="max_len=32"):
        model.generate(ids, max_new_tokens=14)
    out = model.generate(ids, max_new_tokens=13, eos_token_id=None)   # 20 + 12 cached: the cache full
    assert out.shape == (1, 33) and model.length == 32
    with pytest.raises(EinfuseError, match="KV cache is full"):
        model.decode(out[:, -1])
    with pytest.raises(InputError, match="pad on the left"):
        model.prefill(ids[:, :4], attention_mask=torch.tensor([[1, 1, 0, 1]]))
    model.reset()
    with pytest.raises(EinfuseError, match="decode before prefill"):
        model.decode(ids[:, 0])


def test_sampling_is_reproducible_with_a_seed(llama: tuple, rng: np.random.Generator) -> None:
    _, model = llama
    ids = prompt(rng, 1, 5)
    sample = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, eos_token_id=None)
    first, again = model.generate(ids, seed=7, **sample), model.generate(ids, seed=7, **sample)
    assert torch.equal(first, again)
    assert any(not torch.equal(first, model.generate(ids, seed=s, **sample)) for s in (8, 9, 10))
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, seed=3, eos_token_id=None),
                       model.generate(ids, max_new_tokens=12, eos_token_id=None))


def test_streamer_sees_the_prompt_then_each_token(llama: tuple) -> None:
    _, model = llama

    class Collect:
        def __init__(self) -> None:
            self.seen: list[list[int]] = []
            self.ended = False

        def put(self, x: torch.Tensor) -> None:
            self.seen.append(x.flatten().tolist())

        def end(self) -> None:
            self.ended = True
    streamer = Collect()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, streamer=streamer, eos_token_id=None)
    assert streamer.seen == [[5, 6, 7]] + [[t] for t in out[0, 3:].tolist()] and streamer.ended


@pytest.mark.slow   # (the report times each of ~100 kernels built alone: a minute)
def test_report_and_phases(llama: tuple) -> None:
    _, model = llama
    model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=5, eos_token_id=None)
    assert model.phases.prompt_tokens == 4 and model.phases.decode_steps == 4
    text = model.report(prompt_len=4, cached=8)
    assert "prefill program" in text and "decode program" in text and "last generation" in text
    assert model.kv_bytes == 2 * 2 * 32 * 1 * 2 * 16 * 4   # layers x K,V x [32, 1, 2, 16] f32


def test_not_a_causal_lm() -> None:
    with pytest.raises(EinfuseError, match="causal LM"):
        einfuse.compile_lm(torch.nn.Linear(4, 4), max_len=8)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cuda:sm_90", "accel:fusemax"])
def test_the_decode_program_is_emitted_for_gpus_and_the_accelerator(target: str, tmp_path) -> None:
    """The decode step's kernels (symbolic cache length) are written for ``target``; each distinct
    CUDA source compiles to PTX with nvcc where nvcc is installed."""
    import json
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from einfuse.lm import programs
    from tests.codegen.test_emit import _nvcc
    _, (step, args, dynamic) = programs(causal_lm("llama"), max_len=32)
    manifest = json.loads(einfuse.kernels(step, args, dynamic_shapes=dynamic, target=target,
                                          output=tmp_path).read_text())
    assert len(manifest["kernels"]) > 10 and manifest["target"] == target
    files = [tmp_path / f for k in manifest["kernels"] for f in k["files"]]
    assert all(f.is_file() and f.stat().st_size for f in files)
    nvcc = shutil.which("nvcc")
    if target.startswith("cuda") and nvcc:
        sources = {f.read_text().replace(f.stem, "K"): f for f in files if f.suffix == ".cu"}
        with ThreadPoolExecutor(max_workers=2) as pool:
            failed = [f"{f.name}: {err}" for f, err in zip(sources.values(),
                                                           pool.map(_nvcc, [(f, "sm_90") for f in sources.values()])) if err]
        assert not failed, failed


def test_the_generate_command(capsys: pytest.CaptureFixture) -> None:
    from einfuse.cli import main
    assert main(["generate", "llama", "--prompt-len", "7", "--new-tokens", "5", "--max-len", "32"]) == 0
    out = capsys.readouterr()
    assert "time to first token" in out.out and "tokens/s" in out.out and "KV cache" in out.out
    assert "peak RSS" in out.out and "generating: 5/5 tokens" in out.err
    assert main(["generate", "llama", "--prompt", "def main("]) == 1
    assert "has no tokenizer" in capsys.readouterr().err
