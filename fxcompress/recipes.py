"""Named recipes: pass lists for common jobs.

A named recipe is a function returning a list of pipeline entries for
:func:`fxcompress.run`.  Recipes name passes as strings, so a recipe may exist
before every pass it names does; the pass manager resolves and validates the
names when the pipeline runs (an unknown name is a :class:`ConfigError` before
any work).  ``scope``/``skip`` of a recipe go to the pass that decides what is
compressed (the observers of int8, the quantized linears, the pruned groups).

Recipes are composed by pass name, never by list position: :func:`int8_qat` is
:func:`int8_static` with fake-quant training inserted before ``fold_fake_quant``,
wherever that entry stands.

Recipe *files* (TOML descriptions of a whole :func:`fxcompress.run` call, for the
command line) are :mod:`fxcompress.recipe_file`'s, which names these recipes; this
module does not import it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

from .errors import ConfigError
from .registry import close_matches

__all__ = [
    "fusion_only",
    "int8_static",
    "int8_qat",
    "int8_dynamic",
    "int4_weight_only",
    "prune_then_int8",
    "get_recipe",
    "available_recipes",
]

Entry = Any  # a pipeline entry: a name, (name, {options}) or a Pass object


# -- named recipes -------------------------------------------------------------


def _options(**options: Any) -> dict[str, Any]:
    """Only the options a caller set: the rest keep the pass's own defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _entry(name: str, **options: Any) -> Entry:
    opts = _options(**options)
    return (name, opts) if opts else name


def _inserted_before(entries: list[Entry], name: str, new: list[Entry]) -> list[Entry]:
    """``entries`` with ``new`` inserted before the entry of pass ``name`` (which must be there)."""
    at = next(i for i, e in enumerate(entries) if (e if isinstance(e, str) else e[0]) == name)
    return entries[:at] + new + entries[at:]


def _where(options: dict[str, Any], scope: Sequence[str], skip: Sequence[str]) -> dict[str, Any]:
    """``options`` with ``scope``/``skip`` added when given (a lone pattern is one pattern)."""
    for key, patterns in (("scope", scope), ("skip", skip)):
        if patterns:
            options[key] = [patterns] if isinstance(patterns, str) else list(patterns)
    return options


def fusion_only() -> list[Entry]:
    """Fold BatchNorm into the preceding conv/linear, then drop what nothing uses. Exact."""
    return ["fuse_conv_bn", "eliminate_dead_nodes"]


def int8_static(
    *,
    weights: Any = None,
    activations: Any = None,
    num_batches: int | None = None,
    backend: str | None = None,
    only_if_faster: bool | None = None,
    if_slower: str = "warn",
    scope: Sequence[str] = (),
    skip: Sequence[str] = (),
    for_onnxruntime: bool = False,
) -> list[Entry]:
    """Static int8: observe, calibrate on ``calibration_data``, fold, lower to integer kernels.

    ``weights``/``activations`` are :class:`fxcompress.quant.spec.QuantSpec`
    values (or their dict form); left out, the observer pass's defaults apply
    (symmetric per-channel int8 weights, affine per-tensor uint8 activations
    with a histogram observer: what the x86 kernels take).  ``scope`` limits
    quantization to the matching modules, ``skip`` keeps them float.
    ``only_if_faster`` (on by default) lets ``lower`` time each layer's ways to
    run on this CPU and keep the fastest (x86 backend); ``if_slower="keep_float"``
    makes ``lower`` also time the whole model and return its float version when
    int8 is slower here, so the result is never slower than float (the default,
    ``"warn"``, keeps int8 and warns; see ``docs/lowering.md``).  Fusion comes
    first so that the folded BatchNorm is quantized as part of its conv, and
    dead-node elimination last because lowering leaves the float weights behind.
    ``for_onnxruntime=True`` builds the model the way onnxruntime's QDQ kernels compute, for a
    model to be exported with ``export_onnx``: residual adds separate from their convs
    (``insert_observers(residual_adds="separate")``: QLinearConv + QLinearAdd), activations
    other than ReLU/ReLU6 as uint8 tables after their convs (``post_ops="tables"``: QLinearConv
    + ``GatherElements``) and biases on
    the int32 accumulator grid (``fold_fake_quant(int32_bias=True)``), and the lowered ops
    rounding as onnxruntime's kernels do (``lower(arithmetic="onnxruntime")``), so that
    onnxruntime computes the model's own codes; see ``docs/deployment.md``. ``only_if_faster``
    left out is on, but off with ``for_onnxruntime`` (this CPU's timings say nothing of what
    is fast in onnxruntime, which runs every layer the QDQ format makes int8 on its kernels).
    """
    if only_if_faster is None:
        only_if_faster = not for_onnxruntime
    observe = _where(_options(weights=weights, activations=activations), scope, skip)
    if for_onnxruntime:
        observe.update(residual_adds="separate", post_ops="tables")
    return [
        "fuse_conv_bn",
        ("insert_observers", observe) if observe else "insert_observers",
        _entry("calibrate", num_batches=num_batches),
        ("fold_fake_quant", {"int32_bias": True}) if for_onnxruntime else "fold_fake_quant",
        # The reference backend is portable by choice and never timed: no option to carry.
        _entry("lower", backend=backend, only_if_faster=None if backend == "reference" else only_if_faster,
               if_slower=None if if_slower == "warn" else if_slower,
               arithmetic="onnxruntime" if for_onnxruntime else None),
        "eliminate_dead_nodes",
    ]


