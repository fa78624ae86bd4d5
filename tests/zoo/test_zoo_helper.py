"""The zoo helper gives every torchvision classifier weights a compiler test can trust."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fxcompress import zoo
from fxcompress.errors import ConfigError

CI_MODELS = zoo.ci_subset()
SLOW_MODELS = [n for n in zoo.list_classifiers() if n not in CI_MODELS]

# Constant by design in torchvision and in trained models alike: Swin V2's
# per-head attention temperature starts at log(10).
CONSTANT_BY_DESIGN = {"logit_scale"}


def _count_parameters(name: str) -> int:
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = torchvision.models.get_model(name, **kwargs)
    except NotImplementedError:  # RegNet computes its widths with tensors: build it for real
        model = torchvision.models.get_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_list_classifiers_is_torchvision_zoo() -> None:
    names = zoo.list_classifiers()
    assert len(names) == 80
    assert names == sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize(
    "name", [n for n in zoo.list_classifiers() if zoo.param_count(n) <= 40_000_000]
)
def test_param_count_table_near_ci_threshold(name: str) -> None:
    # Covers every CI model and the ones just above 30M, so ci_subset's cut is proven.
    assert zoo.param_count(name) == _count_parameters(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n in zoo.list_classifiers() if zoo.param_count(n) > 40_000_000]
)
def test_param_count_table_large_models(name: str) -> None:
    assert zoo.param_count(name) == _count_parameters(name)


def test_ci_subset_threshold() -> None:
    assert CI_MODELS == sorted(CI_MODELS)
    assert all(zoo.param_count(n) <= 30_000_000 for n in CI_MODELS)
    assert all(zoo.param_count(n) > 30_000_000 for n in SLOW_MODELS)
    assert {"resnet18", "mobilenet_v3_small", "swin_t", "inception_v3"} <= set(CI_MODELS)
    assert zoo.ci_subset(max_params=5_000_000) == [
        n for n in CI_MODELS if zoo.param_count(n) <= 5_000_000
    ]


def test_input_shapes() -> None:
    assert zoo.input_shape("resnet18") == (3, 224, 224)
    assert zoo.input_shape("resnet18", reduced=True) == (3, 64, 64)
    assert zoo.input_shape("inception_v3") == (3, 299, 299)
    assert zoo.input_shape("inception_v3", reduced=True) == (3, 128, 128)
    for fixed in ("vit_b_16", "swin_t", "maxvit_t"):
        assert zoo.input_shape(fixed, reduced=True) == (3, 224, 224)


def test_example_input_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    x = zoo.example_input("resnet18", batch=3, reduced=True, seed=5)
    assert x.shape == (3, 3, 64, 64)
    assert torch.equal(x, zoo.example_input("resnet18", batch=3, reduced=True, seed=5))
    assert not torch.equal(x, zoo.example_input("resnet18", batch=3, reduced=True, seed=6))
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_name_is_a_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        zoo.build("resnet_18")
    with pytest.raises(ConfigError, match="list_classifiers"):
        zoo.input_shape("not_a_model")


def test_build_is_deterministic_per_seed() -> None:
    state = torch.get_rng_state()
    a, b = zoo.build("mobilenet_v3_small", seed=3), zoo.build("mobilenet_v3_small", seed=3)
    c = zoo.build("mobilenet_v3_small", seed=4)
    assert torch.equal(state, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_batchnorm_is_far_from_identity() -> None:
    model = zoo.build("resnet18")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20
    for bn in norms:
        # Eval-mode BN is y = a*x + b per channel; fusing it must change the conv.
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b = bn.bias - a * bn.running_mean
        assert (a - 1).abs().max() > 0.1
        assert b.abs().max() > 0.05
        assert bn.running_var.std() > 0.01  # channels differ, not one shared scale


def test_vit_head_and_convnext_layer_scale_are_redrawn() -> None:
    vit = zoo.build("vit_b_32")
    assert vit.heads.head.weight.abs().min() > 0
    with torch.no_grad():
        out = vit(zoo.example_input("vit_b_32", batch=2))
    assert 0.1 < out.std() < 100
    convnext = zoo.build("convnext_tiny")
    scales = [p for n, p in convnext.named_parameters() if n.endswith("layer_scale")]
    assert scales and all(p.min() >= 0.1 for p in scales)


def _check_realistic(name: str) -> None:
    model = zoo.build(name)
    assert not model.training
    for pname, param in model.named_parameters():
        assert torch.isfinite(param).all(), pname
        if param.numel() > 1 and pname.rsplit(".", 1)[-1] not in CONSTANT_BY_DESIGN:
            assert param.std() > 0, f"{pname} is constant"
    with torch.no_grad():
        out = model(zoo.example_input(name, batch=4, reduced=True, seed=1))
    assert torch.isfinite(out).all()
    assert 1e-3 < out.std() < 1e4, f"output std {out.std():.3g}"
    # Different images must give different logits, not one input-independent vector.
    spread = (out - out.mean(dim=0)).norm() / out.norm()
    assert spread > 1e-3, f"outputs barely depend on the input ({spread:.2g})"


@pytest.mark.parametrize("name", CI_MODELS)
def test_ci_models_are_realistic(name: str) -> None:
    _check_realistic(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_large_models_are_realistic(name: str) -> None:
    _check_realistic(name)
