"""einfuse against its peers, side by side in one process, on the zoo and a 1024^3 matmul.

    python -m benchmarks.run [--models gpt2,llama,...] [--peers eager,inductor,ort,relax,unfused,3pass,einfuse]
                             [--threads 2] [--repeat 20] [--rounds 3]

Workloads: the zoo's models, a 1024^3 matmul, and (by name only) ``convnet8`` (the zoo ConvNet at
batch 8), ``mlp4096`` (1024-4096-1024, GELU, batch 64), ``gemv1x1024``, ``gemv1x4096``,
``gemv8x4096`` and ``gemv16x4096`` (a few rows times a square weight), GPT-2 and Llama at sequence 1024
(``gpt21024``, ``llama1024``) and attention alone, B=1, H=8, D=64: ``attn1024``, ``attn4096``,
``attn16384``, with a ``c`` suffix for causal, ``lstm32``, ``lstm256``, ``lstm1024`` (a 2-layer
LSTM of that many steps, batch 1; ``b8`` suffix: batch 8), ``attnvit`` (the zoo ViT's: B=2, H=4, 785 tokens,
D=16) and ``attn1024w80``, ``attn1024w96`` (D=80, 96); eager is then torch's fused
``scaled_dot_product_attention``.
Peak memory of the fused attention: ``python -m benchmarks.memory``.

Peers: torch eager, torch.compile (inductor), ONNX Runtime (CPU, if installed), TVM's own Relax
pipeline (from_exported_program + the default pipeline), einfuse, and (by name only) ``backend``:
``torch.compile(backend="einfuse")``, and ``unfused``:
einfuse without ``fuse-attention``, attention as the 3-pass cascade (a row-block kernel: each
block's scores stay in cache), and ``3pass``: torch eager on the attention workloads spelled out
(``q k^T``, softmax, ``@ v``: the N x N scores in memory). Prints the median latency
of each (``repeat`` calls per round, every peer in turn, the median over ``rounds`` rounds), each
peer's time relative to einfuse (> 1 means einfuse is faster), and compile times.
A peer that fails on a model is shown as failed with its error.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

WORKLOADS: dict[str, Callable[[], tuple[torch.nn.Module, tuple]]] = {}


def workload(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        WORKLOADS[name] = fn
        return fn
    return register


class MatMul(torch.nn.Module):
    def __init__(self, n: int = 1024) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@workload("matmul1024")
def _matmul() -> tuple:
    torch.manual_seed(0)
    return MatMul().eval(), (torch.randn(1024, 1024),)


def _few_rows(rows: int, n: int) -> Callable[[], tuple]:
    def build() -> tuple:
        torch.manual_seed(0)
        return MatMul(n).eval(), (torch.randn(rows, n),)
    return build


for _rows, _n in ((1, 1024), (1, 4096), (8, 4096), (16, 4096)):
    workload(f"gemv{_rows}x{_n}")(_few_rows(_rows, _n))   # decoding's few tokens: rows x n @ n x n


def _zoo(name: str, **options: Any) -> Callable[[], tuple]:
    def build() -> tuple:
        from einfuse import zoo
        return zoo.build(name, **options)
    return build


for _name, _opts in {"mlp": {"batch": 64}, "gpt2": {"seq": 256}, "llama": {"seq": 256}, "bert": {"seq": 256},
                     "vit": {"image": 224}}.items():
    workload(_name)(_zoo(_name, **_opts))
DEFAULT = list(WORKLOADS)  # attention alone and long sequences are run by name: --models attn1024,...
workload("convnet8")(_zoo("convnet", batch=8))   # issue 24's small ConvNet: batch 8, 32 x 32


@workload("mlp4096")
def _wide_mlp() -> tuple:
    """Issue 24's MLP: Linear(1024, 4096), GELU, Linear(4096, 1024), batch 64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    return net.eval(), (torch.randn(64, 1024),)

for _name in ("gpt2", "llama"):
    workload(f"{_name}1024")(_zoo(_name, seq=1024))   # where attention's share is large


