"""ops.describe: every form of every op family, the same answer for module, function
and method forms, UNKNOWN for what it does not know, and coverage of the torchvision zoo."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import fxcompress
from fxcompress import ops
from fxcompress.ops import Kind, OpInfo, describe, register_function, register_method, register_module, tensor_shape

torch.set_num_threads(1)


class Fn(nn.Module):
    """Wraps a function of the inputs (and of this module's parameters) as a model."""

    def __init__(self, fn, **params: nn.Module | torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            else:
                self.register_parameter(name, nn.Parameter(value))

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    def forward(self, x, y):
        return self.fn(self, x, y)


class Fn3(Fn):
    def forward(self, x, y, z):
        return self.fn(self, x, y, z)


def infos(model: nn.Module, *inputs: torch.Tensor) -> list[OpInfo]:
    """Descriptions of the call nodes of the traced model, in graph order."""
    # Traced as symbolic tracing records it: capture would raise functional layers to modules
    # (fxcompress.raising), and the functional forms are what some of these tests describe.
    gm = fxcompress.trace(fx.symbolic_trace(model), inputs)
    return [describe(n, gm) for n in gm.graph.nodes if n.op.startswith("call_")]


def only(model: nn.Module, *inputs: torch.Tensor) -> OpInfo:
    (info,) = infos(model, *inputs)
    return info


X4 = torch.randn(2, 4, 6, 6)


# -- conv ------------------------------------------------------------------------
def test_conv_module_and_function_forms_agree():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    m = only(Fn(lambda s, x: s.conv(x), conv=conv), X4)
    f = only(Fn(lambda s, x: F.conv2d(x, s.w, s.b, 2, 1, 1, 2), w=conv.weight.detach().clone(),
                b=conv.bias.detach().clone()), X4)
    for info in (m, f):
        assert (info.kind, info.op, info.groups, info.transposed) == (Kind.CONV, "conv2d", 2, False)
        assert (info.weight_out_dim, info.weight_in_dim, info.channel_dim) == (0, 1, 1)
        assert info.weight.shape == (8, 2, 3, 3) and info.bias.shape == (8,)
        assert info.params["stride"] in (2, (2, 2)) and info.params["spatial_dims"] == 2
    assert m.module is conv and m.weight is conv.weight and m.weight_node is None
    assert f.module is None and f.weight_node.op == "get_attr" and f.bias_node.target == "b"
    assert f.inputs[0].op == "placeholder"


@pytest.mark.parametrize(
    "make, x, op, transposed, groups",
    [
        (lambda: nn.Conv1d(4, 6, 3), torch.randn(2, 4, 9), "conv1d", False, 1),
        (lambda: nn.Conv3d(4, 4, 1, groups=4), torch.randn(1, 4, 3, 3, 3), "conv3d", False, 4),
        (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), X4, "conv_transpose2d", True, 2),
        (lambda: nn.ConvTranspose1d(4, 2, 3), torch.randn(2, 4, 9), "conv_transpose1d", True, 1),
    ],
)
def test_conv_variants(make, x, op, transposed, groups):
    info = only(Fn(lambda s, x: s.conv(x), conv=make()), x)
    assert (info.kind, info.op, info.transposed, info.groups) == (Kind.CONV, op, transposed, groups)
    assert info.weight_out_dim == (1 if transposed else 0) and info.weight_in_dim == (0 if transposed else 1)


def test_functional_transposed_conv():
    w = torch.randn(4, 3, 2, 2)  # (in, out/groups, k, k)
    info = only(Fn(lambda s, x: F.conv_transpose2d(x, s.w, stride=2), w=w), X4)
    assert (info.op, info.transposed, info.weight_out_dim, info.params["stride"]) == ("conv_transpose2d", True, 1, 2)
    assert info.bias is None and info.bias_node is None


# -- linear, norms, embedding ---------------------------------------------------------
def test_linear_forms():
    lin = nn.Linear(6, 3)
    for info in (only(Fn(lambda s, x: s.lin(x), lin=lin), torch.randn(2, 6)),
                 only(Fn(lambda s, x: F.linear(x, s.w, s.b), w=torch.randn(3, 6), b=torch.randn(3)),
                      torch.randn(2, 6))):
        assert (info.kind, info.op, info.channel_dim, info.weight_out_dim) == (Kind.LINEAR, "linear", -1, 0)
        assert info.weight.shape == (3, 6) and info.bias.shape == (3,)


@pytest.mark.parametrize(
    "model, op, channel_dim",
    [
        (Fn(lambda s, x: s.n(x), n=nn.BatchNorm2d(4)), "batch_norm", 1),
        (Fn(lambda s, x: s.n(x), n=nn.GroupNorm(2, 4)), "group_norm", 1),
        (Fn(lambda s, x: s.n(x), n=nn.InstanceNorm2d(4, affine=True)), "instance_norm", 1),
        (Fn(lambda s, x: s.n(x), n=nn.LayerNorm(6)), "layer_norm", -1),
        (Fn(lambda s, x: F.batch_norm(x, s.m, s.v, s.w, s.b), m=torch.zeros(4), v=torch.ones(4),
            w=torch.ones(4), b=torch.zeros(4)), "batch_norm", 1),
        (Fn(lambda s, x: F.group_norm(x, 2, s.w, s.b), w=torch.ones(4), b=torch.zeros(4)), "group_norm", 1),
        (Fn(lambda s, x: F.layer_norm(x, (6,), s.w, s.b), w=torch.ones(6), b=torch.zeros(6)), "layer_norm", -1),
    ],
)
def test_norms(model, op, channel_dim):
    info = only(model.eval(), X4)
    assert (info.kind, info.op, info.channel_dim) == (Kind.NORM, op, channel_dim)
    assert info.weight is not None and info.bias is not None


def test_norm_parameters():
    assert only(Fn(lambda s, x: s.n(x), n=nn.GroupNorm(2, 4)), X4).params["num_groups"] == 2
    info = only(Fn(lambda s, x: F.batch_norm(x, s.m, s.v, training=False, eps=1e-3), m=torch.zeros(4),
                   v=torch.ones(4)), X4)
    assert info.params["training"] is False and info.params["eps"] == 1e-3
    assert info.params["running_mean"].op == "get_attr"


def test_embedding_forms():
    idx = torch.tensor([[0, 2, 1]])
    emb = nn.Embedding(5, 3)
    for info in (only(Fn(lambda s, i: s.emb(i), emb=emb), idx),
                 only(Fn(lambda s, i: F.embedding(i, s.w), w=torch.randn(5, 3)), idx)):
        assert (info.kind, info.op, info.channel_dim) == (Kind.EMBEDDING, "embedding", -1)
        assert info.weight.shape == (5, 3)


# -- elementwise and activations --------------------------------------------------
@pytest.mark.parametrize(
    "fn, op",
    [
        (lambda s, x, y: x + y, "add"),
        (lambda s, x, y: torch.add(x, y), "add"),
        (lambda s, x, y: x.add(y), "add"),
        (lambda s, x, y: x.add_(y), "add"),
        (lambda s, x, y: x - y, "sub"),
        (lambda s, x, y: x.sub(y), "sub"),
        (lambda s, x, y: x * y, "mul"),
        (lambda s, x, y: torch.mul(x, y), "mul"),
        (lambda s, x, y: x.mul(y), "mul"),
        (lambda s, x, y: x / y, "div"),
        (lambda s, x, y: x.div(y), "div"),
        (lambda s, x, y: torch.maximum(x, y), "maximum"),
        (lambda s, x, y: x == y, "eq"),
    ],
)
def test_elementwise_forms(fn, op):
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    info = only(Fn2(fn), x, y)
    assert (info.kind, info.op) == (Kind.ELEMENTWISE, op)
    assert [a.name for a in info.inputs] == ["x", "y"]


def test_elementwise_constant_operand_and_alpha():
    info = only(Fn(lambda s, x: torch.add(x, 2.0, alpha=3)), torch.randn(2))
    assert info.inputs[1] == 2.0 and info.params["alpha"] == 3


@pytest.mark.parametrize(
    "fn, op, params",
    [
        (lambda s, x: s.act(x), "relu", {"inplace": False}),
        (lambda s, x: F.relu(x), "relu", {}),
        (lambda s, x: torch.relu(x), "relu", {}),
        (lambda s, x: x.relu(), "relu", {}),
        (lambda s, x: F.leaky_relu(x, 0.2), "leaky_relu", {"negative_slope": 0.2}),
        (lambda s, x: s.leaky(x), "leaky_relu", {"negative_slope": 0.3}),
        (lambda s, x: F.gelu(x, approximate="tanh"), "gelu", {"approximate": "tanh"}),
        (lambda s, x: s.hswish(x), "hardswish", {}),
        (lambda s, x: x.sigmoid(), "sigmoid", {}),
        (lambda s, x: F.hardtanh(x, -2.0, 2.0), "hardtanh", {"min_val": -2.0, "max_val": 2.0}),
        (lambda s, x: x.clamp(0, 6), "clamp", {"min": 0, "max": 6}),
    ],
)
def test_activation_forms(fn, op, params):
    model = Fn(fn, act=nn.ReLU(), leaky=nn.LeakyReLU(0.3), hswish=nn.Hardswish())
    info = only(model, torch.randn(2, 3))
    assert (info.kind, info.op) == (Kind.ACTIVATION, op)
    assert params.items() <= info.params.items()


def test_softmax_forms():
    x = torch.randn(2, 3)
    for fn, op in ((lambda s, x: s.sm(x), "softmax"), (lambda s, x: x.softmax(-1), "softmax"),
                   (lambda s, x: F.log_softmax(x, dim=1), "log_softmax")):
        info = only(Fn(fn, sm=nn.Softmax(dim=-1)), x)
        assert (info.kind, info.op) == (Kind.SOFTMAX, op) and info.params["dim"] in (-1, 1)


# -- pooling -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, op, key, value",
    [
        (lambda s, x: s.mp(x), "max_pool2d", "kernel_size", 2),
        (lambda s, x: F.max_pool2d(x, 2), "max_pool2d", "kernel_size", 2),
        (lambda s, x: s.ap(x), "adaptive_avg_pool2d", "output_size", 1),
        (lambda s, x: F.adaptive_avg_pool2d(x, 1), "adaptive_avg_pool2d", "output_size", 1),
        (lambda s, x: F.avg_pool2d(x, 3, 1), "avg_pool2d", "stride", 1),
        (lambda s, x: s.up(x), "interpolate", "scale_factor", 2.0),
        (lambda s, x: F.interpolate(x, scale_factor=2.0), "interpolate", "scale_factor", 2.0),
    ],
)
def test_pool_forms_share_canonical_names(fn, op, key, value):
    model = Fn(fn, mp=nn.MaxPool2d(2), ap=nn.AdaptiveAvgPool2d(1), up=nn.Upsample(scale_factor=2.0))
    info = only(model, X4)
    assert (info.kind, info.op, info.channel_dim, info.params[key]) == (Kind.POOL, op, 1, value)


