"""eliminate_dead_nodes: what it removes, what must survive, and the state it frees."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.examples.digits import DigitsCNN, load_digits_data
from fxcompress.passes.eliminate_dead_nodes import EliminateDeadNodes


def _run(model: nn.Module, x, **options) -> fxcompress.Result:
    entry = ("eliminate_dead_nodes", options) if options else "eliminate_dead_nodes"
    return fxcompress.run(model.eval(), [entry], x)


def _row(result: fxcompress.Result):
    (row,) = result.report.rows
    return row


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _assert_same_outputs(model: nn.Module, gm: fx.GraphModule, *inputs) -> None:
    with torch.no_grad():
        expected, got = model(*inputs), gm(*inputs)
    for a, b in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b), "eliminate_dead_nodes must not change a single bit"


class DeadBranches(nn.Module):
    """A head computed and thrown away, an unused parameter, an unused method call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.unused_head = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
        self.unused_scale = nn.Parameter(torch.randn(1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        self.unused_head(h)
        _ = self.unused_scale
        h.sum(dim=0)
        return torch.tanh(h)


def test_removes_dead_nodes_and_frees_their_state():
    model = DeadBranches()
    x = torch.randn(4, 8)
    result = _run(model, x)
    gm, row = result.model, _row(result)

    assert row.modified
    assert _targets(gm) == ["body", torch.tanh]
    assert not hasattr(gm, "unused_head") and not hasattr(gm, "unused_scale")
    freed = 4 * (8 * 64 + 64 + 64 * 3 + 3 + 1000)
    assert row.stats["bytes_freed"] == freed
    assert result.report.before.state_bytes - result.report.after.state_bytes == freed
    assert row.stats["dead_nodes"] == 4  # three head layers and the sum
    assert row.stats["get_attr"] == 1
    assert row.stats["submodules"] == 4 and row.stats["parameters"] == 5
    _assert_same_outputs(model, gm, x)
    assert hasattr(model, "unused_head"), "the caller's model keeps everything"


def test_clean_graph_is_not_modified():
    model = DigitsCNN().eval()
    x = load_digits_data().test_x[:16]
    result = _run(model, x)
    assert not _row(result).modified
    assert _row(result).stats == {"bytes_freed": 0}
    assert len(result.model.graph.nodes) == result.report.before.nodes


class EvalNoOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.drop2d = nn.Dropout2d(0.3)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop2d(self.ident(self.conv(x)))
        h = F.dropout(h, 0.2, training=self.training)
        h = torch.relu(h)
        return self.drop(h.flatten(1))


def test_eval_mode_no_ops_are_removed():
    model = EvalNoOps()
    x = torch.randn(2, 3, 8, 8)
    result = _run(model, x)
    gm, stats = result.model, _row(result).stats
    assert _targets(gm) == ["conv", torch.relu, "flatten"]
    assert stats["dropout"] == 3 and stats["identity"] == 1
    assert stats["submodules"] == 3
    assert set(dict(gm.named_children())) == {"conv"}
    _assert_same_outputs(model, gm, x)


def test_dropout_in_training_is_kept(rel_err):
    model = EvalNoOps().eval()
    model.drop2d.train()  # one dropout still training: random, not a no-op
    x = torch.randn(2, 3, 8, 8)
    gm = fxcompress.run(model, ["eliminate_dead_nodes"], x).model
    assert "drop2d" in _targets(gm)
    assert "drop" not in _targets(gm) and "ident" not in _targets(gm)


class Randomness(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.randn_like(x)  # unused, but it advances the RNG
        self.drop(x)  # unused dropout in training: also random
        torch.rand(x.shape[0])
        return x * 2


def test_unused_random_ops_survive():
    model = Randomness()
    x = torch.randn(4, 5)
    gm = fxcompress.trace(model.eval(), x)
    model.drop.train()  # the module object is shared with gm
    result = EliminateDeadNodes()(gm, fxcompress.PassContext(example_args=(x,)))
    assert not result.modified
    assert result.stats["kept"] == {"random": 3}
    assert {torch.randn_like, torch.rand, "drop"} <= set(_targets(result.gm))


class Asserting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == 5, "five features")
        return x + 1


def test_asserts_survive():
    model = Asserting()
    x = torch.randn(2, 5)
    result = _run(model, x)
    assert torch._assert in _targets(result.model)
    assert _row(result).stats.get("kept") == {"side effect": 1}


class InPlace(nn.Module):
    """In-place writes whose result is unused but whose effect is observed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h.mul_(2)  # result unused; h is read below
        self.act(h)  # result unused; h is read below
        t = h * 3
        t.add_(1)  # t is fresh and read by nothing else: this write is dead
        return h - 1


def test_in_place_writes_survive_unless_private():
    model = InPlace()
    x = torch.randn(2, 3, 6, 6)
    result = _run(model, x)
    gm = result.model
    assert _targets(gm) == ["conv", "mul_", "act", operator.sub]
    assert _row(result).stats["dead_nodes"] == 2  # the private write and the fresh tensor it wrote
    assert _row(result).stats["kept"] == {"in-place": 2}
    _assert_same_outputs(model, gm, x)


class Copies(nn.Module):
    """Copies that can go and copies that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        a = torch.relu(h.clone())  # needless
        b = torch.sigmoid(((h * 1) + 0) - 0)  # needless arithmetic
        c = torch.tanh(1 * (h / 1))  # needless arithmetic, scalar on the left too
        d = h.clone()
        d.mul_(2)  # the copy is written: it must stay
        e = h.clone()  # returned directly: the caller owns it
        f = torch.relu(h).contiguous()  # already row-major: a no-op
        g = h * 2  # not neutral
        k = 0 - h  # not neutral
        m = torch.div(h, 1, rounding_mode="floor")  # an extra argument: not x/1
        return a, b, c, d + h, e, f.view(2, -1), g, k, m


def test_needless_copies_are_removed_but_needed_ones_stay():
    model = Copies()
    x = torch.randn(2, 3, 6, 6)
    result = _run(model, x)
    gm, stats = result.model, _row(result).stats
    assert stats["clone"] == 1
    assert stats["arithmetic"] == 5
    assert stats["contiguous"] == 1
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert methods.count("clone") == 2 and "contiguous" not in methods
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert relu.args[0].target == "conv"
    _assert_same_outputs(model, gm, x)


class CopyBeforeSourceWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 3
        c = h.clone()  # keeps the values from before the write below
        h.add_(1)
        return c * h


def test_copy_of_a_value_written_later_stays():
    model = CopyBeforeSourceWrite()
    x = torch.randn(3, 4)
    result = _run(model, x)
    assert "clone" in _targets(result.model)
    _assert_same_outputs(model, result.model, x)


class Layouts(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = x.permute(0, 2, 3, 1).contiguous().view(x.shape[0], -1)  # needed: permuted strides
        q = torch.relu(x).contiguous()  # row-major already, but needless only if no dim is 1
        return p, q * 2


@pytest.mark.parametrize(("batch", "removed"), [(2, 1), (1, 0)])
def test_contiguous_only_goes_where_layout_is_known(batch, removed):
    model = Layouts()
    x = torch.randn(batch, 3, 4, 5)
    result = _run(model, x)
    assert _row(result).stats.get("contiguous", 0) == removed
    assert [n.target for n in result.model.graph.nodes].count("contiguous") == 2 - removed
    _assert_same_outputs(model, result.model, x)
    # still right on another batch size (a size-1 dim hides the layout of larger ones)
    x3 = torch.randn(3, 3, 4, 5)
    _assert_same_outputs(model, result.model, x3)


class IntegerDivide(nn.Module):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx / 1) + (idx * 1)


def test_arithmetic_that_changes_dtype_stays():
    model = IntegerDivide()
    idx = torch.arange(6).reshape(2, 3)
    result = _run(model, idx)
    assert _row(result).stats.get("arithmetic") == 1  # idx * 1 stays int64: removable
    assert operator.truediv in _targets(result.model)
    _assert_same_outputs(model, result.model, idx)


class Marked(nn.Module):
    """A module that declares it writes into its first argument (like oneDNN's fused sum)."""

    mutates_args = (0,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1)


class Logged(nn.Module):
    fxc_impure = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class UsesMarked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.marked, self.logged = Marked(), Logged()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        self.logged(h)
        self.marked(h)  # the last reader of h, as verify.py requires of a writer
        return x + 1


def test_marked_modules_survive():
    model = UsesMarked()
    x = torch.randn(3)
    result = fxcompress.run(model, ["eliminate_dead_nodes"], x, leaf_modules=[Marked, Logged])
    assert {"marked", "logged"} <= set(_targets(result.model))
    assert _row(result).stats.get("kept") == {"marked impure": 2}
    _assert_same_outputs(model, result.model, x)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = DeadBranches()
        self.b = DeadBranches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("options", "cleaned"), [({"scope": ["a"]}, "a"), ({"skip": ["a.*"]}, "b")])
def test_scope_and_skip_limit_removal(options, cleaned):
    model = TwoBlocks()
    x = torch.randn(2, 8)
    gm = _run(model, x, **options).model
    kept = "b" if cleaned == "a" else "a"
    assert not hasattr(gm.get_submodule(cleaned), "unused_head")
    assert not hasattr(gm.get_submodule(cleaned), "unused_scale")
    assert hasattr(gm.get_submodule(kept), "unused_head")
    assert f"{kept}.unused_head.0" in _targets(gm)
    assert f"{cleaned}.unused_head.0" not in _targets(gm)
    _assert_same_outputs(model, gm, x)


class FunctionalBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.register_buffer("mean", torch.randn(16))
        self.register_buffer("var", torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, None, None, False)


def test_frees_what_fusion_leaves_behind(rel_err):
    """fuse_conv_bn bypasses a functional BN; eliminate_dead_nodes deletes its buffers."""
    model = FunctionalBn().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxcompress.run(model, ["fuse_conv_bn", "eliminate_dead_nodes"], x)
    fuse_row, edn_row = result.report.rows
    assert fuse_row.stats["fused"] == 1
    assert edn_row.stats["buffers"] == 2 and edn_row.stats["bytes_freed"] == 2 * 16 * 4
    assert not hasattr(result.model, "mean") and not hasattr(result.model, "var")
    with torch.no_grad():
        assert rel_err(model(x), result.model(x)) <= 1e-5
