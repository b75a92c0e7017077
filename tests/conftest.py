"""Shared test helpers: fresh random inputs (seed reported on failure) and fixture loading."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

from einfuse.ir import Cascade, parse

CASCADES = Path(__file__).parent / "cascades"


def load(name: str) -> Cascade:
    """Parse ``tests/cascades/<name>.ein``."""
    return parse((CASCADES / f"{name}.ein").read_text())


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (both as float64)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--isa", choices=("host", "avx2", "avx512", "other"), default="host",
                     help="schedule compiled code for this vector ISA (sets EINFUSE_CPU_ISA); 'other': "
                          "the one the host is not, so that both ISAs' tiles run on any machine")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):   # (two workers on two cores: one thread each, or their
        os.environ["TVM_NUM_THREADS"] = "1"      # spinning thread pools wait on each other's cores)
        import torch
        torch.set_num_threads(1)
    isa = config.getoption("--isa")
    if isa == "host":
        return
    if isa == "other":
        from einfuse.targets import ISA_VARIABLE, host_cpu
        os.environ.pop(ISA_VARIABLE, None)
        host_cpu.cache_clear()
        isa = "avx2" if host_cpu().vector_bytes == 64 else "avx512"
        host_cpu.cache_clear()
    os.environ["EINFUSE_CPU_ISA"] = isa


def pytest_report_header(config: pytest.Config) -> str:
    return f"einfuse: EINFUSE_CPU_ISA={os.environ.get('EINFUSE_CPU_ISA', '(the host)')}"


def params(values: list, slow: tuple = ()) -> list:
    """``values`` for ``pytest.mark.parametrize``, those in ``slow`` marked ``slow`` (over ~5 s on
    two cores: ``pytest --durations=30`` shows them); the fast tier is ``pytest -m "not slow"``."""
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator with a fresh seed; the seed is attached to the test report."""
    seed = secrets.randbits(32)
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