# -- shapes: reshape, permute, concat, split --------------------------------------------
@pytest.mark.parametrize(
    "fn, kind, op, key, value",
    [
        (lambda s, x: x.view(2, -1), Kind.RESHAPE, "view", "shape", (2, -1)),
        (lambda s, x: x.view((2, -1)), Kind.RESHAPE, "view", "shape", (2, -1)),
        (lambda s, x: x.reshape(2, 4, 36), Kind.RESHAPE, "reshape", "shape", (2, 4, 36)),
        (lambda s, x: torch.reshape(x, (2, -1)), Kind.RESHAPE, "reshape", "shape", (2, -1)),
        (lambda s, x: x.flatten(1), Kind.RESHAPE, "flatten", "start_dim", 1),
        (lambda s, x: torch.flatten(x, 2), Kind.RESHAPE, "flatten", "start_dim", 2),
        (lambda s, x: s.flat(x), Kind.RESHAPE, "flatten", "start_dim", 1),
        (lambda s, x: x.permute(0, 2, 3, 1), Kind.PERMUTE, "permute", "dims", (0, 2, 3, 1)),
        (lambda s, x: torch.permute(x, (0, 2, 3, 1)), Kind.PERMUTE, "permute", "dims", (0, 2, 3, 1)),
        (lambda s, x: x.transpose(1, 2), Kind.PERMUTE, "transpose", "dim1", 2),
        (lambda s, x: torch.transpose(x, 1, 3), Kind.PERMUTE, "transpose", "dim1", 3),
        (lambda s, x: torch.swapaxes(x, 1, 2), Kind.PERMUTE, "transpose", "dim0", 1),
        (lambda s, x: torch.chunk(x, 2, 1), Kind.SPLIT, "chunk", "chunks", 2),
        (lambda s, x: x.chunk(2, dim=1), Kind.SPLIT, "chunk", "dim", 1),
        (lambda s, x: torch.split(x, [1, 3], 1), Kind.SPLIT, "split", "split_size_or_sections", [1, 3]),
        (lambda s, x: x.split(2, dim=1), Kind.SPLIT, "split", "dim", 1),
        (lambda s, x: x.mean((2, 3)), Kind.REDUCTION, "mean", "dim", (2, 3)),
    ],
)
def test_shape_ops(fn, kind, op, key, value):
    info = infos(Fn(fn, flat=nn.Flatten()), X4)[0]
    assert (info.kind, info.op, info.params[key]) == (kind, op, value)
    assert info.inputs[0].op == "placeholder"


