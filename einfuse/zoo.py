"""A model zoo for tests and benchmarks: small configurations, random weights, nothing downloaded.

``build(name, **options)`` returns ``(model, example_args)``. ``mlp`` and ``convnet`` are plain
torch; ``gpt2``, ``llama``, ``bert``, ``vit`` and ``mixtral`` come from ``transformers`` (the
``einfuse[zoo]`` extra, imported only when asked for), wrapped to take tensors and return the last
hidden state. Each model carries ``einfuse_rank_names`` so captured ranks read as what they are.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from .errors import EinfuseError

Built = tuple[torch.nn.Module, tuple[torch.Tensor, ...]]


class _LastHidden(torch.nn.Module):
    """A transformers model taking tensors (``input_ids`` ...) and returning the last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


class _EncoderLastHidden(_LastHidden):
    """BERT-style: ``input_ids``, ``attention_mask`` (1 = keep), ``token_type_ids``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


class _ImageLastHidden(_LastHidden):
    """ViT-style: ``pixel_values``."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(pixel_values=pixel_values).last_hidden_state


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise EinfuseError("this zoo model needs transformers: pip install 'einfuse[zoo]'") from None


def _named(model: torch.nn.Module, names: dict[Any, str]) -> torch.nn.Module:
    model.einfuse_rank_names = names  # type: ignore[assignment]
    return model.eval()


def mlp(batch: int = 64) -> Built:
    """Linear(256, 1024) -> GELU -> Linear(1024, 256) -> ReLU -> Linear(256, 10)."""
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return _named(net, {batch: "B", 256: "D", 1024: "F", 10: "K"}), (torch.randn(batch, 256),)


