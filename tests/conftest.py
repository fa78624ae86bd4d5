"""Shared test fixtures.

Conventions every test file relies on:

* **Full checks, always.**  An autouse fixture sets ``FXCOMPRESS_CHECK=full``
  for every test, which makes ``check="full"`` the default of
  :func:`fxcompress.run`: each pipeline a test runs is linted, shape-checked,
  numerically checked for exact passes and stage-verified after every pass.
  A test that is *about* a lower check level passes ``check=`` explicitly.
* **Determinism.**  Every test starts from the same global RNG state
  (``torch``, ``random``); data and weights should still come from seeded
  generators where the test can say so.
* **Norm-relative errors.**  Compare outputs with the ``rel_err`` fixture,
  ‖a − b‖ / ‖a‖, never element-wise.
* **One torch thread per test process.**  ``make test`` runs two xdist
  workers on two cores, and OpenMP's spinning barriers make multi-threaded
  kernels many times slower on a loaded machine (measured: 10x on the zoo).
  A test about threading sets its own thread count.
"""

from __future__ import annotations

import random
from typing import Callable

import pytest
import torch

from fxcompress.api import CHECK_ENV
from fxcompress.manager import relative_error

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def full_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``check="full"`` the default of ``fxcompress.run`` (through ``$FXCOMPRESS_CHECK``)."""
    monkeypatch.setenv(CHECK_ENV, "full")


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed the global RNGs before every test; the seed is also available as a fixture."""
    value = 0
    torch.manual_seed(value)
    random.seed(value)
    return value


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``rel_err(a, b)``: ‖a − b‖ / ‖a‖ in float64 (the manager's own measure)."""
    return relative_error


@pytest.fixture
def onnxruntime_run(tmp_path) -> Callable:
    """``run(path, *inputs) -> (output, ops)``: onnxruntime's CPU provider on an ONNX file (all
    graph optimizations, one thread), its first output as a tensor, and the op types of the
    graph onnxruntime optimized it into (what it fused: ``QLinearConv``, ``Gather``, ...)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from collections import Counter

    def run(path, *inputs: torch.Tensor) -> tuple[torch.Tensor, Counter]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        optimized = tmp_path / f"{path.stem}_optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: t.contiguous().numpy() for i, t in zip(session.get_inputs(), inputs)}
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        return torch.from_numpy(session.run(None, feeds)[0]), ops

    return run
