"""Capture raises functional convs / linears on parameters to torch modules (fxcompress.raising)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.raising import raise_functional_layers


class SamePadConv(nn.Conv2d):
    """TensorFlow-style 'same' padding, as EfficientNet ports write it: a pad module, then F.conv2d."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class OwnConv(nn.Conv2d):
    """A conv subclass computing its conv itself, with nothing else in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, 1, 1)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2)  # its pad child is called: the conv becomes stem.conv2d
        self.body = OwnConv(8, 8, 3)  # nothing else of it is used: the conv replaces it
        self.w1 = nn.Parameter(torch.randn(4, 8, 2))  # weights on the root, no bias
        self.up = nn.Parameter(torch.randn(4, 8, 2, 2))  # transposed: (in, out, kh, kw)
        self.fc_w, self.fc_b = nn.Parameter(torch.randn(5, 8)), nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = F.relu(self.body(F.relu(self.stem(x))))
        t = F.conv1d(s, self.w1, padding=1)
        u = F.conv_transpose2d(y[:, :4], self.up, stride=2)
        return F.linear(y.mean((2, 3)), self.fc_w, self.fc_b), t, u


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 12, 12, generator=g), torch.randn(2, 8, 9, generator=g)


def test_functional_layers_become_modules_with_the_same_parameters() -> None:
    torch.manual_seed(0)
    model = Functional().eval()
    before = copy.deepcopy(model.state_dict())
    gm = fxcompress.trace(model, inputs())
    called = {str(n.target): type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert called["stem.conv2d"] is nn.Conv2d and called["body"] is nn.Conv2d and called["conv1d"] is nn.Conv1d
    assert called["conv_transpose2d"] is nn.ConvTranspose2d and called["linear"] is nn.Linear
    assert called["stem.static_padding"] is nn.ZeroPad2d
    assert not [n for n in gm.graph.nodes if n.op in ("call_function", "get_attr") and "conv" in str(n.target)]
    assert gm.get_submodule("stem.conv2d").weight is model.stem.weight  # the same Parameter objects
    assert gm.get_submodule("linear").bias is model.fc_b
    assert not hasattr(gm.get_submodule("stem"), "weight")  # moved, not copied: quantization sees it all
    with torch.no_grad():
        for got, want in zip(gm(*inputs()), model(*inputs())):
            assert torch.equal(got, want)
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])
    assert {type(m) for m in model.modules()} >= {SamePadConv}


def test_raised_layers_quantize_and_lower() -> None:
    torch.manual_seed(0)
    model = Functional().eval()
    calibration = [tuple(t * 1.1 for t in inputs()) for _ in range(2)]
    result = fxcompress.run(model, ["insert_observers", "calibrate", "fold_fake_quant", "lower"], inputs(),
                            calibration_data=calibration)
    assert result.report.rows[0].stats["layers_quantized"] == 5
    lowered = result.report.rows[-1].stats
    assert lowered["int8_ops"].get("conv", 0) == 3  # stem, body, conv1d; the transposed conv stays folded


def test_a_called_module_is_never_edited() -> None:
    """Functional use of a called module's weights (the caller's own object under trace): left as is."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)

    model = Both().eval()
    gm = fx.symbolic_trace(model)
    assert raise_functional_layers(gm) == 0
    assert any(n.op == "call_function" and n.target is F.conv2d for n in gm.graph.nodes)


@pytest.mark.parametrize("weight_source", ["buffer", "computed"])
def test_weights_that_are_not_parameters_stay_functional(weight_source: str) -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(4, 3, 3, 3))
            self.v = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.w if weight_source == "buffer" else self.v / self.v.norm()
            return F.conv2d(x, weight)

    gm = fx.symbolic_trace(Conv())
    assert raise_functional_layers(gm) == 0
