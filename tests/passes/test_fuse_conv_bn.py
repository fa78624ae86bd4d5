"""fuse_conv_bn: the rewritten graph, the modified flag, outputs before/after, and where it must not fire."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import DigitsResNet, load_digits_data
from fxcompress.passes.fuse_conv_bn import FuseConvBn

TOL = 1e-5
_BN = nn.modules.batchnorm._BatchNorm


def _realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, then eval()."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def _fuse(model: nn.Module, x: torch.Tensor, **options) -> fxcompress.Result:
    entry = ("fuse_conv_bn", options) if options else "fuse_conv_bn"
    return fxcompress.run(model, [entry], x)


def _row(result: fxcompress.Result):
    (row,) = result.report.rows
    return row


def _module_types(gm: fx.GraphModule) -> list[type]:
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def _bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BN))
            or n.target is F.batch_norm]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits_data().test_x[:32]


def test_digits_resnet_fuses_every_bn(digits, rel_err):
    model = _realistic(DigitsResNet())
    weight_before = model.stem[0].weight.clone()
    result = _fuse(model, digits)
    gm, row = result.model, _row(result)

    n_bn = sum(isinstance(m, _BN) for m in model.modules())
    assert n_bn == 9
    assert row.modified
    assert row.stats == {"fused": n_bn, "skipped": {}}
    assert not _bn_nodes(gm)
    assert not any(isinstance(m, _BN) for m in gm.modules()), "BN submodules must be deleted"
    assert _module_types(gm).count(nn.Conv2d) == n_bn
    assert gm.get_submodule("stem.0").bias is not None, "a bias is created where the conv had none"
    assert result.report.after.state_bytes < result.report.before.state_bytes
    with torch.no_grad():
        assert rel_err(model(digits), gm(digits)) <= TOL
    # the caller's model is untouched: its BN is still there and its conv unchanged
    assert isinstance(model.stem[1], nn.BatchNorm2d)
    assert torch.equal(model.stem[0].weight, weight_before)


def test_fusion_is_not_a_no_op(digits):
    """Fused weights really differ from the originals (realistic stats), so the numeric check has teeth."""
    model = _realistic(DigitsResNet())
    fused = _fuse(model, digits).model
    assert not torch.allclose(fused.get_submodule("stem.0").weight, model.stem[0].weight)


def test_never_changes_a_module_in_place(digits):
    """Called directly on a trace that shares its modules with the model, the pass still
    leaves the model alone: convs are replaced by new modules, never rewritten."""
    model = _realistic(DigitsResNet())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxcompress.trace(model, digits)
    result = FuseConvBn()(gm, fxcompress.PassContext(example_args=(digits,)))
    assert result.modified and result.stats["fused"] == 9
    assert fxcompress.get_pass("fuse_conv_bn") is FuseConvBn
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert isinstance(model.stem[1], nn.BatchNorm2d)


class ConvBn(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: bool = True) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.act else y


# name -> (conv-like layer, BatchNorm, input shape); built inside the test, after seeding.
CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), lambda: nn.BatchNorm1d(6), (3, 4, 17)),
    "conv2d_no_bias": (lambda: nn.Conv2d(4, 8, 3, bias=False), lambda: nn.BatchNorm2d(8), (2, 4, 9, 9)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 12, 3, groups=4), lambda: nn.BatchNorm2d(12), (2, 8, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6), lambda: nn.BatchNorm2d(6), (2, 6, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 5, 3), lambda: nn.BatchNorm3d(5), (2, 3, 6, 7, 8)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), lambda: nn.BatchNorm1d(6), (2, 4, 11)),
    "conv_transpose2d_grouped": (
        lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3), lambda: nn.BatchNorm2d(9), (2, 6, 5, 5)),
    "conv_transpose3d_no_bias": (
        lambda: nn.ConvTranspose3d(4, 6, 2, groups=2, bias=False), lambda: nn.BatchNorm3d(6), (2, 4, 3, 4, 5)),
    "bn_without_affine": (lambda: nn.Conv2d(3, 5, 1), lambda: nn.BatchNorm2d(5, affine=False), (2, 3, 6, 6)),
    "linear_bn1d": (lambda: nn.Linear(10, 7), lambda: nn.BatchNorm1d(7), (16, 10)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuses_every_layout(case, rel_err):
    make_conv, make_bn, shape = CASES[case]
    model = _realistic(ConvBn(make_conv(), make_bn()))
    x = torch.randn(shape)
    conv_type = type(model.conv)
    result = _fuse(model, x)
    gm = result.model

    assert _row(result).modified and _row(result).stats["fused"] == 1
    assert _module_types(gm) == [conv_type]
    assert not hasattr(gm, "bn")
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) <= TOL
        # also on an input the pass never saw (another batch size)
        x2 = torch.randn((5, *shape[1:]))
        assert rel_err(model(x2), gm(x2)) <= TOL


class FunctionalBn(nn.Module):
    """BatchNorm in functional form: statistics are buffers fetched with get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("mean", torch.randn(4, generator=gen))
        self.register_buffer("var", torch.rand(4, generator=gen) + 0.5)
        self.gamma = nn.Parameter(torch.rand(4, generator=gen) + 0.5)
        self.beta = nn.Parameter(torch.randn(4, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_functional_batch_norm(rel_err):
    model = FunctionalBn().eval()
    x = torch.randn(2, 3, 8, 8)
    result = _fuse(model, x)
    gm = result.model

    assert _row(result).stats["fused"] == 1
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) <= TOL


def test_functional_batch_norm_in_training_is_left_alone():
    class TrainingFunctionalBn(FunctionalBn):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.conv(x), None, None, self.gamma, self.beta, True)

    result = _fuse(TrainingFunctionalBn().eval(), torch.randn(2, 3, 8, 8))
    assert not _row(result).modified
    assert _row(result).stats["skipped"] == {"bn in training mode": 1}
    assert len(_bn_nodes(result.model)) == 1


