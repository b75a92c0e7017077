"""Shared test helpers: fresh random inputs (seed reported on failure) and fixture loading."""
from __future__ import annotations

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


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator with a fresh seed; the seed is attached to the test report."""
    seed = secrets.randbits(32)
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
