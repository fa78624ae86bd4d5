"""MAC counts: closed forms on small graphs, and FlopCounterMode per op kind on the zoo."""

from __future__ import annotations

import warnings

import pytest
import fxcompress
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fxcompress import zoo
from fxcompress.errors import InputError
from fxcompress.macs import KINDS, count_macs, macs_by_kind

aten = torch.ops.aten


def _annotated(root, *inputs: torch.Tensor) -> fx.GraphModule:
    """Trace a module or plain function and annotate shapes, as fxcompress.trace does.

    A bare ``torch.nn`` layer is wrapped so that it stays a ``call_module`` leaf
    (the root's own forward is always traced through).
    """
    if isinstance(root, nn.Module) and type(root).__module__.startswith("torch.nn"):
        root = nn.Sequential(root) if len(inputs) == 1 else _Leaf(root)
    if isinstance(root, nn.Module):
        root.eval()  # trace the inference graph (no auxiliary heads, no dropout)
    gm = fx.symbolic_trace(root)
    ShapeProp(gm).propagate(*inputs)
    return gm


def _only(kind: str, macs: int) -> dict[str, int]:
    return {k: (macs if k == kind else 0) for k in KINDS}


class _Leaf(nn.Module):
    """Holds a torch.nn layer that takes two inputs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.layer(a, b)


class _WithWeight(nn.Module):
    """Calls ``fn(x, self.weight)``: the weight reaches the graph as a ``get_attr`` node."""

    def __init__(self, fn, weight: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight)


def test_grouped_conv2d_module() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
    gm = _annotated(conv, torch.randn(2, 8, 10, 10))
    # output 2x16x5x5, each over 8/4 input channels x 3x3 taps
    assert macs_by_kind(gm) == _only("conv", 2 * 16 * 5 * 5 * 2 * 9)


def test_grouped_transposed_conv2d_module() -> None:
    conv = nn.ConvTranspose2d(8, 12, 4, stride=2, groups=2)
    gm = _annotated(conv, torch.randn(1, 8, 5, 5))
    # every input element scatters into 12/2 output channels x 4x4 taps
    assert macs_by_kind(gm) == _only("conv", 1 * 8 * 5 * 5 * 6 * 16)


def test_functional_conv1d_conv3d_and_transposed() -> None:
    conv1 = _WithWeight(lambda x, w: F.conv1d(x, w, padding=2), torch.randn(6, 4, 5))
    gm = _annotated(conv1, torch.randn(3, 4, 20))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    assert macs_by_kind(gm) == _only("conv", 3 * 6 * 20 * 4 * 5)
    conv3 = lambda x, w: F.conv3d(x, w, groups=2)  # noqa: E731
    gm = _annotated(conv3, torch.randn(1, 4, 6, 6, 6), torch.randn(4, 2, 3, 3, 3))
    assert count_macs(gm) == 1 * 4 * 4**3 * 2 * 27
    convt = lambda x, w: F.conv_transpose1d(x, w, stride=2)  # noqa: E731
    gm = _annotated(convt, torch.randn(2, 4, 7), torch.randn(4, 3, 2))  # w: [C_in, C_out/g, k]
    assert count_macs(gm) == 2 * 4 * 7 * 3 * 2


def test_linear_on_3d_input_module_and_function() -> None:
    x = torch.randn(2, 5, 16)
    assert macs_by_kind(_annotated(nn.Linear(16, 32), x)) == _only("linear", 2 * 5 * 32 * 16)
    fn = _WithWeight(F.linear, torch.randn(32, 16))
    assert macs_by_kind(_annotated(fn, x)) == _only("linear", 2 * 5 * 32 * 16)


def test_matmul_family() -> None:
    a, b = torch.randn(4, 3, 5), torch.randn(4, 5, 7)
    assert macs_by_kind(_annotated(lambda p, q: torch.bmm(p, q), a, b)) == _only("matmul", 4 * 3 * 5 * 7)
    assert count_macs(_annotated(lambda p, q: p.matmul(q), a, b)) == 4 * 3 * 5 * 7
    # broadcasting: [2,1,3,5] @ [4,5,6] -> [2,4,3,6], each a dot product of length 5
    p, q = torch.randn(2, 1, 3, 5), torch.randn(4, 5, 6)
    assert count_macs(_annotated(lambda p, q: p @ q, p, q)) == 2 * 4 * 3 * 6 * 5
    bias = torch.randn(4, 3, 7)
    assert count_macs(_annotated(lambda c, p, q: torch.baddbmm(c, p, q), bias, a, b)) == 4 * 3 * 5 * 7
    einsum = lambda p, q: torch.einsum("b i j, b j k -> b i k", p, q)  # noqa: E731
    assert count_macs(_annotated(einsum, a, b)) == 4 * 3 * 5 * 7
    # one operand: a permutation, no products
    assert count_macs(_annotated(lambda p: torch.einsum("bij->bji", p), a)) == 0


def test_scaled_dot_product_attention() -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    gm = _annotated(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    # scores 5x7 over 8 dims, weighted sum 5x6 over 7 keys, per batch and head
    assert macs_by_kind(gm) == _only("attention", 2 * 4 * 5 * 7 * (8 + 6))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_closed_form_and_flop_counter(
    batch_first: bool, need_weights: bool
) -> None:
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=batch_first)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.mha(q, k, v, need_weights=need_weights)[0]

    n, seq_q, seq_k = 2, 5, 7
    shape = (lambda s, e: (n, s, e)) if batch_first else (lambda s, e: (s, n, e))
    q, k, v = torch.randn(shape(seq_q, 16)), torch.randn(shape(seq_k, 12)), torch.randn(shape(seq_k, 10))
    gm = _annotated(Attend(), q, k, v)
    counts = macs_by_kind(gm)
    assert counts["linear"] == n * seq_q * 16 * 16 * 2 + n * seq_k * 16 * (12 + 10)
    assert counts["attention"] == 2 * n * seq_q * seq_k * 16
    reference = _flop_counter(gm, (q, k, v))
    assert counts["linear"] == reference["linear"]
    assert counts["attention"] == reference["bmm"]


def test_bilinear_and_lstm_closed_forms() -> None:
    bilinear = nn.Bilinear(6, 4, 3)
    gm = _annotated(bilinear, torch.randn(5, 6), torch.randn(5, 4))
    assert macs_by_kind(gm) == _only("other", 5 * 3 * 6 * 4)
    lstm = nn.LSTM(10, 20, num_layers=2)
    gm = _annotated(lstm, torch.randn(7, 3, 10))
    steps = 7 * 3
    assert macs_by_kind(gm) == _only("other", steps * 4 * 20 * ((10 + 20) + (20 + 20)))


def test_missing_shape_metadata_is_an_input_error() -> None:
    gm = fx.symbolic_trace(nn.Linear(4, 4))
    with pytest.raises(InputError, match="ShapeProp"):
        count_macs(gm)


def test_nodes_without_macs_count_zero() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    assert macs_by_kind(_annotated(model, torch.randn(1, 3, 8, 8))) == dict.fromkeys(KINDS, 0)


# --- the zoo against FlopCounterMode -------------------------------------------------


def _flop_counter(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """MACs per op kind as FlopCounterMode sees them (FLOPs / 2).

    FlopCounterMode counts nothing for CPU fused attention or the
    nn.MultiheadAttention fast path, so both are turned off: attention then
    runs as plain bmm, which it counts.
    """
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    counts = fc.get_flop_counts()["Global"]

    def macs(*ops: object) -> int:
        return sum(counts.get(op, 0) for op in ops) // 2

    return {
        "conv": macs(aten.convolution),
        "linear": macs(aten.addmm, aten.mm),
        "bmm": macs(aten.bmm, aten.baddbmm),
        "total": sum(counts.values()) // 2,
    }


def _check_against_flop_counter(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    gm = _annotated(model, x)
    ours = macs_by_kind(gm)
    reference = _flop_counter(gm, (x,))
    pairs = {
        "conv": (ours["conv"], reference["conv"]),
        "addmm/mm": (ours["linear"], reference["linear"]),
        "bmm": (ours["matmul"] + ours["attention"], reference["bmm"]),
        "total": (count_macs(gm), reference["total"]),
    }
    for kind, (got, expected) in pairs.items():
        assert abs(got - expected) <= 0.01 * expected, f"{kind}: {got} vs FlopCounterMode {expected}"
    return ours


def _zoo_check(name: str) -> dict[str, int]:
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MACs depend on shapes only: torchvision's plain init is enough here.
        model = torchvision.models.get_model(name, **kwargs).eval()
    return _check_against_flop_counter(model, zoo.example_input(name, reduced=True))


@pytest.mark.parametrize("name", zoo.ci_subset())
def test_zoo_matches_flop_counter(name: str) -> None:
    _zoo_check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in zoo.list_classifiers() if n not in zoo.ci_subset()])
def test_large_zoo_matches_flop_counter(name: str) -> None:
    _zoo_check(name)


def test_swin_window_attention_on_padded_windows() -> None:
    # At 96x96 the stage maps (24, 12, 6, 3) are not multiples of the 7x7 window:
    # shifted_window_attention pads them, and the count must follow.
    model = torchvision.models.swin_t().eval()
    x = torch.randn(1, 3, 96, 96)
    gm = _annotated(model, x)
    wrapped = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "shifted_window_attention"]
    assert len(wrapped) == 12
    counts = _check_against_flop_counter(model, x)
    assert counts["attention"] > 0


def test_small_vit_and_maxvit_match_flop_counter() -> None:
    # The CI subset has no ViT (MultiheadAttention) or MaxViT (einsum attention):
    # small configurations of the same classes cover them quickly.
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    counts = _check_against_flop_counter(vit, torch.randn(2, 3, 32, 32))
    assert counts["attention"] == 2 * 2 * 2 * 17 * 17 * 32  # 2 layers, batch 2, 16+1 tokens
    maxvit = torchvision.models.MaxVit(
        input_size=(32, 32),
        stem_channels=16,
        partition_size=2,
        block_channels=[32, 64],
        block_layers=[1, 1],
        head_dim=16,
        stochastic_depth_prob=0.0,
    )
    counts = _check_against_flop_counter(maxvit, torch.randn(1, 3, 32, 32))
    assert counts["matmul"] > 0


def test_macs_survive_quantization_and_lowering() -> None:
    """Observed, fake-quant, folded and lowered layers count like the float layers they replace."""
    from fxcompress import recipes

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    calibration = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    result = fxcompress.run(model, recipes.int8_static(), x, calibration_data=calibration)
    fused = result.report.rows[0].after.macs
    assert fused > 0
    assert [row.after.macs for row in result.report.rows] == [fused] * len(result.report.rows)


def test_macs_of_dynamic_quantized_attention_match_float() -> None:
    model = nn.Sequential(nn.Linear(16, 16)).eval()

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(16, 4, batch_first=True)
            self.mlp = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.att(x, x, x, need_weights=False)[0])

    result = fxcompress.run(Attend().eval(), ["quantize_dynamic"], torch.randn(2, 5, 16))
    assert result.report.after.macs == result.report.before.macs > 0


@pytest.mark.parametrize("pass_name", ["quantize_dynamic", "quantize_weights"])
def test_macs_count_after_quantizing_linears_in_a_fresh_process(pass_name: str) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch, fxcompress
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
        report = fxcompress.run(model, [{pass_name!r}], torch.randn(4, 64), progress=False).report
        print(report.before.macs, report.after.macs)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(4 * (64 * 32 + 32 * 8))] * 2


def test_a_module_kept_whole_is_named_by_uncounted() -> None:
    from fxcompress.macs import uncounted

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.mha(self.fc(x), x, x)[0]

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    gm = fxcompress.trace(model, torch.randn(1, 3, 4), leaf_modules=["0"])
    assert uncounted(gm) == {"_0": "Block is kept whole: its 2 layers with MACs inside (fc, mha) are not counted"}
    assert uncounted(fxcompress.trace(model, torch.randn(1, 3, 4))) == {}
