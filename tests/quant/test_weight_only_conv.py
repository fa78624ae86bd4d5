"""WeightOnlyConv: a conv the lowering keeps float, stored as int8 codes, computing the float conv
of its dequantized weight bit for bit, everywhere a lowered model runs."""

from __future__ import annotations

import copy
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxcompress
import fxcompress.passes.lower as lower_pass
from fxcompress import artifact
from fxcompress.errors import ConfigError, InputError
from fxcompress.examples import digits
from fxcompress.quant.lowered import WeightOnlyConv
from fxcompress.quant.lowering.choice import Choice

from test_lowered import digits_features

CONVS = [
    nn.Conv1d(8, 12, 5, padding=2), nn.Conv1d(8, 8, 4, padding="same", padding_mode="reflect"),
    nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 8, 9, padding="same", groups=8),
    nn.Conv2d(8, 16, 4, padding="same"), nn.Conv2d(8, 16, 3, stride=2, padding=2, padding_mode="replicate", dilation=2),
    nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", groups=2, bias=False),
    nn.Conv3d(8, 4, 3, padding=1), nn.Conv3d(8, 4, (1, 3, 2), stride=(1, 2, 1), padding="valid"),
]


def folded_like(conv: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """``conv`` with its weight replaced by ``codes * scale`` (a folded layer's), and the scale."""
    torch.manual_seed(3)
    conv = copy.deepcopy(conv)
    scale = conv.weight.detach().flatten(1).abs().amax(1) / 127
    codes = torch.round(conv.weight.detach() / scale.view(-1, *[1] * (conv.weight.dim() - 1))).clamp(-128, 127)
    with torch.no_grad():
        conv.weight.copy_(codes * scale.view(-1, *[1] * (conv.weight.dim() - 1)))
    return conv, scale


def activation(conv: nn.Module, n: int = 3) -> torch.Tensor:
    dims = len(conv.kernel_size)
    x = digits_features(n, conv.in_channels, 12)
    return x[..., 0, :].contiguous() if dims == 1 else x.unsqueeze(2).expand(-1, -1, 4, -1, -1).contiguous() \
        if dims == 3 else x


@pytest.mark.parametrize("conv", CONVS, ids=repr)
def test_equals_the_float_conv_bit_for_bit(conv: nn.Module) -> None:
    conv, scale = folded_like(conv)
    m = WeightOnlyConv.from_float(conv, scale)
    x = activation(conv)
    assert m.weight.dtype == torch.int8 and torch.equal(m.dequantized_weight(), conv.weight)
    with torch.no_grad():
        assert torch.equal(m(x), conv(x)) and torch.equal(m(x), conv(x))  # the second from the cache
    rebuilt = WeightOnlyConv(**m.config())
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt(x), m(x))
    assert "bits=8 weights, float compute" in repr(m)


def test_state_is_a_quarter_of_the_float_layer_and_edits_are_seen() -> None:
    conv, scale = folded_like(nn.Conv2d(64, 64, 3, padding=1))
    m = WeightOnlyConv.from_float(conv, scale)
    state = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert state < 0.27 * sum(t.numel() * t.element_size() for t in conv.state_dict().values())
    x = activation(conv)
    before = m(x)
    with torch.no_grad():
        m.weight.neg_()  # in place: the cached dequantized weight is rebuilt
        conv.weight.neg_()
        assert torch.equal(m(x), conv(x)) and not torch.equal(m(x), before)
    other = copy.deepcopy(m)
    m.load_state_dict(WeightOnlyConv.from_float(*folded_like(nn.Conv2d(64, 64, 3, padding=1))).state_dict())
    assert not torch.equal(m(x), other(x))


def test_bad_config_and_input() -> None:
    with pytest.raises(ConfigError, match="spatial_dims"):
        WeightOnlyConv(4, 4, 3, spatial_dims=4)
    with pytest.raises(ConfigError, match="WeightOnlyConv"):
        WeightOnlyConv(4, 6, 3, groups=4)
    with pytest.raises(ConfigError, match="nn.Conv1d/2d/3d"):
        WeightOnlyConv.from_float(nn.ConvTranspose2d(4, 4, 3), torch.ones(4))
    conv, scale = folded_like(nn.Conv2d(8, 16, 3))
    m = WeightOnlyConv.from_float(conv, scale)
    with pytest.raises(InputError, match="float 4-D"):
        m(torch.zeros(1, 8, 6, 6, dtype=torch.uint8))


@pytest.mark.parametrize("freezing", [False, True])
def test_compile_and_export(freezing: bool, tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    conv, scale = folded_like(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"))
    m = WeightOnlyConv.from_float(conv, scale).eval()
    x = activation(conv)
    with torch.no_grad():
        expected = m(x)
    compiled = torch.compile(m)
    with inductor_config.patch(freezing=freezing), torch.inference_mode():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)  # inductor's conv: float round-off
    program = torch.export.export(m, (x,))
    assert any(n.op == "placeholder" and "weight" in n.name for n in program.graph.nodes)
    torch.export.save(program, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    assert loaded.state_dict["weight"].dtype == torch.int8  # the program keeps the codes
    assert torch.equal(loaded.module()(x), expected)


def test_onnx_twin_keeps_the_codes(tmp_path: Path) -> None:
    from fxcompress.onnx_forms import onnx_form

    conv, scale = folded_like(nn.Conv2d(8, 16, 3, padding=1, padding_mode="replicate"))
    m = WeightOnlyConv.from_float(conv, scale)
    x = activation(conv)
    torch.onnx.export(onnx_form(m), (x,), str(tmp_path / "w.onnx"), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(theirs, m(x), rtol=1e-4, atol=1e-4)
    import onnx

    graph = onnx.load(str(tmp_path / "w.onnx")).graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    assert all(init.data_type != onnx.TensorProto.FLOAT or len(init.dims) <= 1 for init in graph.initializer)


def test_lower_keeps_float_layers_as_int8_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every layer chosen float becomes a WeightOnlyConv (convs) computing the float twin's values;
    the lowered graph saves and loads bit for bit."""
    monkeypatch.setattr(lower_pass, "choose", lambda c: Choice("float", {"int8": 2.0, "float": 1.0}))
    data = digits.load_digits_data()
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 64, 32)]
    pipeline = fxcompress.recipes.int8_static(only_if_faster=True)
    result = fxcompress.run(digits.pretrained_digits_resnet(), pipeline, data.test_x[:4], calibration_data=batches,
                            progress=False)
    low = result.model
    kept = [m for m in low.modules() if isinstance(m, WeightOnlyConv)]
    assert kept and not any(type(m) in (nn.Conv2d, nn.Conv1d, nn.Conv3d) for m in low.modules())
    lower_row = next(r for r in result.report.rows if r.name == "lower")
    assert all(reason.startswith("kept float") for reason in lower_row.stats["float_nodes"].values())
    x = data.test_x[:8]
    with torch.no_grad():
        y = low(x)
    artifact.save(result, tmp_path / "m.fxc")
    loaded = artifact.load(tmp_path / "m.fxc")
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert result.report.after.state_bytes < 0.3 * result.report.before.state_bytes