class Attention(torch.nn.Module):
    """Attention alone, as torch's fused ``scaled_dot_product_attention`` computes it."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    def spelled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention as three passes over the sequence, the N x N scores in memory
        between them (the unfused cascade FuseMax measures its 1-pass kernel against)."""
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if self.causal:
            n = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        return scores.softmax(-1) @ v


def _attention(n: int, causal: bool, shape: tuple[int, int, int] = (1, 8, 64)) -> Callable[[], tuple]:
    batch, heads, width = shape

    def build() -> tuple:
        torch.manual_seed(0)
        return Attention(causal).eval(), tuple(torch.randn(batch, heads, n, width) for _ in range(3))
    return build


for _n in (1024, 4096, 16384):
    workload(f"attn{_n}")(_attention(_n, False))
    workload(f"attn{_n}c")(_attention(_n, True))
class Recurrent(torch.nn.Module):
    """A 2-layer LSTM (256 wide, input 256) under a Linear head, batch ``batch``: every step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = torch.nn.LSTM(256, 256, num_layers=2, batch_first=True), torch.nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def _recurrent(steps: int, batch: int) -> Callable[[], tuple]:
    def build() -> tuple:
        torch.manual_seed(0)
        return Recurrent().eval(), (torch.randn(batch, steps, 256),)
    return build


for _steps in (32, 256, 1024):   # compile time and speed as the sequence grows (a loop, not unrolled)
    workload(f"lstm{_steps}")(_recurrent(_steps, 1))
    workload(f"lstm{_steps}b8")(_recurrent(_steps, 8))
workload("attnvit")(_attention(785, False, (2, 4, 16)))   # the zoo ViT's attention: 785 tokens, 16-wide heads
for _width in (80, 96):   # heads wider than a register tile and no power of two (Phi's 80 and 96)
    workload(f"attn1024w{_width}")(_attention(1024, False, (1, 8, _width)))


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """The median of ``repeat`` timed calls, after a pause (so the previous peer's spinning
    threads, torch's OpenMP pool, have gone to sleep) and one untimed call."""
    time.sleep(PAUSE)
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


PAUSE = 0.3  # seconds


def measure(runs: dict[str, Callable[[], Any]], repeat: int, rounds: int) -> dict[str, float]:
    """Each peer's time: the median over ``rounds`` rounds, in each of which every peer runs
    ``repeat`` times in turn (this VM's speed drifts by +-30 % over minutes; interleaving
    rounds spreads that drift over every peer instead of charging it to whichever ran then).
    TVM's Relax pipeline, hundreds of times slower, runs once after the rounds."""
    blocks: dict[str, list[float]] = {peer: [] for peer in runs if peer != "relax"}
    for _ in range(rounds):
        for peer in blocks:
            blocks[peer].append(median_seconds(runs[peer], repeat))
    out = {peer: statistics.median(b) for peer, b in blocks.items()}
    if "relax" in runs:   # (last, once: after its calls of seconds each, einfuse ran 1.4x slower here)
        out["relax"] = median_seconds(runs["relax"], max(3, repeat // 10))
    return out


def peer_eager(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    return (lambda: model(*args)), 0.0


def peer_inductor(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    compiled = torch.compile(model)
    start = time.perf_counter()
    compiled(*args)
    return (lambda: compiled(*args)), time.perf_counter() - start


def peer_backend(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    """``torch.compile(model, backend="einfuse")``: dynamo's graph compiled by einfuse."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="einfuse")
    start = time.perf_counter()
    compiled(*args)
    return (lambda: compiled(*args)), time.perf_counter() - start


def peer_ort(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    import onnxruntime as ort
    start = time.perf_counter()
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    torch.onnx.export(model, args, path, dynamo=True, optimize=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    session.run(None, feeds)
    return (lambda: session.run(None, feeds)), time.perf_counter() - start


def peer_relax(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from einfuse.targets import host_cpu
    start = time.perf_counter()
    mod = from_exported_program(torch.export.export(model, args))
    vm = relax.VirtualMachine(tvm.compile(mod, target=host_cpu().tvm_target()), tvm.cpu())
    inputs = [tvm.runtime.tensor(a.numpy()) for a in args]
    return (lambda: vm["main"](*inputs)), time.perf_counter() - start


def peer_einfuse(model: torch.nn.Module, args: tuple, pipeline: str = "default",
                 tuning_db: Any = False) -> tuple[Callable, float]:
    """einfuse, untuned unless given a tuning database (benchmarks/tune.py)."""
    import einfuse
    start = time.perf_counter()
    compiled = einfuse.compile(model, args, pipeline=pipeline, cache_dir=tempfile.mkdtemp(), tuning_db=tuning_db)
    tvm_args = compiled.to_tvm(args)
    return (lambda: compiled._run(tvm_args)), time.perf_counter() - start


def peer_spelled(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    """torch eager on attention spelled out as three passes (``Attention.spelled``)."""
    if not isinstance(model, Attention):
        raise ValueError("only the attention workloads are spelled out")
    return (lambda: model.spelled(*args)), 0.0


def peer_unfused(model: torch.nn.Module, args: tuple) -> tuple[Callable, float]:
    """einfuse without ``fuse-attention``: attention as the 3-pass cascade."""
    return peer_einfuse(model, args, pipeline="unfused")


PEERS = {"eager": peer_eager, "inductor": peer_inductor, "backend": peer_backend, "ort": peer_ort, "relax": peer_relax,
         "unfused": peer_unfused, "3pass": peer_spelled, "einfuse": peer_einfuse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--peers", default="eager,inductor,ort,relax,einfuse")  # (and "unfused")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    peers = opts.peers.split(",")
    start(opts)
    for name in opts.models.split(","):
        model, args = WORKLOADS[name]()
        compare(name, model, args, {peer: PEERS[peer] for peer in peers}, opts.repeat, opts.rounds)


def start(opts: argparse.Namespace) -> None:
    """Threads for every peer, quiet warnings, and the header of the table."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(opts.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(opts.threads))
    print(f"threads={opts.threads} repeat={opts.repeat} rounds={opts.rounds} torch={torch.__version__}")
    print(f"{'workload':11} {'peer':9} {'median ms':>10} {'vs einfuse':>10} {'compile s':>9}")


def compare(name: str, model: torch.nn.Module, args: tuple, peers: dict[str, Callable],
            repeat: int, rounds: int) -> dict[str, Any]:
    """Build every peer, measure them in interleaved rounds and print a row each; returns each
    peer's (seconds, compile seconds), or its failure."""
    results: dict[str, Any] = {}
    runs: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        for peer, make in peers.items():
            try:
                runs[peer], results[peer] = make(model, args)
                runs[peer]()   # (a peer that fails at run time fails here)
            except Exception as exc:  # a failing peer is reported, not fatal
                runs.pop(peer, None)
                results[peer] = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:90]}"
        for peer, seconds in measure(runs, repeat, rounds).items():
            results[peer] = (seconds, results[peer])
        results = {peer: results[peer] for peer in peers}   # (in the order asked for)
    ours = results.get("einfuse")
    for peer, r in results.items():
        if isinstance(r, str):
            print(f"{name:11} {peer:9} {r}")
            continue
        ratio = f"{r[0] / ours[0]:.2f}x" if isinstance(ours, tuple) else "-"
        print(f"{name:11} {peer:9} {r[0] * 1e3:10.3f} {ratio:>10} {r[1]:9.1f}")
    if name == "matmul1024":
        print(f"{'':11} GFLOP/s: " + ", ".join(f"{peer} {2 * 1024 ** 3 / r[0] / 1e9:.0f}"
                                               for peer, r in results.items() if isinstance(r, tuple)))
    return results

if __name__ == "__main__":
    np.random.seed(0)
    main()