class ConvNet(torch.nn.Module):
    """Conv-BN-ReLU-maxpool, a grouped strided conv, BN, ReLU, avgpool, adaptive pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(image))), 2)
        x = torch.nn.functional.avg_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def convnet(batch: int = 2, image: int = 32) -> Built:
    """A small ConvNet on ``batch`` RGB images of ``image`` x ``image`` pixels."""
    net = ConvNet()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN does something
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    names = {batch: "B", 3: "C", 16: "C16", 32: "C32", image: "H", image // 2: "H2", image // 4: "H4",
             image // 8: "H8", 10: "K"}
    return _named(net, names), (torch.randn(batch, 3, image, image),)


def gpt2(batch: int = 1, seq: int = 24) -> Built:
    """GPT-2: 2 layers, width 64, 4 heads, vocabulary 96."""
    tf = _transformers()
    cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=max(512, seq),
                        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    names = {batch: "B", seq: "S", 64: "D", 4: "H", 16: "E", 256: "F", 96: "V", 512: "P", 192: "D3", "seq": "S"}
    return _named(_LastHidden(tf.GPT2Model(cfg)), names), (torch.randint(0, 96, (batch, seq)),)


def llama(batch: int = 1, seq: int = 24) -> Built:
    """Llama: 2 layers, width 64, 4 query heads over 2 key/value heads (GQA), RoPE, RMSNorm, SiLU MLP."""
    tf = _transformers()
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=max(512, seq),
                         bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    names = {batch: "B", seq: "S", 64: "D", 4: "H", 2: "G", 16: "E", 8: "E2", 176: "F", 96: "V", 32: "HE",
             "seq": "S"}
    return _named(_LastHidden(tf.LlamaModel(cfg)), names), (torch.randint(0, 96, (batch, seq)),)


def bert(batch: int = 2, seq: int = 24) -> Built:
    """BERT: 2 layers, width 64, 4 heads, erf GELU, token types, a padding attention mask."""
    tf = _transformers()
    cfg = tf.BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=96, max_position_embeddings=max(512, seq), type_vocab_size=2, attn_implementation="sdpa")
    ids = torch.randint(0, 96, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq * 2 // 3:] = 0
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    names = {batch: "B", seq: "S", 64: "D", 4: "H", 16: "E", 256: "F", 96: "V", 512: "P", "seq": "S"}
    return _named(_EncoderLastHidden(tf.BertModel(cfg, add_pooling_layer=False)), names), (ids, mask, types)


def vit(batch: int = 2, image: int = 32) -> Built:
    """ViT: 8x8 patches of a 32x32 image (16 patches + CLS), width 64, 4 heads, 2 layers."""
    tf = _transformers()
    cfg = tf.ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=image, patch_size=8, num_channels=3, attn_implementation="sdpa")
    patches = (image // 8) ** 2
    names = {batch: "B", 3: "C", image: "I", 8: "P", image // 8: "G", patches: "N", patches + 1: "S",
             64: "D", 4: "H", 16: "E", 256: "F"}
    return _named(_ImageLastHidden(tf.ViTModel(cfg, add_pooling_layer=False)), names), \
        (torch.randn(batch, 3, image, image),)


def mixtral(batch: int = 1, seq: int = 24) -> Built:
    """Mixtral: 1 layer, width 64, 6 experts with top-2 routing, GQA attention."""
    tf = _transformers()
    cfg = tf.MixtralConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, num_local_experts=6, num_experts_per_tok=2,
                           max_position_embeddings=max(512, seq), bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    names = {batch: "B", seq: "S", 64: "D", 4: "H", 2: "G", 16: "E", 112: "F", 224: "F2", 96: "V", 6: "X",
             "seq": "S"}
    names.setdefault(batch * seq, "T")
    names.setdefault(batch * seq * 2, "TK")
    return _named(_LastHidden(tf.MixtralModel(cfg)), names), (torch.randint(0, 96, (batch, seq)),)


#: Small configurations of each causal-LM family ``compile_lm`` serves (``causal_lm``): 2 layers,
#: width 64, GQA where the family has it, a sliding window of 8 where it has one.
CAUSAL_LMS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                    attn_implementation="eager")),   # (transformers refuses sdpa for it)
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5)),
    # mixtures of experts (issue 22): 4 experts, top-2; Qwen2-MoE with its gated shared expert;
    # DeepSeek-V3's routed + shared experts and grouped routing (its MLA attention is not captured: use its block)
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, shared_expert_intermediate_size=80)),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0,
                                             q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16)),
    # the MoE benchmark's model (benchmarks/moe.py): width 512, 2 layers, 8 experts of 1792, top-2, GQA 8/2
    "mixtral-512": ("MixtralConfig", dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8,
                                          num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                          vocab_size=1000, initializer_range=0.02)),
    # the decode benchmark's model (benchmarks/generate.py): ~0.4 GB of fp32 weights read per token
    "llama-1024": ("LlamaConfig", dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                       initializer_range=0.02)),
}


def causal_lm(family: str, **overrides: Any) -> torch.nn.Module:
    """A ``*ForCausalLM`` of ``family`` (:data:`CAUSAL_LMS`) with random weights, seeded, in eval
    mode: width 64, 2 layers of 4 heads, vocabulary 96 unless ``overrides`` say otherwise; weights
    drawn wider than transformers' default (``initializer_range=0.1``) so that greedy decoding's
    argmax is not a near-tie between tokens."""
    if family not in CAUSAL_LMS:
        raise EinfuseError(f"unknown causal LM '{family}'; the zoo has {', '.join(CAUSAL_LMS)}")
    tf = _transformers()
    config_name, options = CAUSAL_LMS[family]
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                max_position_embeddings=512, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                attn_implementation="sdpa")
    config = getattr(tf, config_name)(**{**base, **options, **overrides})
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


BUILDERS: dict[str, Callable[..., Built]] = {
    "mlp": mlp, "convnet": convnet, "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "mixtral": mixtral,
}


def build(name: str, **options: Any) -> Built:
    """``(model, example_args)`` of the zoo model ``name`` (options: ``batch``, ``seq`` / ``image``)."""
    if name not in BUILDERS:
        raise EinfuseError(f"unknown zoo model '{name}'; the zoo has {', '.join(BUILDERS)}")
    torch.manual_seed(0)
    model, args = BUILDERS[name](**options)
    model.einfuse_name = name  # type: ignore[assignment]
    return model, args