def test_view_with_a_traced_size_packs_the_shape():
    info = infos(Fn(lambda s, x: x.view(x.size(0), -1)), X4)
    size, view = info
    assert (size.kind, size.op, size.params["dim"]) == (Kind.SHAPE, "size", 0)
    assert view.params["shape"] == (size.node, -1)


def test_concat_inputs_are_the_joined_tensors():
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    cat = only(Fn2(lambda s, x, y: torch.cat([x, y], dim=1)), x, y)
    assert (cat.kind, cat.op, cat.params["dim"]) == (Kind.CONCAT, "cat", 1)
    assert [a.op for a in cat.inputs] == ["placeholder", "placeholder"]
    stack = only(Fn2(lambda s, x, y: torch.stack((x, y))), x, x)
    assert (stack.op, stack.params["dim"], len(stack.inputs)) == ("stack", 0, 2)


def test_getitem_and_shape_queries():
    first, item = infos(Fn(lambda s, x: x.chunk(2, 1)[0]), X4)
    assert (item.kind, item.params["index"], item.inputs[0]) == (Kind.GETITEM, 0, first.node)
    shape = infos(Fn(lambda s, x: x.view(x.shape[0], -1)), X4)[0]
    assert (shape.kind, shape.op, shape.params["name"]) == (Kind.SHAPE, "getattr", "shape")


