"""attention.backend.longest_first: the decode rows' launch order, longest context first
(ties in row order), only from LONGEST_FIRST_MIN_ROWS rows; off by default."""

from __future__ import annotations

import numpy as np
import pytest

from rtpllm.attention import backend


def test_off_by_default() -> None:
    assert backend.LONGEST_FIRST_MIN_ROWS is None
    assert backend.longest_first(np.arange(300)) is None


def test_longest_first_with_ties_in_row_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "LONGEST_FIRST_MIN_ROWS", 4)
    assert backend.longest_first(np.array([5, 9, 1])) is None  # fewer rows than the threshold
    assert not backend.orders_rows(3) and backend.orders_rows(4)
    order = backend.longest_first(np.array([5, 9, 1, 9, 5], dtype=np.int32))
    assert order is not None and order.dtype == np.int32
    assert order.tolist() == [1, 3, 0, 4, 2]
