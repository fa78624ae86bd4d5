"""Where onnxruntime departs from fxcompress, per lowered op, teacher-forced.

Each lowered module of the model sees its own inputs (recorded with forward hooks on
fxcompress's lowered model); its QDQ twin (``fxcompress.onnx_forms.onnx_form``) is exported
alone and run by onnxruntime with all graph optimizations on (so a conv runs as QLinearConv
where onnxruntime fuses it) on exactly those inputs. The table: op, path, max code diff and
fraction of differing codes (uint8 outputs), or the max relative diff (float outputs).
Not measured here: end to end (each op fed ORT's own upstream codes).

``python benchmarks/onnx_layer_diff.py [--models resnet18 mobilenet_v2] [--n 2] [--size 224]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, weights_for_this_cpu  # noqa: E402
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
            rows.append([kind, path, int(diff.max()), f"{(diff > 0).float().mean().item():.1e}", "uint8"])
        else:
            rel = ((theirs - out.float()).abs().max() / out.float().abs().max().clamp_min(1e-30)).item()
            rows.append([kind, path, f"{rel:.2e} (rel)", "", "float"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--for-onnxruntime", action="store_true",
                        help="lower with recipes.int8_static(for_onnxruntime=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _, weights = weights_for_this_cpu()
    x, calibration = photo_crops(args.n, args.size, seed=0), photo_crops(16, args.size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ours = lowered(build(name), calibration, weights, for_onnxruntime=args.for_onnxruntime)
            print(f"\n## {name} (teacher-forced, {args.n} inputs, {args.size} px)\n")
            print(markdown_table(layer_rows(ours, x, Path(tmp)),
                                 ["op", "path", "max code diff", "fraction differing", "out"]), flush=True)


if __name__ == "__main__":
    main()