# -- matmul, attention -------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, op",
    [
        (lambda s, a, b: a @ b, "matmul"),
        (lambda s, a, b: torch.matmul(a, b), "matmul"),
        (lambda s, a, b: a.matmul(b), "matmul"),
        (lambda s, a, b: torch.bmm(a, b), "bmm"),
        (lambda s, a, b: a.bmm(b), "bmm"),
    ],
)
def test_matmul_forms(fn, op):
    info = only(Fn2(fn), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert (info.kind, info.op, len(info.inputs)) == (Kind.MATMUL, op, 2)


def test_addmm_and_einsum_inputs():
    addmm = only(Fn3(lambda s, b, x, w: torch.addmm(b, x, w)), torch.randn(5), torch.randn(3, 4), torch.randn(4, 5))
    assert (addmm.kind, addmm.op, len(addmm.inputs)) == (Kind.MATMUL, "addmm", 3)
    ein = only(Fn2(lambda s, a, b: torch.einsum("bij,bjk->bik", a, b)), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert (ein.op, ein.params["equation"], len(ein.inputs)) == ("einsum", "bij,bjk->bik", 2)


def test_multihead_attention_module():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    calls = infos(Fn(lambda s, x: s.mha(x, x, x, need_weights=False)[0], mha=mha).eval(), x)
    info = calls[0]
    assert (info.kind, info.op, info.params["num_heads"], info.channel_dim) == (
        Kind.ATTENTION, "multihead_attention", 2, -1)
    assert len(info.inputs) == 3 and info.params["need_weights"] is False
    assert info.weight is mha.in_proj_weight
    assert calls[1].kind is Kind.GETITEM


def test_scaled_dot_product_attention():
    q = torch.randn(2, 2, 5, 4)
    info = only(Fn3(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), q, q, q)
    assert (info.kind, info.op, len(info.inputs), info.params["is_causal"]) == (
        Kind.ATTENTION, "scaled_dot_product_attention", 3, True)


# -- no-ops, asserts, unknowns ------------------------------------------------------------
def test_identity_ops_say_when_they_are_no_ops():
    x = torch.randn(2, 3)
    drop_eval = only(Fn(lambda s, x: s.drop(x), drop=nn.Dropout(0.1)).eval(), x)
    assert (drop_eval.kind, drop_eval.op, drop_eval.params["training"]) == (Kind.IDENTITY, "dropout", False)
    assert only(Fn(lambda s, x: F.dropout(x, 0.1)), x).params["training"] is True
    assert only(Fn(lambda s, x: F.dropout(x, 0.1, training=False)), x).params["training"] is False
    assert only(Fn(lambda s, x: x.contiguous()), x).kind is Kind.IDENTITY
    assert only(Fn(lambda s, x: s.ident(x), ident=nn.Identity()), x).op == "identity"


class Flagged(nn.Module):
    def forward(self, x, scale):
        return x * 2 if scale else x


def test_specialised_argument_asserts_are_asserts():
    gm = fxcompress.trace(Flagged(), torch.randn(2), concrete_args={"scale": True})
    kinds = [describe(n, gm).kind for n in gm.graph.nodes]
    assert kinds == [Kind.PLACEHOLDER, Kind.PLACEHOLDER, Kind.ELEMENTWISE, Kind.ASSERT, Kind.ELEMENTWISE,
                     Kind.OUTPUT]


def mystery(x):
    return x.flip(-1)


class Opaque(nn.Module):
    def forward(self, x):
        return x.roll(1, 0)


def test_unknown_function_method_and_module():
    x = torch.randn(2, 3)
    model = Fn(lambda s, x: s.opaque(mystery(x)).cummax(0)[0], opaque=Opaque())
    gm = fxcompress.trace(model, x, autowrap=(mystery,), leaf_modules=[Opaque])
    unknown = [(i.op, i.node.op) for i in (describe(n, gm) for n in gm.graph.nodes) if i.kind is Kind.UNKNOWN]
    assert unknown == [("mystery", "call_function"), ("Opaque", "call_module"), ("cummax", "call_method")]


def test_tables_can_be_extended(monkeypatch):
    for table in ("_FUNCTIONS", "_METHODS", "_MODULE_RULES"):  # registrations end with the test
        monkeypatch.setattr(ops.tables, table, dict(getattr(ops.tables, table)))
    x = torch.randn(2, 3)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    model = Fn(lambda s, x: s.scale(mystery(x)).cumsum(0), scale=Scale())
    gm = fxcompress.trace(model, x, autowrap=(mystery,), leaf_modules=[Scale])
    register_function(mystery, Kind.PERMUTE, "flip", ())
    register_method("cumsum", Kind.REDUCTION, "cumsum", ("dim",))
    register_module(Scale, lambda m: (Kind.ACTIVATION, "channel_scale", {"channel_dim": -1}))
    found = [describe(n, gm) for n in gm.graph.nodes if n.op.startswith("call_")]
    assert [(i.kind, i.op) for i in found] == [(Kind.PERMUTE, "flip"), (Kind.ACTIVATION, "channel_scale"),
                                              (Kind.REDUCTION, "cumsum")]
    assert found[1].weight is gm.get_submodule("scale").weight and found[2].params["dim"] == 0


# -- effects --------------------------------------------------------------------------------
def test_effects_in_place_writes_and_aliases():
    def fn(s, x):
        y = x * 2
        y.add_(1)
        z = F.relu(y, inplace=True)
        return s.act(z.view(-1)).clone()

    found = infos(Fn(fn, act=nn.ReLU(inplace=True)), X4)
    by_op = {(i.op, i.node.op): i.effects for i in found}
    assert by_op[("mul", "call_function")] == ops.PURE
    assert by_op[("add", "call_method")].mutates == (0,) and by_op[("add", "call_method")].may_alias
    assert by_op[("relu", "call_function")].mutates == (0,)
    assert by_op[("relu", "call_module")].mutates == (0,)
    assert by_op[("view", "call_method")] == ops.Effects(may_alias=True)
    assert not by_op[("clone", "call_method")].may_alias


def test_effects_randomness_follows_training():
    def fn(s, x):
        return F.dropout(x, 0.1, False) + F.dropout(x, 0.1) + F.alpha_dropout(x, 0.1) + torch.rand_like(x) + s.drop(x)

    train = [i for i in infos(Fn(fn, drop=nn.Dropout(0.1)).train(), X4) if i.kind is not Kind.ELEMENTWISE]
    assert [(i.op, i.effects.random) for i in train] == [
        ("dropout", False), ("dropout", True), ("dropout", False), ("rand_like", True), ("dropout", True)]
    evaluated = infos(Fn(fn, drop=nn.Dropout(0.1)).eval(), X4)
    assert not evaluated[-2].effects.random and evaluated[-2].is_noop  # the module, in eval mode


def test_effects_of_declared_impure_modules_and_asserts():
    class Recorder(nn.Module):
        fxc_impure = True

        def forward(self, x):
            return x

    gm = fxcompress.trace(Fn(lambda s, x: s.rec(x) + 1, rec=Recorder()), X4, leaf_modules=[Recorder])
    (rec,) = [describe(n, gm) for n in gm.graph.nodes if n.op == "call_module"]
    assert rec.kind is Kind.UNKNOWN and rec.effects.declared_impure and rec.effects.may_alias
    def checked(s, x):
        torch._assert(x.dim() == 4, "4-D")
        return x

    check = fx.symbolic_trace(Fn(checked))
    (assertion,) = [describe(n, check) for n in check.graph.nodes if n.target is torch._assert]
    assert assertion.kind is Kind.ASSERT and assertion.effects.side_effect


# -- plainness ------------------------------------------------------------------------------
class StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class Doubling(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(("make", "like", "reason"), [
    (lambda: StandardisedConv(4, 4, 3), (Kind.CONV, "conv2d"), "StandardisedConv overrides Conv2d.forward"),
    (lambda: Doubling(), (Kind.ACTIVATION, "relu"), "Doubling overrides ReLU.forward"),
    (lambda: _hooked(nn.Conv2d(4, 4, 3)), (Kind.CONV, "conv2d"), "Conv2d has forward hooks"),
    (lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)), (Kind.CONV, "conv2d"),
     "ParametrizedConv2d has a parametrized weight"),
])
def test_a_module_that_is_not_plain_is_never_described_as_its_class(make, like, reason):
    module = make()
    info = ops.describe_module(module)
    assert (info.kind, info.op, info.not_plain) == (Kind.UNKNOWN, type(module).__name__, ops.NotPlain(*like, reason))
    assert info.weight is None and not info.params
    gm = fxcompress.trace(Fn(lambda s, x: s.m(x), m=module), X4, leaf_modules=[type(module)])
    (node_info,) = [describe(n, gm) for n in gm.graph.nodes if n.op == "call_module"]
    assert (node_info.kind, node_info.not_plain) == (Kind.UNKNOWN, info.not_plain)


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda m, args, out: out * 2)
    return module


