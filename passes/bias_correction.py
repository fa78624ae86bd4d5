"""``bias_correction``: empirical bias correction of quantized layers on calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.shapes import bind_placeholders
from fxcompress.errors import ConfigError
from fxcompress.ops import describe_module
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.activations import ActivationObserver
from fxcompress.quant.layers import ObservedLayer, weighted_forward
from fxcompress.quant.qparams import fake_quantize
from fxcompress.budget.measure import input_batches

__all__ = ["BiasCorrection"]


@dataclass(frozen=True)
class BiasCorrection(Pass):
    """Adds to the bias of every observed conv and linear the mean, per output channel, of
    what quantization shifts its output by on the calibration data, so the quantized
    model's layer outputs have the float model's per-channel means (empirical bias
    correction: Nagel et al. 2019, Finkelstein et al. 2019).

    Runs after ``calibrate`` (it needs the weight and activation qparams) and before
    ``fold_fake_quant``.  One pass over the first ``num_batches`` calibration batches
    (concatenated) runs the float graph and its quantized simulation side by side, node by
    node: at each layer in graph order the float output ``y`` (float inputs, float weight)
    and the quantized output ``y_q`` (inputs as quantization left them, fake-quantized
    weight, activation quantization points applied) give the correction
    ``mean(y - y_q)`` per channel, which is added to the bias and to ``y_q`` before the
    simulation goes on, so each layer is corrected for everything upstream, already
    corrected.  The float graph's outputs change by the corrections (they are small: the
    quantization error's mean); the quantized model's error mean is removed.  Layers
    without a bias get one.  Stats: ``layers`` (corrected), ``samples``,
    ``mean_abs_correction`` (relative to the mean |bias|, over layers).
    """

    name = "bias_correction"
    requires = ("calibrate",)
    eval_only = True

    num_batches: int | None = None

    def __post_init__(self) -> None:
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or self.num_batches < 1):
            raise ConfigError(f"num_batches must be a positive int or None, "
                              f"got {self.num_batches!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(str(n.target)), ObservedLayer) and ctx.in_scope(n)}
        if not layers:
            return PassResult(gm, False, {"layers": 0, "samples": 0})
        batches = input_batches(ctx.calibration_data, *ctx.example_inputs(), self.num_batches)
        args, kwargs = _concatenated(batches)
        corrections = _lockstep(gm, layers, args, kwargs)
        relative = []
        with torch.no_grad():
            for path, delta in corrections.items():
                module = gm.get_submodule(path).module
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros_like(delta, dtype=module.weight.dtype))
                scale = float(module.bias.abs().mean()) or 1.0
                relative.append(float(delta.abs().mean()) / scale)
                module.bias.add_(delta.to(module.bias.dtype))
        samples = sum(int(a[0].shape[0]) if a and isinstance(a[0], torch.Tensor) else 0 for a, _ in batches)
        stats = {"layers": len(corrections), "samples": samples,
                 "mean_abs_correction": round(sum(relative) / len(relative), 6) if relative else 0.0}
        return PassResult(gm, bool(corrections), stats)


def _concatenated(batches: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """One batch holding every batch (tensors joined along dim 0; other values from the first)."""
    def join(values: list[Any]) -> Any:
        return torch.cat(values) if isinstance(values[0], torch.Tensor) and values[0].dim() else values[0]

    args = tuple(join([a[i] for a, _ in batches]) for i in range(len(batches[0][0])))
    kwargs = {k: join([kw[k] for _, kw in batches]) for k in batches[0][1]}
    return args, kwargs


def _lockstep(gm: fx.GraphModule, layers: set[str], args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Run the float graph and its quantized simulation node by node; the corrections per layer."""
    interpreter = fx.Interpreter(gm)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    values = iter(bind_placeholders(gm, args, kwargs))
    env_f: dict[fx.Node, Any] = {}
    env_q: dict[fx.Node, Any] = {}
    corrections: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            if node.op == "placeholder":
                env_f[node] = env_q[node] = next(values)
                continue
            f_args, f_kwargs = fx.node.map_arg((node.args, node.kwargs), env_f.__getitem__)
            q_args, q_kwargs = fx.node.map_arg((node.args, node.kwargs), env_q.__getitem__)
            module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, ActivationObserver):
                env_f[node] = f_args[0]
                scale, zero_point = module.qparams()
                env_q[node] = fake_quantize(q_args[0], scale, zero_point, module.spec)
            elif isinstance(module, ObservedLayer) and str(node.target) in layers:
                env_f[node] = module(*f_args)
                env_q[node], corrections[str(node.target)] = _corrected(module, q_args[0], env_f[node])
            else:
                run = getattr(interpreter, node.op)
                env_f[node] = run(node.target, f_args, f_kwargs)
                env_q[node] = run(node.target, q_args, q_kwargs)
            for used in node.all_input_nodes:
                if last_use.get(used) is node:
                    env_f.pop(used, None)
                    env_q.pop(used, None)
    return corrections


def _corrected(layer: ObservedLayer, x_q: torch.Tensor, y_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's quantized output with its correction applied, and the correction per channel."""
    scale, zero_point = layer.qparams()
    weight = fake_quantize(layer.module.weight, scale, zero_point, layer.spec)
    y_q = weighted_forward(layer.module, layer.op, x_q, weight, layer.bias)
    channel = describe_module(layer.module).channel_dim
    dims = [d for d in range(y_q.dim()) if d != channel % y_q.dim()]
    delta = (y_float.double() - y_q.double()).mean(dim=dims)
    shape = [1] * y_q.dim()
    shape[channel] = -1
    return y_q + delta.to(y_q.dtype).reshape(shape), delta.float()
