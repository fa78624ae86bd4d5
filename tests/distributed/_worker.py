"""What each torchrun rank runs for tests/distributed/test_torchrun.py (not a test module itself).

Usage: ``torchrun --nproc_per_node=2 _worker.py MODE OUT``.  Every rank builds the same
seeded digits CNN, takes its shard of the digits batches, and writes what it computed to
``OUT/rank<r>.json`` (the test compares the ranks with one process); MODE ``fail`` puts a
NaN batch into rank 1's shard and records each rank's error in ``OUT/rank<r>.err``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

import fxcompress  # noqa: E402
from fxcompress import distributed  # noqa: E402
from fxcompress.errors import DistributedError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import BATCHES, EXAMPLE, HISTOGRAM_PIPELINE, PIPELINE, model, qparams_of, sensitivity_of  # noqa: E402


def main(mode: str, out: Path) -> int:
    dist.init_process_group("gloo")
    w = distributed.world()
    data = distributed.shard(BATCHES, w)
    if mode == "fail" and w.rank == 1:
        data[0] = torch.full_like(data[0], float("nan"))
    try:
        result = fxcompress.run(model(), PIPELINE, EXAMPLE, calibration_data=data, progress=False)
        folded = fxcompress.run(result.model, ["fold_fake_quant", ("lower", {"backend": "reference"}), "eliminate_dead_nodes"],
                                EXAMPLE, progress=False)
        artifact = folded.save(out / f"model-rank{w.rank}.fxc")
    except DistributedError as exc:
        (out / f"rank{w.rank}.err").write_text(str(exc))
        dist.destroy_process_group()
        return 3
    record = {"qparams": qparams_of(result.model), "artifact": artifact,
              "calibrate": result.report.rows[-1].stats}
    histogram = fxcompress.run(model(), HISTOGRAM_PIPELINE, EXAMPLE, calibration_data=data, progress=False)
    record["histogram"] = qparams_of(histogram.model)
    record["sensitivity"] = sensitivity_of(w)
    tuned = model()
    fxcompress.finetune(tuned, [b for b in data], None, steps=3, lr=1e-3, teacher=model(), progress=False)
    record["finetuned"] = [p.detach().reshape(-1).tolist() for p in tuned.parameters()]
    (out / f"rank{w.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