def test_subclasses_that_keep_torch_forward_are_plain():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    for module, kind in ((NonDynamicallyQuantizableLinear(4, 4), Kind.LINEAR), (nn.ZeroPad2d(1), Kind.POOL),
                         (nn.ReLU6(), Kind.ACTIVATION)):
        info = ops.describe_module(module)
        assert (info.kind, info.not_plain) == (kind, None)
    assert ops.not_plain(nn.ReLU6(), nn.Hardtanh) is None  # ReLU6 computes Hardtanh's forward


def test_layers_inside_name_the_weighted_layers_of_a_module_kept_whole():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert ops.layers_inside(layer) == ["self_attn", "linear1", "linear2"]
    assert ops.layers_inside(layer, {Kind.LINEAR}) == ["self_attn.out_proj", "linear1", "linear2"]


def test_tensor_shape_reads_capture_metadata():
    gm = fxcompress.trace(Fn(lambda s, x: x.flatten(1)), X4)
    flat = next(n for n in gm.graph.nodes if n.op == "call_method")
    assert tensor_shape(flat) == (2, 144) and tensor_shape(7) is None


# -- the torchvision zoo ---------------------------------------------------------------------
# describe() reads only the graph and module attributes, so the models are built on the meta
# device (no memory, no init time); regnet's constructor computes widths from tensors and needs CPU.
# Swin's two helpers stay UNKNOWN on purpose (see ops.tables._QUALIFIED).
EXPECTED_UNKNOWN = {"patch_merging_pad", "get_relative_position_bias"}
REPRESENTATIVES = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "densenet121",
                   "squeezenet1_1", "googlenet", "mnasnet0_5", "regnet_x_400mf", "convnext_tiny", "vit_b_32",
                   "swin_t", "maxvit_t"]


