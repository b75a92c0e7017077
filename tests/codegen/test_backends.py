"""The backends: one per target kind, found by kind, each with a codegen pipeline that parses."""
from __future__ import annotations

import pytest

import einfuse
from einfuse.codegen.backends import BACKENDS, backend_for
from einfuse.errors import EinfuseError
from einfuse.passes import pipeline
from einfuse.targets import Target

from ..conftest import load


@pytest.mark.parametrize("name", ["cpu", "cuda:sm_80", "accel:fusemax"])
def test_each_target_kind_has_its_backend_and_pipeline(name: str) -> None:
    target = Target.parse(name)
    backend = backend_for(name)
    assert backend.kind == target.kind and backend.target == target and isinstance(backend, BACKENDS[target.kind])
    passes = [p.name for p in pipeline(backend.pipeline)]
    assert passes[-1] == "group-kernels" and ("pack-weights" in passes) == (target.kind == "cpu")


def test_what_a_backend_cannot_do_fails_before_capture() -> None:
    never = object()   # (not a model: capture would fail on it)
    with pytest.raises(EinfuseError, match="not a device to run on"):
        einfuse.compile(never, (), target="accel:fusemax")
    with pytest.raises(EinfuseError, match="is not an accelerator"):
        einfuse.simulate(load("mlp_block"), (), target="cpu")