def int8_qat(
    *,
    weights: Any = None,
    activations: Any = None,
    num_batches: int | None = None,
    steps: int = 100,
    lr: float = 1e-4,
    backend: str | None = None,
    scope: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> list[Entry]:
    """Quantization-aware training: :func:`int8_static` with fake-quant fine-tuning before folding.

    Observers are calibrated first (so fake-quant starts from sane ranges),
    turned into fake-quant modules, and the model is fine-tuned for ``steps``
    steps at learning rate ``lr`` on ``calibration_data`` with ``loss_fn``
    (both given to :func:`fxcompress.run`).  ``steps=0`` skips fine-tuning.
    """
    static = int8_static(weights=weights, activations=activations, num_batches=num_batches,
                         backend=backend, scope=scope, skip=skip)
    train = [("finetune", {"steps": steps, "lr": lr})] if steps else []
    # Fake-quant and training act on calibrated observers and end where folding starts.
    return _inserted_before(static, "fold_fake_quant", ["to_fake_quant", *train])


def int8_dynamic(*, bits: int = 8, ops: Sequence[str] = ("linear",), scope: Sequence[str] = (),
                 skip: Sequence[str] = ()) -> list[Entry]:
    """Dynamic quantization: int8 weights, activations quantized at run time (MLPs, transformers)."""
    return [("quantize_dynamic", _where({"bits": bits, "ops": list(ops)}, scope, skip)), "eliminate_dead_nodes"]


def int4_weight_only(group_size: int = 128, *, scope: Sequence[str] = (), skip: Sequence[str] = ()) -> list[Entry]:
    """Weight-only 4-bit with one scale per ``group_size`` weights; first of all a size win."""
    return [("quantize_weights", _where({"bits": 4, "group_size": group_size}, scope, skip)),
            "eliminate_dead_nodes"]


def prune_then_int8(
    ratio: float = 0.5,
    *,
    importance: str | None = None,
    round_to: int | None = None,
    scope: Sequence[str] = (),
    skip: Sequence[str] = (),
    weights: Any = None,
    activations: Any = None,
    num_batches: int | None = None,
    backend: str | None = None,
) -> list[Entry]:
    """Structured channel pruning at ``ratio``, then :func:`int8_static`.

    Pruning goes first: it refuses graphs that already hold quantized weights,
    and BatchNorm scales (an importance criterion) only exist before fusion.
    ``scope`` limits pruning to the matching modules, ``skip`` keeps their
    channels; ``weights``,
    ``activations``, ``num_batches`` and ``backend`` go to :func:`int8_static`.
    """
    prune = _where(_options(ratio=ratio, importance=importance, round_to=round_to), scope, skip)
    return [("prune_channels", prune)] + int8_static(
        weights=weights, activations=activations, num_batches=num_batches, backend=backend)


_RECIPES: dict[str, Callable[..., list[Entry]]] = {
    f.__name__: f for f in (fusion_only, int8_static, int8_qat, int8_dynamic, int4_weight_only, prune_then_int8)
}


def available_recipes() -> list[str]:
    """Names :func:`get_recipe` knows, sorted."""
    return sorted(_RECIPES)


def get_recipe(name: str, **options: Any) -> list[Entry]:
    """The pass list of the named recipe; ConfigError for unknown names or options."""
    fn = _RECIPES.get(name)
    if fn is None:
        raise ConfigError(
            f"unknown recipe {name!r}{close_matches(name, _RECIPES)}; "
            f"available recipes: {', '.join(available_recipes())}"
        )
    sig = inspect.signature(fn)
    try:
        sig.bind(**options)
    except TypeError as exc:
        valid = ", ".join(sig.parameters) or "(none)"
        raise ConfigError(f"recipe {name!r}: {exc}; its options are: {valid}") from exc
    return fn(**options)
