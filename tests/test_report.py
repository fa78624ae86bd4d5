"""The report: figures measured on the graph, one row per pass, and the same content as a
dict, JSON, markdown and text."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.pass_base import Pass, PassResult
from fxcompress.report import Report, snapshot, state_bytes, weight_count

torch.set_num_threads(1)


@dataclass(frozen=True)
class Shrink(Pass):
    """Replaces the first linear by a narrower one and says so in its stats and notes."""

    name = "trep_shrink"

    def __call__(self, gm, ctx):
        gm.head = nn.Sequential(nn.Linear(6, 6))
        return PassResult(gm, True, {"replaced": 1, "by_kind": {"linear": 1}, "notes": ["narrowed nothing"]})


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(6, 6))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


X = torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def report() -> Report:
    result = fxcompress.run(Tiny().eval(), ["fuse_conv_bn", Shrink()], X, check="full", progress=False,
                            eval_fn=lambda m: 0.5)
    return result.report


def test_snapshot_figures_are_measured():
    model = Tiny().eval()
    gm = fxcompress.trace(model, X)
    snap = snapshot(gm)
    params = sum(p.numel() for p in model.parameters())
    assert (snap.nodes, snap.parameters) == (len(gm.graph.nodes), params)
    assert snap.state_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # conv: 4x6x6 outputs x 3x3x3 taps; linear: 4x6x6 outputs x 6 inputs.
    assert snap.macs == 4 * 6 * 6 * 27 + 4 * 6 * 6 * 6


def test_tied_weights_count_once_and_int8_weights_count_as_weights():
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert weight_count(tied) == 40 and state_bytes(tied) == 160

    class Int8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.zeros(10, 4, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(10))

    lowered = Int8Linear()
    assert weight_count(lowered) == 40 and state_bytes(lowered) == 40 + 40
    assert weight_count(nn.BatchNorm1d(4)) == 8  # running statistics are not weights


def test_rows_follow_the_passes(report):
    assert [r.name for r in report.rows] == ["fuse_conv_bn", "trep_shrink"]
    fuse, shrink = report.rows
    assert fuse.modified and fuse.stats["fused"] == 1 and fuse.after.nodes == report.before.nodes - 1
    assert shrink.stats["replaced"] == 1 and shrink.seconds >= 0
    assert report.after == shrink.after
    assert report.notes == ["trep_shrink: narrowed nothing"]
    assert report.metrics["task metric"] == {"before": 0.5, "after": 0.5, "change": "+0"}


def test_to_dict_and_json_carry_the_same_content(report):
    d = report.to_dict()
    assert set(d) == {"before", "after", "passes", "notes", "metrics"}
    assert d["passes"][0]["name"] == "fuse_conv_bn" and d["passes"][0]["after"]["nodes"] == report.rows[0].after.nodes
    assert d["after"] == {"nodes": report.after.nodes, "parameters": report.after.parameters,
                          "state_bytes": report.after.state_bytes, "macs": report.after.macs}
    assert json.loads(report.to_json()) == json.loads(json.dumps(d))
    assert "\n" not in report.to_json(indent=None)


def test_markdown_and_text_render_every_pass_and_the_summary(report):
    md = report.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| pass ") and set(lines[1]) <= set("|-: ")
    text = str(report)
    for rendered in (md, text):
        assert "fuse_conv_bn" in rendered and "trep_shrink" in rendered and "(input)" in rendered
        assert "fused=1" in rendered and "by_kind(linear=1)" in rendered and "notes=" not in rendered
        assert "state_bytes" in rendered and "task metric" in rendered and "- trep_shrink: narrowed nothing" in rendered


def test_an_empty_report_renders():
    gm = fxcompress.trace(Tiny().eval(), X)
    empty = Report(before=snapshot(gm))
    assert empty.after == empty.before and "(input)" in str(empty)
    assert empty.to_dict()["passes"] == []


@dataclass(frozen=True)
class ManyStats(Pass):
    """Reports a stat with many entries, as pruning a large model does."""

    name = "tr_many_stats"

    def __call__(self, gm, ctx):
        per_group = {f"layer{i}.conv{j}": f"{j}/64" for i in range(6) for j in range(5)}
        return PassResult(gm, False, {"groups": 30, "per_group": per_group, "fallbacks": list(range(12))})


def test_long_stats_are_shortened_and_wrapped_but_kept_whole_in_to_dict():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    report = fxcompress.run(model, [ManyStats()], torch.randn(2, 4), progress=False).report
    text = str(report)
    assert max(len(line) for line in text.splitlines()) < 200
    words = " ".join(text.split())  # the wrapped column, read as one line
    assert "... 26 more" in words and "... 8 more" in words
    assert len(report.to_dict()["passes"][0]["stats"]["per_group"]) == 30
    assert "\n" not in report.to_markdown().split("\n\n")[0].splitlines()[2]  # one markdown row per pass


def test_the_summary_keeps_counts_as_written_next_to_a_task_metric():
    model = nn.Sequential(nn.Linear(400, 3000), nn.ReLU(), nn.Linear(3000, 10)).eval()
    x = torch.randn(2, 400)
    report = fxcompress.run(model, [], x, eval_fn=lambda m: 0.123456, progress=False).report
    summary = str(report).split("\n\n")[1]
    assert "1,233,010" in summary and "e+0" not in summary  # parameters as written, no scientific notation
    assert "0.1235" in summary
