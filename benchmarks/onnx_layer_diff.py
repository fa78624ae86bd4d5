"""Where onnxruntime departs from fxcompress, per lowered op, teacher-forced.

Each lowered module of the model sees its own inputs (recorded with forward hooks on
fxcompress's lowered model); its QDQ twin (``fxcompress.onnx_forms.onnx_form``) is exported
alone and run by onnxruntime with all graph optimizations on (so a conv runs as QLinearConv
where onnxruntime fuses it) on exactly those inputs. Two builds of each model: the default
``recipes.int8_static`` and ``recipes.int8_static(for_onnxruntime=True)`` (separate residual
adds, activation tables after convs, int32 biases, ``lower(arithmetic="onnxruntime")``). The section: per build and op kind,
how many uint8 output codes onnxruntime computes differently (and by how much at most), and
the largest relative difference of float outputs. ``--detail`` prints every op.
Not measured here: end to end (each op fed ORT's own upstream codes: benchmarks/deploy.py).

``python benchmarks/onnx_layer_diff.py [--models resnet18 mobilenet_v2] [--n 2] [--size 224] [--detail]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, weights_for_this_cpu, write_section  # noqa: E402
from _photos import photo_crops  # noqa: E402
from deploy import build, lowered  # noqa: E402


def layer_rows(model: torch.nn.Module, x: torch.Tensor, workdir: Path) -> list[list]:
    import onnxruntime as ort

    from fxcompress.onnx_forms import NO_FORM, onnx_form
    from fxcompress.quant.contract import lowered_module_io

    seen = lowered_module_io(model, x)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rows = []
    for path, (args, out) in seen.items():
        module = model.get_submodule(path)
        twin = onnx_form(module)
        if twin is NO_FORM or isinstance(twin, str):
            rows.append([type(module).__name__, path, "no form", "", ""])
            continue
        file = workdir / "op.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(twin, tuple(args), str(file), dynamo=True, verbose=False)
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.contiguous().numpy() for i, a in zip(session.get_inputs(), args)}
        theirs = torch.from_numpy(session.run(None, feeds)[0])
        kind = type(module).__name__ + ("+res" if getattr(module, "residual", False) else "") + (
            f"[{module.post_op}]" if getattr(module, "post_op", "none") != "none" else "")
        if out.dtype == torch.uint8:
            diff = (theirs.int() - out.int()).abs()
            rows.append([kind, path, int(diff.max()), int((diff > 0).sum()), out.numel()])
        else:
            rel = ((theirs - out.float()).abs().max() / out.float().abs().max().clamp_min(1e-30)).item()
            rows.append([kind, path, rel, None, out.numel()])
    return rows


def summary(rows: list[list]) -> list[list]:
    """Per op kind: ops, uint8 outputs, differing codes, max code diff; float ops: max rel diff."""
    kinds: dict[str, list] = {}
    for kind, _, worst, differing, numel in rows:
        if worst == "no form":
            continue
        k = kinds.setdefault(kind, [0, 0, 0, 0, 0.0, False])
        k[0] += 1
        if differing is None:
            k[4], k[5] = max(k[4], worst), True
        else:
            k[1] += numel
            k[2] += differing
            k[3] = max(k[3], worst)
    return [[kind, n, f"{codes:,}" if codes else "-", f"{diff:,}" if codes else "-",
             (str(worst) if codes else "-"), f"{rel:.1e}" if is_float else "-"]
            for kind, (n, codes, diff, worst, rel, is_float) in sorted(kinds.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--detail", action="store_true", help="print every op's row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    label, weights = weights_for_this_cpu()
    x, calibration = photo_crops(args.n, args.size, seed=0), photo_crops(16, args.size, seed=1)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for build_name, for_ort in (("default", False), ("built for ORT", True)):
                ours = lowered(build(name), calibration, weights, for_onnxruntime=for_ort)
                rows = layer_rows(ours, x, Path(tmp))
                if args.detail:
                    print(f"\n## {name}, {build_name}\n")
                    print(markdown_table(rows, ["op", "path", "max diff", "differing codes", "outputs"]), flush=True)
                table += [[name, build_name, *row] for row in summary(rows)]
                print(table[-1], flush=True)
    body = (f"Weights: {label}. Teacher forced: every lowered op of each model, fed the inputs it sees on "
            f"{args.n} photo crops ({args.size} px), against its QDQ twin run alone by onnxruntime (all graph "
            f"optimizations on, 1 thread).\n\n"
            + markdown_table(table, ["model", "build", "op", "ops", "uint8 outputs", "differing codes",
                                     "max code diff", "float out: max rel diff"])
            + "\n\n*default*: `recipes.int8_static` (fused residual sums, oneDNN's rounding order); onnxruntime "
              "runs its convs with a fused add in float and requantizes the others its own way. *built for ORT*: "
              "`recipes.int8_static(for_onnxruntime=True)`: separate uint8 adds, SiLU/hardswish/GELU/sigmoid after "
              "convs as uint8 tables (QuantTable: ONNX GatherElements), squeeze-excitation pools and products on codes, "
              "int32 biases and `lower(arithmetic=\"onnxruntime\")`, whose QuantConv / QuantAdd / QuantMul / "
              "QuantAdaptiveAvgPool2d / Quantize compute onnxruntime's QLinearConv / QLinearAdd / QLinearMul / "
              "QLinearGlobalAveragePool / QuantizeLinear codes. Float outputs (a last conv, the classifier) run in "
              "float in onnxruntime on both builds; so do the default build's convs with a fused SiLU.")
    print(body)
    write_section("onnx_layer_diff", "onnxruntime vs fxcompress per op (teacher forced)", body)


if __name__ == "__main__":
    main()
