"""Every fxcompress module class that can sit in a graph has an artifact codec.

Imports every module of the package (and of the built-in passes), collects
every ``nn.Module`` subclass defined there, and fails for one the artifact
registry cannot store, so a new module class cannot make a graph that
``fxcompress.run`` returns unsavable without this test saying so.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

import fxcompress
import fxcompress.passes
from fxcompress import artifact

# Classes that never sit in a graph, leaf or nested, and why.
NEVER_IN_A_GRAPH = {
    # Base classes: only their subclasses are ever instantiated (each one is checked).
    "fxcompress.quant.lowered_base.LoweredModule": "base of the lowered modules; its config() raises",
    "fxcompress.quant.layers._FloatWeightLayer": "base of ObservedLayer and FakeQuantLayer",
    # Example models: fxcompress.trace traces through them, their modules are the graph's leaves.
    "fxcompress.examples.digits.DigitsCNN": "an example model",
    "fxcompress.examples.digits.DigitsResNet": "an example model",
    "fxcompress.examples.digits.BasicBlock": "a block of an example model",
    "fxcompress.examples.bert.BertStyleEncoder": "an example model",
    "fxcompress.examples.bert._SelfAttention": "a block of an example model",
    "fxcompress.examples.bert._Layer": "a block of an example model",
    # ONNX twins: built inside export_onnx on a private copy, handed to torch's exporter, dropped.
    **{f"fxcompress.onnx_forms.{name}": "an ONNX export twin, never in a returned graph" for name in (
        "_QParams", "OnnxQuantize", "OnnxQuantizeProduct", "OnnxDequantize", "OnnxQuantConv", "OnnxQuantLinear",
        "OnnxMaxPool", "OnnxAdaptiveAvgPool", "OnnxQuantAdd", "OnnxQuantTable", "OnnxQuantMul", "OnnxDynamicLinear",
        "OnnxWeightOnlyLinear", "OnnxWeightOnlyConv", "OnnxFoldedLayer")},
    **{f"fxcompress.onnx_integer.{name}": "an ONNX export twin (integer form), never in a returned graph"
       for name in ("_Requant", "_Rescale", "IntegerQuantConv", "IntegerQuantLinear", "IntegerQuantize",
                    "IntegerQuantizeProduct", "IntegerAdaptiveAvgPool", "IntegerQuantAdd", "IntegerQuantMul")},
    "fxcompress.onnx_embedding.OnnxWeightOnlyEmbedding": "an ONNX export twin, never in a returned graph",
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fxcompress_module_classes() -> dict[str, type]:
    for package in (fxcompress, fxcompress.passes):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    found, todo = {}, list(nn.Module.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == "fxcompress":
            found[_qualname(cls)] = cls
    return found


def test_every_fxcompress_module_class_is_registered_with_the_artifact_registry() -> None:
    classes = _fxcompress_module_classes()
    assert "fxcompress.quant.layers.FoldedLayer" in classes and len(classes) > 25  # the walk found them
    supported = set(artifact.supported_modules())
    missing = sorted(
        name for name, cls in classes.items()
        if name not in NEVER_IN_A_GRAPH and not inspect.isabstract(cls)
        and (getattr(cls, "_fxc_name", None) or name) not in supported
    )
    assert not missing, f"module classes without an artifact codec: {missing}"
    stale = sorted(set(NEVER_IN_A_GRAPH) - set(classes))
    assert not stale, f"allow-list entries for classes that no longer exist: {stale}"
    abstract = sorted(name for name, cls in classes.items() if inspect.isabstract(cls))
    assert abstract == ["fxcompress.quant.hist_observers.HistogramRangeObserver",
                        "fxcompress.quant.observer_base.Observer"]
