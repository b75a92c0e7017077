"""The benchmark helpers' arithmetic (the benchmarks themselves are not run by pytest)."""
from __future__ import annotations

import pytest

from benchmarks.costmodel import spearman


@pytest.mark.parametrize("a, b, rho", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([0.1, 0.5, 0.2], [7, 9, 8], 1.0),
    # ties share their mean rank: ranks [0, 1.5, 1.5, 3, 4] and [2, 0.5, 3, 0.5, 4], r = 2.75 / 9.5
    ([1, 2, 2, 5, 9], [3, 1, 4, 1, 5], 2.75 / 9.5),
])
def test_spearman_by_hand(a: list[float], b: list[float], rho: float) -> None:
    assert spearman(a, b) == pytest.approx(rho)
