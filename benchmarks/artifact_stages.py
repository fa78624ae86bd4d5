"""Artifacts at every stage of int8_static and int8_qat: size, save and load time, bit-identical reload.

The digits CNN (trained on scikit-learn's digits) and resnet18 from the zoo
(realistic random weights, 64x64 inputs as in ``tests/artifact/test_artifact_stages.py``,
whose resnet18 cases are marked slow) run each recipe pass by pass (``backend="reference"``
for the lowering, exact on every CPU); after each pass the model is saved and
loaded back.  "equal" means the loaded model's outputs on two batches and every
state tensor are bit-identical (``torch.equal``) to the saved model's.  The
save includes the save-time rebuild check of the quantization modules
(``register_module(..., check=True)``) and the fsyncs; times are medians of
``--runs`` saves and loads, files in a temporary directory.

Usage: ``python benchmarks/artifact_stages.py [--runs 3]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxcompress
from _common import markdown_table, write_section
from fxcompress import artifact, recipes, zoo
from fxcompress.examples import digits

RECIPES = {
    "int8_static": recipes.int8_static(backend="reference"),
    "int8_qat (learnable scales)": [("to_fake_quant", {"learnable_scale": True}) if e == "to_fake_quant" else e
                                    for e in recipes.int8_qat(steps=3, lr=1e-3, backend="reference")],
}


def _digits() -> tuple[torch.nn.Module, torch.Tensor, list]:
    data = digits.load_digits_data()
    return (digits.pretrained_digits_cnn(), data.test_x[:16],
            [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 128, 32)])


def _resnet18() -> tuple[torch.nn.Module, torch.Tensor, list]:
    gen = torch.Generator().manual_seed(1)
    return (zoo.build("resnet18"), zoo.example_input("resnet18", batch=2, reduced=True),
            [(zoo.example_input("resnet18", batch=2, reduced=True, seed=s), torch.randint(0, 1000, (2,), generator=gen))
             for s in (1, 2)])


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor, list]]] = {
    "digits CNN": _digits, "resnet18 (64 px)": _resnet18}


def _median_time(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _equal(saved: torch.fx.GraphModule, loaded: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> bool:
    a, b = saved.state_dict(), loaded.state_dict()
    same_state = a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # observers record what they see: run on copies
        s, lo = copy.deepcopy(saved), copy.deepcopy(loaded)
        same_outputs = all(torch.equal(s(x), lo(x)) for x in inputs)
    return same_state and same_outputs


def measure(model_name: str, recipe: str, d: Path, runs: int) -> list[list]:
    model, x, batches = MODELS[model_name]()
    rows, gm = [], model
    for entry in RECIPES[recipe]:
        name = entry if isinstance(entry, str) else entry[0]
        result = fxcompress.run(gm, [entry], x, calibration_data=batches, loss_fn=F.cross_entropy, progress=False)
        gm = result.model
        path = d / f"{name}.fxc"
        save_s, _ = _median_time(lambda: artifact.save(result, path, overwrite=True), runs)
        load_s, loaded = _median_time(lambda: artifact.load(path), runs)
        rows.append([model_name, recipe, name, f"{path.stat().st_size / 2**20:.2f} MiB", f"{save_s * 1e3:.0f} ms",
                     f"{load_s * 1e3:.0f} ms", "yes" if _equal(gm, loaded, [x, batches[0][0]]) else "NO"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in MODELS:
            for recipe in RECIPES:
                rows += measure(model_name, recipe, Path(tmp), args.runs)
    body = markdown_table(rows, ["model", "recipe", "after pass", "artifact", "save", "load", "equal"])
    print(body)
    assert all(r[-1] == "yes" for r in rows), "every stage must load back bit-identical"
    write_section("artifact_stages", f"Artifacts at every int8 stage ({args.runs} runs)", body)


if __name__ == "__main__":
    main()
