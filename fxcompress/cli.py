"""The ``fxcompress`` command.

Subcommands:

``passes``
    every registered pass with its doc paragraph and options (types, defaults).
``run --recipe FILE.toml [--json] [--out PATH [--key FILE] [--overwrite]]``
    runs a recipe file (see ``docs/recipes.md``), prints the report, and saves
    the result as an artifact with ``--out``.  A recipe is trusted code: it
    imports and calls what it names, as a Python script would; the current
    directory is importable, as with ``python -m``.  ``--out`` and ``--key``
    are checked before the pipeline runs.
``demo``
    trains a small CNN on scikit-learn's digits (deterministically), compresses
    it with the passes that exist, and prints the report with accuracy before
    and after and a side-by-side comparison.
``keygen --private FILE --public FILE`` / ``verify PATH [--public-key FILE]``
    signing keys for artifacts, and an artifact's integrity (and signature) check.
``inspect ARTIFACT`` / ``compare ORIGINAL COMPRESSED --data ...`` / ``export-onnx ARTIFACT OUT.onnx``
    an artifact's manifest, pipeline, report, signature and history; two artifacts side by
    side; an artifact as ONNX (see :mod:`fxcompress.cli_artifacts`).

Errors a user can cause (:class:`~fxcompress.errors.FxCompressError`) print one
line to stderr and exit with status 2; anything else keeps its traceback, since
it is a bug to report.  When the reader of stdout goes away (``| head``), the
command stops quietly with status 141, as Unix tools killed by SIGPIPE do.
``python -m fxcompress`` runs the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import textwrap
import typing
from typing import Any, Iterator, Sequence

from .errors import ConfigError, FxCompressError

__all__ = ["main", "build_parser", "describe_pass", "demo_pipeline"]

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE

_TRUSTED = ("A recipe file is trusted code, like a Python script: running it imports the modules it names "
            "and calls the functions it names (model factory, calibration source, loss_fn, eval_fn). "
            "Run only recipes you trust.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad usage itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return status
    except FxCompressError as exc:
        print(f"fxcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader left (`fxcompress passes --json | head`): stop quietly, and keep Python's
        # exit-time flush from raising again on the closed descriptor.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxcompress`` command."""
    parser = argparse.ArgumentParser(prog="fxcompress", description="torch.fx compression passes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("passes", help="list the registered passes with their options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("run", help="run a recipe file and print the report", description=_TRUSTED,
                       epilog="The current directory is importable (as with python -m), so a recipe may name "
                              "a factory in a module next to it. --out and --key are checked before the "
                              "pipeline runs.")
    p.add_argument("--recipe", required=True, metavar="FILE.toml",
                   help="the recipe (docs/recipes.md); trusted code, like a script")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", metavar="PATH", help="save the compressed model as an artifact")
    p.add_argument("--key", metavar="FILE", help="sign the artifact with this private key (PEM)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="compress a small CNN trained on the digits images")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("keygen", help="create a signing key pair for artifacts")
    p.add_argument("--private", required=True, metavar="FILE", help="where to write the private key (PEM)")
    p.add_argument("--public", required=True, metavar="FILE", help="where to write the public key (PEM)")
    p.add_argument("--overwrite", action="store_true", help="replace existing key files")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("verify", help="check an artifact's integrity (and signature)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--public-key", metavar="FILE", help="also require a valid signature by this key")
    p.set_defaults(func=_cmd_verify)

    from .cli_artifacts import add_parsers  # inspect, compare, export-onnx

    add_parsers(sub)
    return parser


# -- passes ----------------------------------------------------------------------


def describe_pass(name: str) -> dict[str, Any]:
    """Name, flags, doc paragraph and options (type, default) of a registered pass."""
    from .registry import get_pass

    cls = get_pass(name)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: show the raw one
        hints = {}
    options = []
    for opt, f in cls.option_fields().items():
        tp = hints.get(opt, f.type)
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        options.append({"name": opt, "type": _type_name(tp), "default": default})
    return {
        "name": cls.name,
        "doc": cls.doc(),
        "requires": list(cls.requires),
        "exact": cls.exact,
        "eval_only": cls.eval_only,
        "options": options,
    }


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _cmd_passes(args: argparse.Namespace) -> int:
    from .registry import available_passes

    passes = [describe_pass(n) for n in available_passes()]
    if args.json:
        print(json.dumps(passes, indent=2))
        return 0
    for p in passes:
        flags = [f for f, on in (("exact", p["exact"]), ("eval-only", p["eval_only"])) if on]
        if p["requires"]:
            flags.append("requires " + ", ".join(p["requires"]))
        print(p["name"] + (f"  [{'; '.join(flags)}]" if flags else ""))
        print(textwrap.fill(p["doc"], width=88, initial_indent="    ", subsequent_indent="    "))
        print("    options:" + ("" if p["options"] else " (none)"))
        for o in p["options"]:
            print(f"      {o['name']}: {o['type']} = {o['default']}")
        print()
    return 0


# -- run -------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from .recipe_file import load_recipe

    if args.key and not args.out:
        raise ConfigError("--key signs the artifact written by --out; give --out PATH as well")
    spec = load_recipe(args.recipe)
    key = None
    if args.out:  # everything about the output is checked before the pipeline runs
        from .artifact import check_target, signing

        check_target(args.out, args.overwrite)
        key = signing.private_key(args.key) if args.key else None
    with _cwd_importable():
        result = spec.run()
    if args.out:
        from .artifact import save

        artifact_id = save(result, args.out, key=key, overwrite=args.overwrite)
    if args.json:
        print(result.report.to_json())
    else:
        print(result.report)
    if args.out:  # on stderr with --json, so that stdout stays one JSON document
        print(f"saved {args.out} ({'signed' if args.key else 'unsigned'}, id {artifact_id})",
              file=sys.stderr if args.json else sys.stdout)
    return 0


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` while the recipe runs, as ``python -m`` has it."""
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


# -- demo ------------------------------------------------------------------------

# The demo pipeline, stage by stage; a stage runs when every pass it names is
# registered and their `requires` are met by earlier stages, so the demo grows
# with the library.  Order matters: prune before anything folds BatchNorm,
# fuse before observing, lower after folding, clean up last.
_DEMO_STAGES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("channel pruning", (("prune_channels", {"ratio": 0.5, "importance": "l2"}),)),
    ("BatchNorm fusion", ("fuse_conv_bn",)),
    ("static int8 quantization", ("insert_observers", "calibrate", "fold_fake_quant")),
    ("lowering to integer kernels", ("lower",)),
    ("dead-node elimination", ("eliminate_dead_nodes",)),
)
# Pruning removes half the channels; a short fine-tune recovers the accuracy
# (about 1 s here) before the rest of the pipeline runs on the recovered model.
_RECOVERY_STEPS, _RECOVERY_LR = 100, 1e-3


def _entry_name(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry[0]


def demo_pipeline(available: Sequence[str]) -> tuple[list[Any], list[str], list[str]]:
    """The demo's pipeline from the registered passes: (entries, stages run, stages skipped)."""
    from .registry import get_pass

    entries: list[Any] = []
    done: list[str] = []
    ran, skipped = [], []
    for title, stage in _DEMO_STAGES:
        names = [_entry_name(e) for e in stage]
        missing = [n for n in names if n not in available]
        if missing:
            skipped.append(f"{title} (not registered: {', '.join(missing)})")
            continue
        unmet = [r for n in names for r in get_pass(n).requires if r not in done + names]
        if unmet:
            skipped.append(f"{title} (needs {', '.join(unmet)} earlier)")
            continue
        entries.extend(stage)
        done.extend(names)
        ran.append(f"{title}: {', '.join(names)}")
    return entries, ran, skipped


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from .api import run
    from .bench import compare
    from .examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
    from .registry import available_passes
    from .train import finetune

    print("training a small CNN on the scikit-learn digits (deterministic, a few seconds)...")
    data = load_digits_data(args.seed)
    model = pretrained_digits_cnn(args.seed)
    entries, ran, skipped = demo_pipeline(available_passes())
    print("stages run:\n" + "\n".join(f"  - {s}" for s in ran))
    if skipped:
        print("stages skipped:\n" + "\n".join(f"  - {s}" for s in skipped))

    def test_accuracy(m: torch.nn.Module) -> float:
        return accuracy(m, data.test_x, data.test_y)

    example = (data.test_x[:32],)
    calibration = list(data.train_x[:256].split(32))
    compressed: torch.nn.Module = model
    pruning = [e for e in entries if _entry_name(e) == "prune_channels"]
    if pruning:
        result = run(model, pruning, example, eval_fn=test_accuracy, check="full", progress=False,
                     seed=args.seed)
        print(f"\n{result.report}")
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(args.seed))
        labelled = [(data.train_x[i], data.train_y[i]) for i in order.split(64)]
        compressed = finetune(result.model, labelled, F.cross_entropy, steps=_RECOVERY_STEPS,
                              lr=_RECOVERY_LR, progress=False, seed=args.seed)
        print(f"\nafter {_RECOVERY_STEPS} fine-tuning steps: test accuracy "
              f"{test_accuracy(compressed):.2f}% (float model: {test_accuracy(model):.2f}%)")
    rest = [e for e in entries if _entry_name(e) != "prune_channels"]
    result = run(compressed, rest, example, calibration_data=calibration, eval_fn=test_accuracy,
                 check="full", progress=False, seed=args.seed)
    print(f"\n{result.report}")
    print("\noriginal vs compressed; task metric = test accuracy (%), latency on a batch of 32:\n")
    print(compare(model, result.model, example, data=list(data.test_x.split(64)), eval_fn=test_accuracy,
                  threads=(1,), min_run_time=0.4))
    return 0


# -- artifacts -------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .artifact import generate_keypair

    fingerprint = generate_keypair(args.private, args.public, overwrite=args.overwrite)
    print(f"wrote private key {args.private} (keep it secret) and public key {args.public}")
    print(f"public key fingerprint: {fingerprint}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .artifact import verify

    manifest = verify(args.path, public_key=args.public_key)
    if args.public_key:
        how = "integrity and signature verified"
    elif manifest.get("signature"):
        how = "integrity verified; signed, but no --public-key given, so the signature was not checked"
    else:
        how = "integrity verified; unsigned (anyone could have made a consistent forgery)"
    print(f"{args.path}: OK, {how}")
    versions = manifest.get("versions") or {}
    print("  made with: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    passes = [p["name"] for p in manifest.get("pipeline") or []]
    print(f"  passes: {', '.join(passes) or '(none recorded)'}")
    if manifest.get("parent"):
        print(f"  parent artifact: {manifest['parent']}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m fxcompress.cli`
    sys.exit(main())
