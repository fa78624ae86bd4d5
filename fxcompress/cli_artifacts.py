"""The ``fxcompress`` subcommands for the artifacts a team keeps: ``inspect``, ``compare``,
``export-onnx`` (wired into the parser by :mod:`fxcompress.cli`).

``inspect ARTIFACT [--public-key FILE] [--json]``
    the manifest (versions, model, members), the pipeline, the report's before/after
    figures, the signature, the recorded inputs, and the history: every earlier step this
    model went through (artifact format 2 records it; a format-1 artifact shows its
    ``parent`` id only).
``compare ORIGINAL COMPRESSED --data FILE|digits [--threads 1,2] [--compiled] [--json]``
    :func:`fxcompress.bench.compare` of two artifacts on inputs from ``--data``: a ``.pt``
    file holding a tensor (rows along dim 0, loaded with ``weights_only=True``) or ``.npy``;
    ``digits`` is scikit-learn's digits test split (for models on the digits).
``export-onnx ARTIFACT OUT.onnx [--opset N] [--public-key FILE] [--overwrite] [--static-batch] [--form qdq|integer]``
    :func:`fxcompress.export_onnx` of a loaded artifact; with ``--public-key`` the artifact
    must carry a valid signature by that key (an unsigned one is refused), checked before
    anything is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError, IntegrityError

__all__ = ["add_parsers", "history_of"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect``, ``compare`` and ``export-onnx`` to the command's subparsers."""
    p = sub.add_parser("inspect", help="show an artifact's manifest, pipeline, report, signature and history")
    p.add_argument("path", metavar="ARTIFACT")
    _signed_by(p, "also require a valid signature by this key")
    _json_flag(p, "print the manifest and history as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("compare", help="compare two artifacts: size, MACs, latency, output agreement")
    for name in ("original", "compressed"):
        p.add_argument(name, metavar=name.upper())
    p.add_argument("--data", required=True, metavar="FILE|digits",
                   help="inputs: a .pt tensor or .npy array (rows along dim 0), or 'digits'")
    p.add_argument("--threads", default="1", help="comma-separated thread counts to time (default 1)")
    p.add_argument("--compiled", action="store_true", help="also time both models under torch.compile")
    _json_flag(p, "machine-readable output")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("export-onnx", help="write an artifact's model as ONNX (static int8 as QDQ)")
    p.add_argument("path", metavar="ARTIFACT")
    p.add_argument("out", metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: fxcompress.onnx_export's)")
    _signed_by(p, "refuse the artifact unless signed by this key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of keeping it dynamic")
    p.add_argument("--form", choices=("qdq", "integer"), default="qdq",
                   help="static int8 as QDQ (onnxruntime's fused int8 kernels, its own requantization) or as "
                        "ConvInteger/MatMulInteger with fxcompress's arithmetic (exact, slower)")
    p.set_defaults(func=_cmd_export_onnx)


def _signed_by(p: argparse.ArgumentParser, help: str) -> None:
    """The ``--public-key FILE`` option the artifact commands share."""
    p.add_argument("--public-key", metavar="FILE", help=help)


def _json_flag(p: argparse.ArgumentParser, help: str) -> None:
    """The ``--json`` option the artifact commands share."""
    p.add_argument("--json", action="store_true", help=help)


def _load(path: str, public_key: str | None = None) -> Any:
    from .artifact import load, verify

    if public_key is not None and not (verify(path) or {}).get("signature"):
        raise IntegrityError(f"{path} is unsigned, but --public-key was given: only an artifact signed by that "
                             f"key is accepted (sign it with fxcompress run --key, or leave out --public-key)")
    return load(path, public_key=public_key)


def history_of(manifest: dict) -> list[dict]:
    """The earlier steps recorded in ``manifest`` (oldest first); a format-1 artifact records
    only its parent's id, given as a step of that id alone."""
    steps = list(manifest.get("history") or [])
    if not steps and manifest.get("parent"):
        steps = [{"id": manifest["parent"]}]
    return steps


def _passes(pipeline: Any) -> str:
    names = [p.get("name", "?") if isinstance(p, dict) else str(p) for p in pipeline or []]
    return ", ".join(names) or "(none recorded)"


def _figures(report: dict | None) -> str:
    if not report:
        return "(no report)"
    before, after = report.get("before") or {}, report.get("after") or {}
    keys = [k for k in ("parameters", "macs", "bytes", "serialized_bytes") if k in before or k in after]
    return "; ".join(f"{k} {before.get(k, '?')} -> {after.get(k, '?')}" for k in keys) or "(no figures)"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .artifact import verify

    manifest = verify(args.path, public_key=args.public_key)
    steps = history_of(manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "history": steps}, indent=2, sort_keys=True, default=str))
        return 0
    model = manifest.get("model") or {}
    sig = manifest.get("signature")
    print(f"{args.path}: fxcompress artifact, format {manifest.get('format_version')}")
    print("  made with: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()))
    print("  model: " + ", ".join(f"{k} {v}" for k, v in model.items()))
    for name, member in sorted((manifest.get("members") or {}).items()):
        print(f"  member {name}: {member.get('bytes'):,} bytes, sha256 {member.get('sha256', '')[:16]}...")
    print(f"  pipeline: {_passes(manifest.get('pipeline'))}")
    print(f"  report: {_figures(manifest.get('report'))}")
    if sig is None:
        print("  signature: none (unsigned)")
    else:
        checked = "verified" if args.public_key else "not checked (no --public-key)"
        print(f"  signature: {sig.get('algorithm')} by public key {sig.get('public_key', '')[:16]}..., {checked}")
    for spec in manifest.get("inputs") or []:
        print(f"  input {spec.get('name')}: {spec.get('dtype')} {tuple(spec.get('shape') or ())}")
    print(f"  history: {len(steps)} earlier step{'s' * (len(steps) != 1)}" + (":" if steps else ""))
    for i, step in enumerate(steps, 1):
        print(f"    {i}. {step.get('id', '?')[:16]}...: {_passes(step.get('pipeline'))}"
              + (f"; {_figures(step)}" if step.get("before") or step.get("after") else ""))
    print(f"    {len(steps) + 1}. this artifact: {_passes(manifest.get('pipeline'))}")
    return 0


def _read_data(spec: str) -> Any:
    import torch

    if spec == "digits":
        from .examples.digits import load_digits_data

        return load_digits_data().test_x
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--data {spec!r} is neither a file nor 'digits'")
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".pt":
        try:
            value = torch.load(path, weights_only=True)
        except Exception as exc:
            raise ConfigError(f"--data {spec}: cannot read a tensor from it ({exc})") from exc
        if isinstance(value, torch.Tensor):
            return value
        raise ConfigError(f"--data {spec} holds a {type(value).__name__}, not a tensor")
    raise ConfigError(f"--data {spec}: give a .pt or .npy file, or 'digits'")


def _cmd_compare(args: argparse.Namespace) -> int:
    from .bench import compare

    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError as exc:
        raise ConfigError(f"--threads must be comma-separated integers, got {args.threads!r}") from exc
    original, compressed = _load(args.original).eval(), _load(args.compressed).eval()
    x = _read_data(args.data)
    batches = [x[i:i + 64] for i in range(0, len(x), 64)]
    result = compare(original, compressed, x[:1], data=batches, threads=threads, compiled=args.compiled,
                     min_run_time=0.4)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import DEFAULT_OPSET, export_onnx

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    model = _load(args.path, args.public_key)
    written = export_onnx(model, out, opset=args.opset or DEFAULT_OPSET, dynamic_batch=not args.static_batch,
                          overwrite=args.overwrite, form=args.form)
    print(f"wrote {written} (opset {args.opset or DEFAULT_OPSET}, "
          f"{'static' if args.static_batch else 'dynamic'} batch, {args.form} form)")
    return 0
