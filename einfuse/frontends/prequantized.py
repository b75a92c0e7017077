"""Weights quantized before einfuse sees them, imported as they are: torchao's quantized tensors
and a GGUF file's Q8_0/Q4_0 tensors become the einfuse formats whose dequantization equals theirs
(:mod:`einfuse.ir.quant_formats`), never requantized.

Why: a pre-quantized model's integers and scales are its own (chosen by its method, perhaps
calibrated); quantizing its dequantized floats again would round twice and lose them (issue 19).

How: :func:`split` gives back a model to capture, each pre-quantized weight a float parameter of
its own dequantized value, and each weight's stored form by its captured tensor name; ``api`` reads
them through ``passes.quantize.read_imported`` right after capture, the IR the ``quantize`` pass
writes. :func:`load_gguf` loads a GGUF file into a model, recording each Q8_0/Q4_0 tensor's stored
form on the model (``einfuse_quantized``, by parameter key) for :func:`split`.
docs/quantization.md, "Importing pre-quantized weights".
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..errors import EinfuseError
from ..ir.quant_formats import FORMATS, Stored, int4_stored, int8_stored, q4_0_stored, q8_0_stored
from .torch_export import param_name

#: The torchao tensor subclasses einfuse imports, with the torchao config that makes each on a CPU.
TORCHAO = {"Int8Tensor": "Int8WeightOnlyConfig", "IntxUnpackedToInt8Tensor": "IntxWeightOnlyConfig"}
#: The GGUF tensor types einfuse loads: float ones as float weights, these kept in their einfuse format.
GGUF_FLOAT = ("F32", "F16", "BF16")
GGUF_STORED = {"Q8_0": q8_0_stored, "Q4_0": q4_0_stored}


def split(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Stored]]:
    """``model`` with each pre-quantized weight a float parameter of its dequantized value (a copy
    of it where torchao's weights are replaced) and each weight's stored form by its tensor name
    in the captured cascade."""
    keyed = dict(getattr(model, "einfuse_quantized", {}))
    ao = {key: t for key, t in model.named_parameters() if type(t).__module__.startswith("torchao")}
    if ao:
        model = copy.deepcopy(model)
        for key, t in ao.items():
            keyed[key] = _from_torchao(key, t)
            owner, _, leaf = key.rpartition(".")
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(t.dequantize(), requires_grad=False))
    keys = [key for key, _ in _tensors(model)]
    return model, {param_name(key, keys): stored for key, stored in keyed.items()}


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _from_torchao(key: str, t: Any) -> Stored:
    """torchao's quantized weight ``t`` (parameter ``key``) in the einfuse format that dequantizes
    to its values: a symmetric per-channel int8 one to ``int8``, a 4-bit one in groups of G with
    zero points ``z`` (``(q - z) * s``, both in -8..7) to ``int4-gG`` (``q + 8``, ``z + 8``)."""
    kind = type(t).__name__

    def refused(why: str) -> EinfuseError:
        known = ", ".join(f"{name} ({config})" for name, config in TORCHAO.items())
        return EinfuseError(f"the torchao weight '{key}' ({kind}) cannot be imported: {why}; einfuse imports "
                            f"{known} weight-only weights of float32 Linears")

    if kind not in TORCHAO:
        raise refused("einfuse has no format for it")
    if any(getattr(t, a, None) is not None for a in ("act_quant_kwargs", "activation_quantization", "act_pre_scale")):
        raise refused("its activations are quantized or scaled too")
    if t.dtype != torch.float32 or t.ndim != 2 or t.block_size[0] != 1:
        raise refused(f"a {t.dtype} weight of shape {tuple(t.shape)} in blocks of {list(t.block_size)}")
    n, k = t.shape
    group = t.block_size[1]
    bits = 8 if kind == "Int8Tensor" else int(str(t.target_dtype).removeprefix("torch.int"))
    q = t.qdata.detach().numpy().astype(np.int64)
    s = t.scale.detach().float().reshape(n, k // group).numpy()
    z = np.zeros(s.shape, np.int64) if t.zero_point is None else \
        t.zero_point.detach().reshape(n, k // group).numpy().astype(np.int64)
    if bits == 8 and group == k and not z.any():
        return int8_stored(q, s[:, 0])
    if bits == 4 and f"int4-g{group}" in FORMATS:
        return int4_stored(q + 8, z + 8, s, group)
    raise refused(f"{bits}-bit integers in groups of {group} {'with' if z.any() else 'without'} zero points have "
                  "no einfuse format (int8: per channel, no zero points; int4-g32, -g64, -g128)")


def load_gguf(model: torch.nn.Module, path: str | Path, names: Mapping[str, str] | None = None) -> torch.nn.Module:
    """Load the tensors of GGUF file ``path`` into ``model`` (in place; returns it): each into the
    parameter or buffer of its own name, or with ``names`` (GGUF name -> parameter key) only the
    tensors it names, each into the one it names. F32, F16 and BF16 tensors load as float values; a
    Q8_0 or Q4_0 tensor loads its dequantized value into a two-dimensional float32 weight and keeps
    its blocks, unrequantized, as format ``q8_0`` or ``q4_0`` for :func:`einfuse.compile` (recorded
    in ``model.einfuse_quantized``). Any other type raises :class:`~einfuse.errors.EinfuseError`."""
    import gguf
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    wanted = dict(names) if names is not None else {name: name for name in tensors}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise EinfuseError(f"{path} holds no tensors {', '.join(missing)}")
    targets, stored = dict(_tensors(model)), dict(getattr(model, "einfuse_quantized", {}))
    for name, key in wanted.items():
        tensor, kind = tensors[name], tensors[name].tensor_type.name
        if kind not in GGUF_FLOAT and kind not in GGUF_STORED:
            raise EinfuseError(f"GGUF tensor '{name}' is of type {kind}; einfuse loads "
                               f"{', '.join((*GGUF_FLOAT, *GGUF_STORED))}")
        if key not in targets:
            raise EinfuseError(f"GGUF tensor '{name}' has no destination: {type(model).__name__} has no "
                               f"parameter or buffer '{key}'")
        target, shape = targets[key], tuple(int(d) for d in reversed(tensor.shape))   # (GGUF lists the innermost first)
        if tuple(target.shape) != shape:
            raise EinfuseError(f"GGUF tensor '{name}' is {list(shape)}, '{key}' {list(target.shape)}")
        stored.pop(key, None)
        if kind in GGUF_STORED:
            if target.dtype != torch.float32 or target.dim() != 2:
                raise EinfuseError(f"GGUF tensor '{name}' is {kind}: it loads into a matrix of float32, "
                                   f"'{key}' is {target.dtype} {list(shape)}")
            stored[key] = _gguf_stored(kind, np.asarray(tensor.data), gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])
        with torch.no_grad():
            value = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))   # (a copy: the file is read-only)
            target.copy_(torch.from_numpy(value.reshape(shape)))
    model.einfuse_quantized = stored
    return model


def _gguf_stored(kind: str, data: np.ndarray, block_bytes: int) -> Stored:
    """A GGUF Q8_0/Q4_0 tensor's bytes (``[n, row bytes]``: per block of 32, an f16 scale, then its
    32 int8 values or 16 bytes of llama.cpp's nibbles) as its einfuse format."""
    blocks = data.reshape(data.shape[0], -1, block_bytes)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0]
    values = np.ascontiguousarray(blocks[:, :, 2:]).reshape(data.shape[0], -1)
    return GGUF_STORED[kind](values.view(np.int8) if kind == "Q8_0" else values, d)