def _graph_of(name: str) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name)
        except NotImplementedError:
            model = torchvision.models.get_model(name)
    return fx.symbolic_trace(model.eval())


def _unknown_kinds(names: list[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for name in names:
        gm = _graph_of(name)
        counts.update(i.op for i in (describe(n, gm) for n in gm.graph.nodes) if i.kind is Kind.UNKNOWN)
    return counts


def _kinds(name: str) -> set[Kind]:
    gm = _graph_of(name)
    return {describe(n, gm).kind for n in gm.graph.nodes}


def test_zoo_representatives_are_fully_described():
    assert set(_unknown_kinds(REPRESENTATIVES)) == EXPECTED_UNKNOWN
    assert {Kind.CONV, Kind.NORM, Kind.POOL, Kind.ELEMENTWISE, Kind.ACTIVATION, Kind.LINEAR,
            Kind.RESHAPE} <= _kinds("efficientnet_b0")
    assert {Kind.CONCAT, Kind.SPLIT, Kind.PERMUTE, Kind.GETITEM} <= _kinds("shufflenet_v2_x0_5")
    assert {Kind.ATTENTION, Kind.CONCAT, Kind.ASSERT, Kind.SHAPE} <= _kinds("vit_b_32")


@pytest.mark.slow
def test_whole_zoo_has_no_unexpected_unknown_op():
    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) == 80
    assert set(_unknown_kinds(names)) == EXPECTED_UNKNOWN


def test_describe_never_raises_on_a_dangling_target():
    gm = fxcompress.trace(Fn(lambda s, x: s.lin(x), lin=nn.Linear(3, 3)), torch.randn(1, 3))
    del gm.lin
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert describe(node, gm).kind is Kind.UNKNOWN
    assert describe(next(iter(gm.graph.nodes)), gm).kind is Kind.PLACEHOLDER
