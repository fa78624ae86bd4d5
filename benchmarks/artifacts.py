"""Artifacts of resnet50: size, save and load time, and the loaded model's speed.

resnet50 from the zoo (realistic random weights), traced with
``torch.fx.symbolic_trace``, is saved as an artifact and loaded back; the
peers are ``torch.save``/``torch.load(weights_only=True)`` of the state dict
(weights only: loading them still needs the model's code) and
``torch.export.save``/``load`` (a ``.pt2`` program).  Times are medians of
``--runs`` runs, files in a temporary directory (page cache warm).  The
loaded artifact's latency is compared with the original's by
``fxcompress.bench.compare`` (interleaved rounds, 1 thread, batch 1, 224x224);
the target is a ratio of at most 1.05.  When the int8 lowering passes are
registered, the int8_static recipe's artifact is measured too (target: at
most 0.27 of the float state dict).

Usage: ``python benchmarks/artifacts.py [--runs 5] [--no-export]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx

import fxcompress
from _common import markdown_table, write_section
from fxcompress import artifact, bench, recipes, zoo

MODEL = "resnet50"


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median wall time of ``runs`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure_formats(gm: fx.GraphModule, x: torch.Tensor, d: Path, runs: int, export: bool) -> tuple[list, fx.GraphModule]:
    """Rows (format, bytes, save s, load s) and the loaded artifact."""
    sd_path, art_path, pt2_path = d / "state.pt", d / "model.fxc", d / "model.pt2"
    rows = []
    save_s, _ = timed(lambda: torch.save(gm.state_dict(), sd_path), runs)
    load_s, _ = timed(lambda: torch.load(sd_path, weights_only=True), runs)
    rows.append(["torch.save(state_dict)", sd_path.stat().st_size, save_s, load_s])
    save_s, _ = timed(lambda: artifact.save(gm, art_path, overwrite=True), runs)
    load_s, loaded = timed(lambda: artifact.load(art_path), runs)
    rows.append(["fxcompress artifact", art_path.stat().st_size, save_s, load_s])
    if export:
        program = torch.export.export(gm, (x,))
        save_s, _ = timed(lambda: torch.export.save(program, pt2_path), runs)
        load_s, _ = timed(lambda: torch.export.load(pt2_path), runs)
        rows.append(["torch.export .pt2", pt2_path.stat().st_size, save_s, load_s])
    return rows, loaded


def measure_int8(model: torch.nn.Module, x: torch.Tensor, d: Path, float_bytes: int) -> list | None:
    """(bytes, ratio to the float state dict) of the int8_static artifact, when lowering exists."""
    pipeline = recipes.int8_static()
    names = {e if isinstance(e, str) else e[0] for e in pipeline}
    if not names <= set(fxcompress.available_passes()):
        return None
    calibration = [zoo.example_input(MODEL, batch=4, seed=s) for s in range(4)]
    result = fxcompress.run(model, pipeline, x, calibration_data=calibration, progress=False)
    result.save(d / "int8.fxc")
    size = (d / "int8.fxc").stat().st_size
    return [size, size / float_bytes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-export", action="store_true", help="skip the torch.export peer (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = zoo.build(MODEL)
    gm = fx.symbolic_trace(model)
    x = zoo.example_input(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows, loaded = measure_formats(gm, x, d, args.runs, not args.no_export)
        float_bytes = rows[0][1]
        int8 = measure_int8(model, x, d, float_bytes)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x)), "the loaded artifact must compute exactly what was saved"
    comparison = bench.compare(gm, loaded, x, threads=(1,), min_run_time=4.0, rounds=8)
    latency = comparison.original.latency[1], comparison.compressed.latency[1]

    size_rows = [[name, f"{size / 2**20:.2f} MiB", f"{size / float_bytes:.4f}", f"{save_s * 1e3:.0f} ms",
                  f"{load_s * 1e3:.0f} ms"] for name, size, save_s, load_s in rows]
    tables = [markdown_table(size_rows, ["format", "size", "size / state dict", "save", "load"]),
              "The artifact's save includes its fsyncs (file and directory) and its load every integrity "
              "check (SHA-256 of every member, the canonical-layout check) and rebuilding the GraphModule; "
              "the state dict's load gives tensors only, without the model."]
    tables.append(markdown_table(
        [["traced original", f"{latency[0].median * 1e3:.2f} ms", f"{latency[0].iqr * 1e3:.2f} ms"],
         ["loaded artifact", f"{latency[1].median * 1e3:.2f} ms", f"{latency[1].iqr * 1e3:.2f} ms"],
         ["ratio (target <= 1.05)", f"{latency[1].median / latency[0].median:.3f}", ""]],
        ["latency, 1 thread, batch 1", "median", "IQR"]))
    if int8 is None:
        tables.append("The int8 artifact is not measured: the lowering passes are not registered in this build.")
    else:
        tables.append(markdown_table([["int8_static artifact", f"{int8[0] / 2**20:.2f} MiB", f"{int8[1]:.4f}"]],
                                     ["lowered model", "size", "size / float state dict (target <= 0.27)"]))
    body = "\n\n".join(tables)
    print(body)
    write_section("artifacts", f"Artifacts ({MODEL}, {args.runs} runs)", body)


if __name__ == "__main__":
    main()
