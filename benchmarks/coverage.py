"""How much of the model zoo beyond ``einfuse.zoo`` ``torch.compile(backend="einfuse")`` takes
(issue 23): Hugging Face architectures from small random configs, and a torch LSTM.

    python -m benchmarks.coverage [--only llama,t5] [--markdown]

For each model: eager's output, then the backend's (under ``torch.no_grad()``, after
``torch._dynamo.reset()``, with ``allow_rnn``: dynamo traces an RNN module only with it), their relative error, how many graphs dynamo gave the backend, and
what fell back to eager (the backend's ``EagerFallbackWarning`` messages) or the error that
stopped it. ``--markdown`` prints the table docs/coverage.md holds.
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Callable

import torch

VOCAB, WIDTH, SEQ = 128, 64, 12


def _lm(config_name: str, **extra: Any) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    """A causal LM of ``transformers.<config_name>`` with a small config, and token ids."""
    def build() -> tuple[torch.nn.Module, tuple]:
        import transformers
        config = getattr(transformers, config_name)(**extra)
        model = transformers.AutoModelForCausalLM.from_config(config)
        return model, (torch.randint(0, VOCAB, (1, SEQ)),)
    return build


def _base(config_name: str, inputs: Callable[[], tuple], **extra: Any) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    """The base model (``AutoModel``) of ``transformers.<config_name>`` and its inputs."""
    def build() -> tuple[torch.nn.Module, tuple]:
        import transformers
        model = transformers.AutoModel.from_config(getattr(transformers, config_name)(**extra))
        return model, inputs()
    return build


def _ids() -> tuple:
    return (torch.randint(0, VOCAB, (1, SEQ)),)


def _pixels() -> tuple:
    return (torch.randn(1, 3, 32, 32),)


class _LSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class _T5(torch.nn.Module):
    """T5 with its decoder's inputs given (dynamo traces one call)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers
        config = transformers.T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        self.model = transformers.T5ForConditionalGeneration(config)

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, decoder_input_ids=decoder_ids).logits


LM = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple]]] = {
    "llama": _lm("LlamaConfig", num_key_value_heads=2, **LM),
    "qwen2": _lm("Qwen2Config", num_key_value_heads=2, **LM),
    "mistral": _lm("MistralConfig", num_key_value_heads=2, **LM),
    "phi3": _lm("Phi3Config", pad_token_id=0, **LM),
    "gemma": _lm("GemmaConfig", head_dim=16, num_key_value_heads=2, **LM),
    "gpt_neox": _lm("GPTNeoXConfig", **LM),
    "opt": _lm("OPTConfig", vocab_size=VOCAB, hidden_size=WIDTH, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
               word_embed_proj_dim=WIDTH),
    "gpt2": _lm("GPT2Config", vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4),
    "bloom": _lm("BloomConfig", vocab_size=VOCAB, hidden_size=WIDTH, n_layer=2, n_head=4),
    "mixtral": _lm("MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **LM),
    "mamba": _lm("MambaConfig", vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, state_size=8),
    "bert": _base("BertConfig", _ids, vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128),
    "roberta": _base("RobertaConfig", _ids, vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128),
    "distilbert": _base("DistilBertConfig", _ids, vocab_size=VOCAB, dim=WIDTH, n_layers=2, n_heads=4, hidden_dim=128),
    "electra": _base("ElectraConfig", _ids, vocab_size=VOCAB, embedding_size=WIDTH, hidden_size=WIDTH,
                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "vit": _base("ViTConfig", _pixels, image_size=32, patch_size=8, hidden_size=WIDTH, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128),
    "resnet": _base("ResNetConfig", _pixels, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
    "convnext": _base("ConvNextConfig", _pixels, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "t5": lambda: (_T5(), (torch.randint(0, VOCAB, (1, SEQ)), torch.randint(0, VOCAB, (1, 5)))),
    "lstm": lambda: (_LSTM(), (torch.randn(1, 8, 16),)),
}


def _first(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (logits, a last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    return next(_first(v) for v in values if isinstance(v, (torch.Tensor, tuple, list)) or hasattr(v, "values"))


def check(name: str) -> dict[str, Any]:
    """One model under the backend: its error against eager, graphs, what fell back, or the error."""
    from einfuse.dynamo import EagerFallbackWarning, backend
    torch.manual_seed(0)
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, inputs: list, **kw: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return backend(gm, inputs, **kw)
    torch._dynamo.reset()
    start = time.perf_counter()
    row: dict[str, Any] = {"model": name, "graphs": 0, "fell_back": [], "error": None, "rel_err": None}
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model, args = MODELS[name]()
            want = _first(model.eval()(*args))
            got = _first(torch.compile(model, backend=counting)(*args))
            row["rel_err"] = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        except Exception as exc:   # (the row says what stopped it)
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    row["fell_back"] = [str(w.message) for w in caught if issubclass(w.category, EagerFallbackWarning)]
    row["graphs"], row["seconds"] = len(graphs), time.perf_counter() - start
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | graphs | rel err vs eager | fell back to eager | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        err = r["error"] or ("-" if r["rel_err"] is None else f"{r['rel_err']:.1e}")
        fell = "; ".join(m.removeprefix("einfuse: ") for m in r["fell_back"]) or (
            "nothing" if r["graphs"] else "all: dynamo gave the backend no graph")
        lines.append(f"| {r['model']} | {r['graphs']} | {err} | {fell} | {r['seconds']:.0f} |")
    clean = sum(1 for r in rows if r["error"] is None and r["graphs"] and not r["fell_back"] and r["rel_err"] <= 1e-4)
    lines.append(f"\n{clean} of {len(rows)} match eager (<= 1e-4) with nothing in eager.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--markdown", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in (opts.only.split(",") if opts.only else MODELS):
        rows.append(check(name))
        r = rows[-1]
        print(f"{name:12} graphs {r['graphs']}  rel err {r['rel_err']}  fell back {r['fell_back']}  "
              f"error {r['error']}  {r['seconds']:.0f} s", flush=True)
    if opts.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
