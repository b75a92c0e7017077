"""Pre-quantized weights imported as they are: torchao's quantized Linears and a GGUF file's
Q8_0/Q4_0 tensors, each against the source library's own dequantization (the interpreter's value
of the dequantized weight) and its own model's output (the compiled model)."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.api import captured
from einfuse.errors import EinfuseError
from einfuse.ir import Cascade, interpret

from ..conftest import rel_err

warnings.filterwarnings("ignore", category=FutureWarning)

K, N = 256, 128


def mlp(rng: np.random.Generator) -> torch.nn.Sequential:
    torch.manual_seed(int(rng.integers(2 ** 31)))
    return torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.ReLU(), torch.nn.Linear(N, 32))


def dequantized(c: Cascade, weight: str) -> np.ndarray:
    """Weight ``weight`` as the interpreter reads it (its ``_dq`` made an output), ``[n, k]``."""
    marked = replace(c, tensors=tuple(replace(t, role="output") if t.name == f"{weight}_dq" else t for t in c.tensors))
    return interpret(marked, {"input": np.zeros((4, K))})[f"{weight}_dq"].T


def compiled_matches(model: torch.nn.Module, tmp_path: Path, rng: np.random.Generator) -> float:
    """The compiled model's relative error against ``model``'s own output."""
    x = torch.from_numpy(rng.standard_normal((4, K)).astype(np.float32))
    with torch.no_grad():
        want = model(x).numpy()
    return rel_err(einfuse.compile(model, (x,), cache_dir=tmp_path)(x).numpy(), want)


# ---- torchao --------------------------------------------------------------------------------------

def torchao_configs() -> dict[str, object]:
    ao = pytest.importorskip("torchao.quantization")
    int4 = {"weight_dtype": torch.int4, "mapping_type": ao.MappingType.ASYMMETRIC}
    return {"int8": ao.Int8WeightOnlyConfig(), "int8-intx": ao.IntxWeightOnlyConfig(),   # (int8 per channel, symmetric)
            "int4-g32": ao.IntxWeightOnlyConfig(granularity=ao.PerGroup(32), **int4),
            "int4-g128": ao.IntxWeightOnlyConfig(granularity=ao.PerGroup(128), **int4)}


def torchao_quantized(rng: np.random.Generator, config: str) -> torch.nn.Sequential:
    from torchao.quantization import quantize_
    model = mlp(rng)
    quantize_(model, torchao_configs()[config])
    return model


@pytest.mark.parametrize("config", ["int8", "int8-intx", "int4-g32", "int4-g128"])
def test_torchao_weights_import_as_their_own_integers(config: str, rng: np.random.Generator) -> None:
    """The interpreter's weight is torchao's dequantized weight: equal once rounded to float32
    (torchao computes ``(q - z) * s`` in float32, the interpreter exactly)."""
    model = torchao_quantized(rng, config)
    c = captured(model, (torch.zeros(4, K),))
    kinds = {t.name: t.dtype for t in c.tensors if t.role == "param"}
    assert "t0_weight" not in kinds and kinds["t0_weight_q" if config.startswith("int8") else "t0_weight_p"] in ("i8", "u8")
    for weight, linear in (("t0_weight", model[0]), ("t2_weight", model[2])):
        want = linear.weight.dequantize().numpy()
        np.testing.assert_array_equal(dequantized(c, weight).astype(np.float32), want)
    if config == "int8":
        np.testing.assert_array_equal(c.params["t0_weight_q"], model[0].weight.qdata.numpy().T)


@pytest.mark.parametrize("config", ["int8", "int4-g128"])
def test_a_torchao_model_compiles_and_matches_torchao(config: str, rng: np.random.Generator, tmp_path: Path) -> None:
    assert compiled_matches(torchao_quantized(rng, config), tmp_path, rng) <= 1e-5


def test_torchao_weights_without_an_einfuse_format_are_refused(rng: np.random.Generator) -> None:
    ao = pytest.importorskip("torchao.quantization")
    model = mlp(rng)
    ao.quantize_(model, ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerAxis(0)))
    with pytest.raises(EinfuseError, match=r"torchao weight '0.weight' \(IntxUnpackedToInt8Tensor\) cannot be "
                                           r"imported: 4-bit integers in groups of 256"):
        captured(model, (torch.zeros(4, K),))


# ---- GGUF ---------------------------------------------------------------------------------------

def gguf_file(path: Path, rng: np.random.Generator, types: dict[str, str]) -> dict[str, np.ndarray]:
    """A GGUF file of ``mlp``'s tensors (name -> GGML type), quantized by the gguf package; returns
    each tensor as the package dequantizes it, in torch's shape."""
    gguf = pytest.importorskip("gguf")
    shapes = {"0.weight": (N, K), "0.bias": (N,), "2.weight": (32, N), "2.bias": (32,)}
    writer, values = gguf.GGUFWriter(str(path), "einfuse-test"), {}
    for name, kind in types.items():
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(rng.standard_normal(shapes[name]).astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        values[name] = gguf.quants.dequantize(data, qtype).reshape(shapes[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def test_gguf_q8_0_and_q4_0_load_as_their_own_blocks(rng: np.random.Generator, tmp_path: Path) -> None:
    values = gguf_file(tmp_path / "m.gguf", rng, {"0.weight": "Q8_0", "0.bias": "F32", "2.weight": "Q4_0",
                                                  "2.bias": "F16"})
    model = einfuse.load_gguf(mlp(rng), tmp_path / "m.gguf")
    c = captured(model, (torch.zeros(4, K),))
    kinds = {t.name: t.dtype for t in c.tensors if t.role == "param"}
    assert (kinds["t0_weight_q"], kinds["t0_weight_d"], kinds["t2_weight_p"]) == ("i8", "f16", "u8")
    np.testing.assert_array_equal(dequantized(c, "t0_weight"), values["0.weight"])   # (exact: an int times an f16)
    np.testing.assert_array_equal(dequantized(c, "t2_weight"), values["2.weight"])
    np.testing.assert_array_equal(c.params["t2_bias"], values["2.bias"])
    assert compiled_matches(model, tmp_path, rng) <= 1e-5


def test_gguf_names_map_tensors_to_parameters(rng: np.random.Generator, tmp_path: Path) -> None:
    values = gguf_file(tmp_path / "m.gguf", rng, {"0.weight": "Q4_0", "0.bias": "F32"})
    model = einfuse.load_gguf(mlp(rng), tmp_path / "m.gguf", names={"0.weight": "0.weight"})
    c = captured(model, (torch.zeros(4, K),))
    np.testing.assert_array_equal(dequantized(c, "t0_weight"), values["0.weight"])
    assert "t2_weight" in c.params   # (not in names: left in float)
    with pytest.raises(EinfuseError, match=r"GGUF tensor '0.weight' is \[128, 256\], '2.weight' \[32, 128\]"):
        einfuse.load_gguf(mlp(rng), tmp_path / "m.gguf", names={"0.weight": "2.weight"})
    with pytest.raises(EinfuseError, match="holds no tensors blk.0.ffn_up.weight"):
        einfuse.load_gguf(mlp(rng), tmp_path / "m.gguf", names={"blk.0.ffn_up.weight": "0.weight"})


def test_a_gguf_tensor_of_another_type_is_refused_by_name(rng: np.random.Generator, tmp_path: Path) -> None:
    gguf_file(tmp_path / "m.gguf", rng, {"0.weight": "Q4_1"})
    with pytest.raises(EinfuseError, match="GGUF tensor '0.weight' is of type Q4_1; einfuse loads F32, F16, BF16, "
                                           "Q8_0, Q4_0"):
        einfuse.load_gguf(mlp(rng), tmp_path / "m.gguf")


class Product(torch.nn.Module):
    """``x @ w``: a matmul that reduces its weight's first dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(N, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_a_pre_quantized_weight_not_read_as_a_linear_weight_is_refused(rng: np.random.Generator,
                                                                       tmp_path: Path) -> None:
    """Blocks run along a weight's last dimension: only a contraction reducing it reads them."""
    gguf_file(tmp_path / "m.gguf", rng, {"0.weight": "Q8_0"})
    table = einfuse.load_gguf(torch.nn.Sequential(torch.nn.Embedding(N, K)), tmp_path / "m.gguf")
    with pytest.raises(EinfuseError, match="no contraction reads the pre-quantized weight 't0_weight' as a Linear"):
        captured(table, (torch.zeros(4, dtype=torch.int64),))
    product = einfuse.load_gguf(Product(), tmp_path / "m.gguf", names={"0.weight": "w"})
    with pytest.raises(EinfuseError, match=r"weight 'w' cannot be read quantized \(reduced over its first dimension\)"):
        captured(product, (torch.zeros(4, N),))
