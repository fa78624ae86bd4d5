"""Property: random small architectures keep their output shapes and, for silenced channels, their outputs.

Architectures are drawn block by block from residuals, concatenation, split and
chunk, grouped and depthwise convolution, squeeze-excitation, channel shuffle,
and a pooled or flattened head.  Every drawn model is pruned at a drawn ratio
through ``fxcompress.run`` (full checks), and separately with the channels to
be removed silenced first, which must leave the outputs unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress.capture import trace
from fxcompress.prune import apply_removal, build_channel_graph, select, silence, unit_scores


def _conv_bn(cin: int, cout: int, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, hidden), nn.Conv2d(hidden, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, c: int, a: int, b: int) -> None:
        super().__init__()
        self.left, self.right = _conv_bn(c, a, k=1), _conv_bn(c, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Split(nn.Module):
    def __init__(self, c: int, k: int, m: int) -> None:
        super().__init__()
        self.k, self.conv = k, _conv_bn(c - k, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, moved = x.split([self.k, x.shape[1] - self.k], dim=1)
        return torch.cat([kept, self.conv(moved)], dim=1)


class Chunk(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = _conv_bn(c // 2, c // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a + self.conv(b)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.down, self.up = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return x.view(n, -1, h, w)


class Head(nn.Module):
    def __init__(self, c: int, flatten: bool) -> None:
        super().__init__()
        self.side = 2 if flatten else 1
        self.fc = nn.Linear(c * self.side ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, self.side), 1))


@st.composite
def architectures(draw: st.DrawFn) -> tuple[list[tuple], bool]:
    """A block plan: (kind, args) per block; channel counts threaded through."""
    c = draw(st.sampled_from([4, 6, 8, 12]))
    plan: list[tuple] = [("stem", c)]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["residual", "concat", "split", "chunk", "grouped", "depthwise",
                                     "se", "shuffle"]))
        if kind == "residual":
            plan.append((kind, c, draw(st.integers(2, 12))))
        elif kind == "concat":
            a, b = draw(st.integers(2, 8)), draw(st.integers(2, 8))
            plan.append((kind, c, a, b))
            c = a + b
        elif kind == "split" and c >= 4:
            k, m = draw(st.integers(1, c - 2)), draw(st.integers(2, 8))
            plan.append((kind, c, k, m))
            c = k + m
        elif kind in ("chunk", "shuffle") and c % 2 == 0:
            plan.append((kind, c))
            c = c // 2 if kind == "chunk" else c
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0] or [1]))
            cout = groups * draw(st.integers(1, 4))
            plan.append((kind, c, cout, groups))
            c = cout
        elif kind in ("depthwise", "se"):
            plan.append((kind, c, draw(st.integers(2, 6))))
    return plan, draw(st.booleans())


def _build(plan: list[tuple], flatten: bool) -> nn.Module:
    blocks: list[nn.Module] = []
    for kind, *args in plan:
        if kind == "stem":
            blocks.append(_conv_bn(3, args[0]))
        elif kind == "residual":
            blocks.append(Residual(*args))
        elif kind == "concat":
            blocks.append(Concat(*args))
        elif kind == "split":
            blocks.append(Split(*args))
        elif kind == "chunk":
            blocks.append(Chunk(args[0]))
        elif kind == "grouped":
            blocks.append(_conv_bn(args[0], args[1], groups=args[2]))
        elif kind == "depthwise":
            blocks.append(_conv_bn(args[0], args[0], groups=args[0]))
        elif kind == "se":
            blocks.append(SqueezeExcite(*args))
        elif kind == "shuffle":
            blocks.append(Shuffle())
    model = nn.Sequential(*blocks)
    width = model(torch.zeros(1, 3, 8, 8)).shape[1]  # the last block's output width
    model.append(Head(width, flatten))
    with torch.no_grad():  # realistic norm statistics: outputs must depend on every channel
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures(), st.sampled_from([0.0, 0.2, 0.35, 0.5, 0.7]), st.integers(0, 2 ** 16))
def test_random_architectures_prune_exactly(arch, ratio, seed):
    plan, flatten = arch
    torch.manual_seed(seed)
    model = _build(plan, flatten)
    x = torch.randn(2, 3, 8, 8)
    result = fxcompress.run(model, [("prune_channels", {"ratio": ratio})], (x,))
    assert result.model(x).shape == (2, 10)
    assert result.report.rows[0].after.parameters <= result.report.before.parameters

    gm = trace(copy.deepcopy(model), (x,))
    cg = build_channel_graph(gm)
    removed = select(cg, unit_scores(gm, cg, "l2"), ratio=ratio)
    assert not cg.norm_units.any()
    silence(gm, cg, removed)
    with torch.no_grad():
        reference = gm(x)
        apply_removal(gm, cg, removed)
        gm.recompile()
        pruned = gm(x)
    err = (reference - pruned).norm() / reference.norm()
    assert err < 1e-5, f"{plan}: {err:.3g}"
    if ratio == 0.0:
        assert not removed.any()