class Residual(nn.Module):
    """conv -> bn, but the conv output is also added back: fusing would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_with_two_users_is_not_fused():
    model = _realistic(Residual())
    x = torch.randn(2, 4, 6, 6)
    result = _fuse(model, x)
    assert not _row(result).modified
    assert _row(result).stats == {"fused": 0, "skipped": {"conv output has other users": 1}}
    assert _module_types(result.model) == [nn.Conv2d, nn.BatchNorm2d]
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))


class SharedConv(nn.Module):
    """One conv module called twice; only the first call is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


def test_shared_conv_module_is_not_fused():
    model = _realistic(SharedConv())
    result = _fuse(model, torch.randn(1, 4, 6, 6))
    assert not _row(result).modified
    assert _row(result).stats["skipped"] == {"conv module is shared": 1}


class LinearOverSequence(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d over dim 1 (L): BN does not normalise the features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_bn_over_a_non_channel_dim_is_not_fused():
    model = _realistic(LinearOverSequence())
    result = _fuse(model, torch.randn(3, 6, 4))
    assert _row(result).stats["skipped"] == {"bn does not normalise the channel dim": 1}
    assert _module_types(result.model) == [nn.Linear, nn.BatchNorm1d]


def test_bn_after_an_activation_is_not_fused():
    model = _realistic(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    result = _fuse(model, torch.randn(1, 3, 6, 6))
    assert _row(result).stats["skipped"] == {"bn input is not a conv or linear": 1}


def test_model_in_training_mode_is_refused():
    model = _realistic(DigitsResNet()).train()
    with pytest.raises(ConfigError, match="eval mode"):
        _fuse(model, torch.randn(2, 1, 8, 8))
    assert model.training, "the caller's training flag is left as it was"


def test_bn_module_in_training_mode_is_refused_or_skipped():
    model = _realistic(ConvBn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.bn.train()  # the model is in eval mode, this one BN is not
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ConfigError, match="'bn'"):
        _fuse(model, x)
    # called directly, without the manager's check, the pass itself leaves it alone
    gm = fxcompress.trace(model, x)
    result = FuseConvBn()(gm, fxcompress.PassContext(example_args=(x,)))
    assert not result.modified
    assert result.stats["skipped"] == {"bn in training mode": 1}
    assert _module_types(result.gm) == [nn.Conv2d, nn.BatchNorm2d]


class StandardisedConv(nn.Conv2d):
    """Weight standardisation in forward: scaling the weight would be undone, so no fusion."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_conv_with_its_own_forward_is_not_fused():
    model = _realistic(nn.Sequential(StandardisedConv(3, 4, 3), nn.BatchNorm2d(4)))
    result = fxcompress.run(model, ["fuse_conv_bn"], torch.randn(1, 3, 6, 6), leaf_modules=[StandardisedConv])
    assert _row(result).stats["skipped"] == {"conv is not a plain torch module": 1}


def test_conv_with_a_hook_is_not_fused():
    model = _realistic(ConvBn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.conv.register_forward_hook(lambda m, args, out: out * 2)
    result = _fuse(model, torch.randn(1, 3, 6, 6))
    assert _row(result).stats["skipped"] == {"conv is not a plain torch module": 1}


@pytest.mark.parametrize(
    ("options", "fused_paths"),
    [
        ({"scope": ["layers.1*"]}, {"layers.1.body.0", "layers.1.body.3", "layers.1.downsample.0"}),
        ({"skip": ["layers.1.downsample", "stem", "layers.[02]*"]}, {"layers.1.body.0", "layers.1.body.3"}),
    ],
)
def test_scope_and_skip_limit_fusion(digits, rel_err, options, fused_paths):
    model = _realistic(DigitsResNet())
    result = _fuse(model, digits, **options)
    gm = result.model
    remaining_bns = {n.args[0].target for n in _bn_nodes(gm)}
    all_convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert remaining_bns == all_convs - fused_paths
    assert _row(result).stats["fused"] == len(fused_paths)
    assert _row(result).stats["skipped"] == {"out of scope": len(all_convs) - len(fused_paths)}
    with torch.no_grad():
        assert rel_err(model(digits), gm(digits)) <= TOL
