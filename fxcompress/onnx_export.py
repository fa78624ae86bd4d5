"""``export_onnx``: a model at any stage (float, pruned, folded, lowered) as an ONNX file.

Float ops go through torch's own exporter (``torch.onnx.export(..., dynamo=True)``); each
lowered module is first swapped, in a copy, for its ONNX twin (:mod:`fxcompress.onnx_forms`):
static int8 becomes the QDQ format onnxruntime runs on its int8 kernels (or, with
``form="integer"``, ConvInteger/MatMulInteger and fxcompress's own rescale:
:mod:`fxcompress.onnx_integer`), dynamic int8
``DynamicQuantizeLinear`` + ``MatMulInteger``, weight-only int4/int8 ``MatMulNBits``,
weight-only embedding tables ``Gather`` + dequantize (:mod:`fxcompress.onnx_embedding`).
Keyword example inputs (a dict: a Hugging Face model's ``input_ids``, ``attention_mask``)
keep their names; a structured output (``last_hidden_state``, ``pooler_output``) names the
file's outputs. With ``calibration_data`` the QDQ form requantizes the convs onnxruntime
would otherwise run in float (:mod:`fxcompress.onnx_calibrate`).
Needs the ``onnx`` extra (``pip install 'fxcompress[onnx]'``).

Guarantees: the caller's model is never changed; every check (a module with no ONNX form,
an opset too old, a file already there) runs before anything is written; the file is
written under a temporary name, passes ``onnx.checker`` (full check, shapes included) and
has exactly the requested opset before it takes its final name, so a failure leaves no file.
The batch dimension (dim 0 of every tensor input) stays symbolic unless
``dynamic_batch=False``; for a graph the ``torch.export`` front end captured, so does every
other dimension that capture left symbolic (a transformer's sequence length). A failure of
torch's exporter names the graph node and operator it could not translate
(:mod:`fxcompress.onnx_errors`).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fxcompress.errors import ExportError

__all__ = ["DEFAULT_OPSET", "FORMS", "MIN_OPSET", "export_onnx", "example_inputs_of"]

#: torch's ONNX exporter writes opset 18 and later (per-channel QDQ itself needs 13).
MIN_OPSET = 18
DEFAULT_OPSET = 18
#: How static int8 is written: ``qdq`` (QuantizeLinear/DequantizeLinear around float ops:
#: onnxruntime fuses them into QLinearConv & co. and requantizes its own way) or
#: ``integer`` (ConvInteger/MatMulInteger and fxcompress's reference rescale as float ops:
#: onnxruntime computes what ``backend="reference"`` computes; see fxcompress.onnx_integer).
FORMS = ("qdq", "integer")


def _model_of(result_or_model: Any) -> nn.Module:
    model = getattr(result_or_model, "model", result_or_model)
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs an fxcompress Result or a torch nn.Module, got "
                          f"{type(result_or_model).__name__}")
    return model


def example_inputs_of(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like the ones the model was compressed with (an artifact's recorded
    inputs, else the graph's shape metadata), with batch size ``batch``; None when unknown."""
    specs = (getattr(model, "meta", {}).get("fxcompress_artifact") or {}).get("inputs")
    if not specs and isinstance(model, torch.fx.GraphModule):
        specs = []
        for node in model.graph.nodes:
            meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
            if node.op == "placeholder":
                if meta is None or not hasattr(meta, "shape"):
                    return None
                specs.append({"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch.")})
    if not specs:
        return None
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        shape, dtype = [batch, *spec["shape"][1:]], getattr(torch, spec["dtype"])
        out.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                   else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword example inputs (a mapping is the model's keyword inputs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def _check_call(twin: nn.Module, args: tuple, kwargs: dict) -> None:
    """The example inputs must fit the model's ``forward`` (a wrong keyword would otherwise
    surface as a failure deep inside torch.export)."""
    try:
        inspect.signature(twin.forward).bind(*args, **kwargs)
    except TypeError as exc:
        given = ", ".join([f"{len(args)} positional"] * bool(args) + [f"keywords {', '.join(kwargs)}"] * bool(kwargs))
        raise ExportError(f"example_inputs ({given or 'none'}) do not fit {type(twin).__name__}.forward"
                          f"{inspect.signature(twin.forward)}: {exc}; nothing was written") from None


def _output_names(twin: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
    """The output's structure as names (``last_hidden_state``, ``pooler_output`` for a Hugging
    Face output; ``0``, ``1`` for a tuple), None for a single tensor (the exporter's default)."""
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        out = twin(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return None
    leaves, _ = pytree.tree_flatten_with_path(out)
    names = [re.sub(r"[\[\]'\"]+", ".", pytree.keystr(path)).strip(".").replace("..", ".") for path, _ in leaves]
    return names if len(set(names)) == len(names) and all(names) else None


def _captured_by_export(model: nn.Module) -> bool:
    from fxcompress.capture import FRONTEND_KEY

    meta = getattr(model, "meta", None)
    return isinstance(meta, dict) and (meta.get(FRONTEND_KEY) or {}).get("frontend") == "export"


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool) -> Any:
    """Which input dimensions stay symbolic in the file.

    Dim 0 of every tensor input (the batch) unless ``dynamic_batch=False``. For a graph the
    ``torch.export`` front end captured (transformers: token ids, masks), every other
    dimension too, as that capture left it (``Dim.AUTO``: symbolic where the graph works
    for any size, such as the sequence length; fixed where a weight fixes it).
    """
    every = _captured_by_export(model)
    if not (dynamic_batch or every):
        return None
    batch = torch.export.Dim.AUTO if every else torch.export.Dim("batch")

    def spec(a: Any) -> Any:
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            return None
        dims = {0: batch} if dynamic_batch else {}
        if every:
            dims.update({d: torch.export.Dim.AUTO for d in range(1, a.dim())})
        return dims or None

    # _split_inputs gives positional or keyword inputs, never both
    return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset {opset!r} is too old: per-channel QuantizeLinear/DequantizeLinear (int8 weights "
                          f"per output channel) need opset 13, and torch's ONNX exporter writes opset "
                          f"{MIN_OPSET} and later; use opset={MIN_OPSET} or newer")


def _twin(model: nn.Module, form: str, calibration_data: Any = None, args: tuple = (), kwargs: dict | None = None
          ) -> nn.Module:
    """A copy of ``model`` with every lowered module replaced by its ONNX form; raises
    :class:`ExportError` naming the first module that has none (and the nearest form that does).
    With ``calibration_data`` (QDQ form) each conv onnxruntime would run in float (fused
    residual, unfoldable post-op, float output) has its raw output requantized, at the range
    measured on that data (:mod:`fxcompress.onnx_calibrate`)."""
    from fxcompress.onnx_forms import NO_FORM, onnx_form
    from fxcompress.onnx_integer import integer_form

    twin = copy.deepcopy(model)
    ranges = {}
    if calibration_data is not None:
        from fxcompress.onnx_calibrate import conv_output_ranges

        ranges = conv_output_ranges(twin, calibration_data, args, kwargs or {})  # on the copy: the hooks never touch the model
    replacements = {}
    for path, module in twin.named_modules():
        if any(path.startswith(done + ".") for done in replacements):
            continue  # inside a module already replaced
        twin_module = (integer_form(module) if form == "integer" else None) or onnx_form(module)
        if isinstance(twin_module, str):
            raise ExportError(f"module {path!r} ({type(module).__name__}) has no ONNX mapping: {twin_module}; "
                              f"nothing was written")
        if path in ranges:
            twin_module = twin_module.requantize_conv_output(*ranges[path])
        if twin_module is not NO_FORM:
            replacements[path] = twin_module
    for path, twin_module in replacements.items():
        twin.set_submodule(path, twin_module)
    if isinstance(twin, torch.fx.GraphModule):
        twin.recompile()
    return twin.eval()


def export_onnx(result_or_model: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
                dynamic_batch: bool = True,
                overwrite: bool = False, form: str = "qdq", calibration_data: Any = None) -> Path:
    """Write ``result_or_model`` (a :class:`fxcompress.Result` or an ``nn.Module``) to ``path`` as ONNX.

    ``example_inputs`` default to the shapes the model was compressed with (recorded in its
    artifact or graph); give them for a model that has none. ``form`` says how static int8
    is written (:data:`FORMS`): ``"qdq"`` for onnxruntime's fused int8 kernels (its own
    requantization: outputs close to ours), ``"integer"`` for fxcompress's arithmetic
    (onnxruntime then computes what ``backend="reference"`` computes, slower).
    ``calibration_data`` (QDQ form; batches as ``run`` takes them) adds one requantization
    after each conv whose output fxcompress does not requantize directly (a fused residual
    add, a post-op such as SiLU, a float32 output), at the range measured on those batches,
    so that onnxruntime runs those convs on its int8 kernels too (``QLinearConv``, and
    ``QLinearAdd`` for the adds) instead of in float: faster, one more rounding than
    fxcompress's model. Returns the path written.
    Raises :class:`~fxcompress.errors.ExportError` (nothing written) for a module with no ONNX
    mapping, an opset below :data:`MIN_OPSET`, an unknown ``form``, an existing ``path`` without ``overwrite``, or a
    failure of torch's exporter or of ``onnx.checker``.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise ExportError(f"export_onnx needs the onnx extra: pip install 'fxcompress[onnx]' ({exc})") from exc
    _check_opset(opset)
    if form not in FORMS:
        raise ExportError(f"unknown form {form!r}: use one of {', '.join(FORMS)}")
    model = _model_of(result_or_model)
    target = Path(path)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if example_inputs is None:
        example_inputs = example_inputs_of(model)
        if example_inputs is None:
            raise ExportError("export_onnx cannot tell the model's input shapes (no artifact record or shape "
                              "metadata): pass example_inputs=")
    args, kwargs = _split_inputs(example_inputs)
    if calibration_data is not None and form != "qdq":
        raise ExportError(f"calibration_data applies to form='qdq' only (the {form!r} form computes each fused "
                          f"residual add exactly and has nothing to calibrate)")
    twin = _twin(model, form, calibration_data, args, kwargs)
    _check_call(twin, args, kwargs)
    dynamic = _dynamic_shapes(model, args, kwargs, dynamic_batch)
    output_names = _output_names(twin, args, kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(twin, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                            dynamic_shapes=dynamic, verbose=False, optimize=True,
                                            output_names=output_names)
            program.save(tmp)
        except Exception as exc:
            from fxcompress.onnx_errors import exporter_failure

            raise ExportError(exporter_failure(exc, type(model).__name__, dynamic is not None)
                              + "; nothing was written") from exc
        proto = onnx.load(tmp, load_external_data=False)
        written = {o.domain or "": o.version for o in proto.opset_import}.get("", None)
        if written != opset:
            raise ExportError(f"torch's exporter wrote opset {written}, not the requested {opset}: "
                              f"use opset={written}")
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"the exported model fails onnx.checker: {exc}") from exc
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
