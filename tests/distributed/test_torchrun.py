"""Two real processes under torchrun (gloo on the CPU): calibration across ranks equals one process,
sensitivity entries are bit for bit the single-process ones, DDP fine-tuning ends with equal weights,
only rank 0 writes the artifact, and a rank that raises ends both ranks with its error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress.distributed import World, check_backend, shard
from fxcompress.errors import DistributedError

sys.path.insert(0, str(Path(__file__).parent))
from _common import BATCHES, EXAMPLE, HISTOGRAM_PIPELINE, PIPELINE, model, qparams_of, sensitivity_of  # noqa: E402

WORKER = Path(__file__).parent / "_worker.py"


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), mode, str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("torchrun")
    proc = _torchrun("ok", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_calibration_across_ranks_equals_one_process(two_ranks) -> None:
    _, ranks = two_ranks
    single = fxcompress.run(model(), PIPELINE, EXAMPLE, calibration_data=BATCHES, progress=False)
    expected = qparams_of(single.model)
    for record in ranks:
        assert record["qparams"] == expected  # min/max observers: bit for bit
        stats = record["calibrate"]
        assert stats["batches"] == 7 and stats["samples"] == sum(len(b) for b in BATCHES)
        assert stats["ranks"] == 2 and stats["samples_per_rank"] == [sum(len(b) for b in shard(BATCHES, World(r, 2)))
                                                                      for r in range(2)]
        assert any("uneven shards" in n for n in stats["notes"])


def test_histogram_calibration_across_ranks_is_within_the_merge_guarantee(two_ranks) -> None:
    _, ranks = two_ranks
    single = qparams_of(fxcompress.run(model(), HISTOGRAM_PIPELINE, EXAMPLE, calibration_data=BATCHES,
                                       progress=False).model)
    assert ranks[0]["histogram"] == ranks[1]["histogram"]  # every rank merged the same way
    for name, expected in single.items():
        merged = ranks[0]["histogram"][name]
        assert merged["min"] == expected["min"] and merged["max"] == expected["max"]  # exact
        assert merged["seen"] == expected["seen"]
        # the range search runs on re-binned counts: within a few bin widths of one process
        width = (expected["max"][0] - min(expected["min"][0], 0.0)) / 2048
        assert abs(merged["scale"][0] - expected["scale"][0]) * 255 <= 8 * width + 1e-6, name


def test_sensitivity_split_across_ranks_is_bit_identical(two_ranks) -> None:
    _, ranks = two_ranks
    torch.set_num_threads(1)
    expected = sensitivity_of(None)
    assert ranks[0]["sensitivity"] == expected and ranks[1]["sensitivity"] == expected


def test_ddp_finetuning_ends_with_equal_weights_on_every_rank(two_ranks) -> None:
    _, ranks = two_ranks
    # parameters agree bit for bit (BatchNorm running statistics are each rank's own, as in DDP)
    assert ranks[0]["finetuned"] == ranks[1]["finetuned"]
    assert ranks[0]["finetuned"] != [p.detach().reshape(-1).tolist() for p in model().parameters()]  # it trained


def test_only_rank_zero_writes_the_artifact(two_ranks) -> None:
    out, ranks = two_ranks
    assert (out / "model-rank0.fxc").exists() and not (out / "model-rank1.fxc").exists()
    assert ranks[0]["artifact"] == ranks[1]["artifact"]  # rank 1 got rank 0's artifact id
    loaded = fxcompress.load(out / "model-rank0.fxc")
    with torch.no_grad():
        assert torch.isfinite(loaded(EXAMPLE)).all()


def test_a_rank_that_raises_ends_both_with_its_error(tmp_path: Path) -> None:
    proc = _torchrun("fail", tmp_path)
    assert proc.returncode != 0
    for r in range(2):
        message = (tmp_path / f"rank{r}.err").read_text()
        assert "calibrate failed on 1 of 2 ranks" in message and "rank 1 raised CalibrationDataError" in message
        assert "NaN" in message
    assert not list(tmp_path.glob("*.fxc"))  # nothing was written


def test_a_backend_that_cannot_carry_the_tensors() -> None:
    with pytest.raises(DistributedError, match=r"backend 'nccl' cannot carry cpu tensors.*gloo"):
        check_backend("nccl", "cpu", "calibration observers")
    check_backend("gloo", "cpu", "calibration observers")
    check_backend("cpu:gloo,cuda:nccl", "cpu", "gradients")
    with pytest.raises(DistributedError, match="cuda"):
        check_backend("cpu:gloo", "cuda", "gradients")
