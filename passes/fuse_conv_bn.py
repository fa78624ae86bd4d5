"""``fuse_conv_bn``: fold eval-mode BatchNorm into the conv or linear before it."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.ops import Kind, OpInfo, attr_tensor, describe
from fxcompress.pass_base import Pass, PassContext, PassResult

__all__ = ["FuseConvBn"]


@dataclass(frozen=True)
class FuseConvBn(Pass):
    """Folds each eval-mode BatchNorm into the conv (1d/2d/3d, transposed, grouped) or
    linear whose output it normalises: the BatchNorm node and module disappear, the
    outputs stay equal up to float round-off, and no module is changed in place.

    A BatchNorm is folded when: it is an ``nn.BatchNorm*d`` module in eval mode
    with running statistics, or an ``F.batch_norm`` call with ``training=False``
    whose statistics and affine parameters are constants (``get_attr``); its
    input is a plain ``nn.Conv*d``/``nn.ConvTranspose*d``/``nn.Linear`` module
    call whose output has no other user; it normalises that output's channel
    dim (a linear only when its output is ``(N, C)``); the conv module is used
    by no other node (so fusing cannot change another call); neither module has
    hooks or a parametrized weight; and both nodes are in scope.  The conv is
    replaced by a new module with fused weights (a bias is created if absent).
    A BatchNorm submodule nothing uses any more is deleted; for the functional
    form, the now-unused ``get_attr`` nodes are erased and the tensors are left
    to ``eliminate_dead_nodes``.  Stats: ``fused`` and ``skipped`` (reason ->
    count) for every BatchNorm not folded.
    """

    name = "fuse_conv_bn"
    exact = True
    eval_only = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refs = _module_references(gm)
        skipped: Counter[str] = Counter()
        fused = 0
        emptied_bns: list[str] = []
        for node in list(gm.graph.nodes):
            bn = describe(node, gm)
            if bn.not_plain is not None and bn.not_plain.op == "batch_norm":
                skipped["bn is not a plain BatchNorm module"] += 1
                continue
            if bn.kind is not Kind.NORM or bn.op != "batch_norm":
                continue
            reason = _fuse(gm, bn, ctx, refs)
            if reason is not None:
                skipped[reason] += 1
                continue
            fused += 1
            if bn.module is not None:
                refs[id(bn.module)] -= 1
                if refs[id(bn.module)] == 0:
                    emptied_bns.append(str(node.target))
            _erase_with_dead_constants(gm, node)
        for target in emptied_bns:
            gm.delete_submodule(target)
        return PassResult(gm, fused > 0, {"fused": fused, "skipped": dict(skipped)})


def _module_references(gm: fx.GraphModule) -> Counter[int]:
    """How many nodes use each module object.

    A ``call_module`` node uses its module and everything inside it (a leaf
    module runs its children); a ``get_attr`` node uses the module owning the
    attribute.  A conv referenced more than once cannot be replaced by a fused
    copy without changing what the other reference computes.
    """
    refs: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for m in gm.get_submodule(str(node.target)).modules():
                refs[id(m)] += 1
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            refs[id(gm.get_submodule(owner))] += 1
    return refs


def _bn_statistics(gm: fx.GraphModule, bn: OpInfo) -> tuple[tuple, str | None]:
    """``(mean, var, gamma, beta, eps)`` of an eval-mode BatchNorm, or a reason it has none."""
    m = bn.module
    if m is not None:  # a plain BatchNorm module (describe says so)
        if m.training:
            return (), "bn in training mode"
        if m.running_mean is None or m.running_var is None:
            return (), "bn uses batch statistics"
        return (m.running_mean, m.running_var, m.weight, m.bias, m.eps), None
    if bn.params.get("training", False) is not False:
        return (), "bn in training mode"
    mean, var = (attr_tensor(gm, bn.params.get(k)) for k in ("running_mean", "running_var"))
    affine = [bn.params.get(k) for k in ("weight", "bias")]
    gamma, beta = (None if a is None else attr_tensor(gm, a) for a in affine)
    eps = bn.params.get("eps", 1e-5)
    if mean is None or var is None or any(a is not None and t is None for a, t in zip(affine, (gamma, beta))) \
            or not isinstance(eps, (int, float)):
        return (), "bn statistics are not constant"
    return (mean, var, gamma, beta, eps), None


def _fuse(gm: fx.GraphModule, bn: OpInfo, ctx: PassContext, refs: Counter[int]) -> str | None:
    """Fold one BatchNorm into its producer; the reason it cannot be, or None when done."""
    src = bn.inputs[0] if bn.inputs else None
    if not isinstance(src, fx.Node):
        return "bn input is not a conv or linear"
    prod = describe(src, gm)
    if prod.family not in (Kind.CONV, Kind.LINEAR):
        return "bn input is not a conv or linear"
    if prod.module is None:
        return "conv or linear is not a module call"
    if not ctx.in_scope(src) or not ctx.in_scope(bn.node):
        return "out of scope"
    if len(src.users) != 1:
        return "conv output has other users"
    if refs[id(prod.module)] != 1:
        return "conv module is shared"
    if prod.not_plain is not None:
        return "conv is not a plain torch module"
    stats, reason = _bn_statistics(gm, bn)
    if reason is not None:
        return reason
    shape = src.meta.get("tensor_meta")
    rank = len(shape.shape) if hasattr(shape, "shape") else None
    out_dim = prod.weight_out_dim
    channels = prod.weight.shape[out_dim] * (prod.groups if prod.transposed else 1)
    if rank is None or rank < 2 or prod.channel_dim % rank != bn.channel_dim % rank:
        return "bn does not normalise the channel dim"
    if stats[0].numel() != channels:
        return "bn does not normalise the channel dim"
    _replace_with_fused(gm, src, prod, *stats)
    refs.pop(id(prod.module))
    refs[id(gm.get_submodule(str(src.target)))] = 1
    if "tensor_meta" in bn.node.meta:
        src.meta["tensor_meta"] = bn.node.meta["tensor_meta"]
    bn.node.replace_all_uses_with(src)
    return None


def _replace_with_fused(gm: fx.GraphModule, node: fx.Node, prod: OpInfo, mean: torch.Tensor,
                        var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                        eps: float) -> None:
    """Install, at the conv's path, a copy of the conv with BN folded into weight and bias.

    y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta, so per output
    channel c: W'[c] = W[c] * s[c] and b' = (b - mean) * s + beta with
    s = gamma / sqrt(var + eps).  Computed in float64, stored in the conv's dtype.
    """
    conv = prod.module
    w = conv.weight.detach().double()
    scale = var.detach().double().add(eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - mean.detach().double()) * scale
    if beta is not None:
        new_bias = new_bias + beta.detach().double()
    if prod.transposed:
        # Transposed weights are (in, out/groups, *k): output channel g*(out/g)+j lives at
        # weight[g-th block of inputs, j], so scale group-blocked.
        g = prod.groups
        blocked = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        blocked = blocked * scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = blocked.reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    weight = nn.Parameter(new_w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    new_b = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    # The memo hands deepcopy our new tensors for the old ones: the copy gets the fused
    # weights without ever duplicating the originals, and the original stays untouched.
    memo: dict[int, Any] = {id(conv.weight): weight}
    if conv.bias is not None:
        memo[id(conv.bias)] = new_b
    fused = copy.deepcopy(conv, memo)
    if conv.bias is None:
        fused.bias = new_b
    owner, _, attr = str(node.target).rpartition(".")
    setattr(gm.get_submodule(owner), attr, fused)


def _erase_with_dead_constants(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a bypassed BN node and the ``get_attr`` inputs only it used (functional form)."""
    inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(node)
    for a in inputs:
        if not a.users:
            gm.graph.erase_node(a)
