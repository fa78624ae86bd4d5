"""Quantization: specs, qparams arithmetic, observers, fake quantization, and the graph code
that places and lowers them.

This package's top level exports the tensor and module code (plain int8/uint8 storage,
float32 scales and int32 zero points; nothing from the deprecated torch.ao quantization
package and no quantized dtypes).  Graph code lives in named modules: the x86 fusion
patterns both placement and lowering match (:mod:`.fusion`), where observers go
(:mod:`.placement`, :mod:`.activations`), the layer wrappers of each stage (:mod:`.layers`),
and the lowering's graph matching and emission (:mod:`.lowering`); the lowered modules and
kernels are :mod:`.lowered` and :mod:`.kernels`.  See ``docs/quantization.md``.
"""

from fxcompress.quant.fake_quant import FakeQuantize
from fxcompress.quant.hist_observers import (
    HistogramObserver,
    HistogramRangeObserver,
    MSEObserver,
    PercentileObserver,
)
from fxcompress.quant.observer_base import Observer
from fxcompress.quant.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMSEObserver,
    make_observer,
)
from fxcompress.quant import qparams
from fxcompress.quant.qparams import *  # noqa: F403  (the qparams arithmetic: its __all__ below)
from fxcompress.quant.spec import QuantSpec, default_activation_spec, default_weight_spec

__all__ = [
    "QuantSpec",
    "default_weight_spec",
    "default_activation_spec",
    *qparams.__all__,
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramRangeObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "PerChannelMSEObserver",
    "make_observer",
    "FakeQuantize",
]
