"""Recipes: named pass lists for common jobs, and recipe files (TOML) for the command line.

A named recipe is a function returning a list of pipeline entries for
:func:`fxcompress.run`.  Recipes name passes as strings, so a recipe may exist
before every pass it names does; the pass manager resolves and validates the
names when the pipeline runs (an unknown name is a :class:`ConfigError` before
any work).

A recipe *file* describes a whole :func:`fxcompress.run` call, one key per
argument (the format is documented in ``docs/recipes.md``)::

    [model]
    factory = "torchvision.models:resnet18"      # pkg.module:callable
    kwargs = { num_classes = 10 }

    [[inputs]]                                    # one table per positional input
    shape = [1, 3, 224, 224]                      # (give `name` for keyword inputs)

    [run]
    check = "full"

    [[passes]]
    name = "fuse_conv_bn"                         # every other key is an option,
                                                  # scope and skip included
    [[passes]]
    recipe = "int8_static"                        # or a named recipe, expanded

:func:`load_recipe` validates everything it can without building the model
(keys, types, pass names and options) and raises :class:`ConfigError` naming
the file, the key and what to do.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .registry import close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "fusion_only",
    "int8_static",
    "int8_qat",
    "int8_dynamic",
    "int4_weight_only",
    "prune_then_int8",
    "get_recipe",
    "available_recipes",
    "InputSpec",
    "CalibrationSpec",
    "RecipeSpec",
    "load_recipe",
]

Entry = Any  # a pipeline entry: a name, (name, {options}) or a Pass object


# -- named recipes -------------------------------------------------------------


def _options(**options: Any) -> dict[str, Any]:
    """Only the options a caller set: the rest keep the pass's own defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _entry(name: str, **options: Any) -> Entry:
    opts = _options(**options)
    return (name, opts) if opts else name


def fusion_only() -> list[Entry]:
    """Fold BatchNorm into the preceding conv/linear, then drop what nothing uses. Exact."""
    return ["fuse_conv_bn", "eliminate_dead_nodes"]


def int8_static(
    *,
    weights: Any = None,
    activations: Any = None,
    num_batches: int | None = None,
    backend: str | None = None,
    only_if_faster: bool = True,
    skip: Sequence[str] = (),
) -> list[Entry]:
    """Static int8: observe, calibrate on ``calibration_data``, fold, lower to integer kernels.

    ``weights``/``activations`` are :class:`fxcompress.quant.spec.QuantSpec`
    values (or their dict form); left out, the observer pass's defaults apply
    (symmetric per-channel int8 weights, affine per-tensor uint8 activations
    with a histogram observer: what the x86 kernels take).  ``skip`` keeps the
    matching modules float.  ``only_if_faster`` (on by default) lets ``lower``
    time each layer's ways to run on this CPU and keep the fastest, so the
    result is never slower than float layer by layer (x86 backend; see
    ``docs/lowering.md``).  Fusion comes first so that the folded BatchNorm is
    quantized as part of its conv, and dead-node elimination last because
    lowering leaves the float weights behind.
    """
    observe = _options(weights=weights, activations=activations)
    if skip:
        observe["skip"] = list(skip)
    return [
        "fuse_conv_bn",
        ("insert_observers", observe) if observe else "insert_observers",
        _entry("calibrate", num_batches=num_batches),
        "fold_fake_quant",
        _entry("lower", backend=backend, only_if_faster=only_if_faster),
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
    skip: Sequence[str] = (),
) -> list[Entry]:
    """Quantization-aware training: :func:`int8_static` with fake-quant fine-tuning before folding.

    Observers are calibrated first (so fake-quant starts from sane ranges),
    turned into fake-quant modules, and the model is fine-tuned for ``steps``
    steps at learning rate ``lr`` on ``calibration_data`` with ``loss_fn``
    (both given to :func:`fxcompress.run`).  ``steps=0`` skips fine-tuning.
    """
    static = int8_static(weights=weights, activations=activations, num_batches=num_batches,
                         backend=backend, skip=skip)
    train = [("finetune", {"steps": steps, "lr": lr})] if steps else []
    # static = fuse, observe, calibrate, fold, lower, dce: fake-quant + training go before fold.
    return static[:3] + ["to_fake_quant"] + train + static[3:]


def int8_dynamic(*, bits: int = 8, ops: Sequence[str] = ("linear",)) -> list[Entry]:
    """Dynamic quantization: int8 weights, activations quantized at run time (MLPs, transformers)."""
    return [("quantize_dynamic", {"bits": bits, "ops": list(ops)}), "eliminate_dead_nodes"]


def int4_weight_only(group_size: int = 128) -> list[Entry]:
    """Weight-only 4-bit with one scale per ``group_size`` weights; first of all a size win."""
    return [("quantize_weights", {"bits": 4, "group_size": group_size}), "eliminate_dead_nodes"]


def prune_then_int8(
    ratio: float = 0.5,
    *,
    importance: str | None = None,
    round_to: int | None = None,
    skip: Sequence[str] = (),
    weights: Any = None,
    activations: Any = None,
    num_batches: int | None = None,
    backend: str | None = None,
) -> list[Entry]:
    """Structured channel pruning at ``ratio``, then :func:`int8_static`.

    Pruning goes first: it refuses graphs that already hold quantized weights,
    and BatchNorm scales (an importance criterion) only exist before fusion.
    ``skip`` keeps the matching modules' channels; ``weights``,
    ``activations``, ``num_batches`` and ``backend`` go to :func:`int8_static`.
    """
    prune = _options(ratio=ratio, importance=importance, round_to=round_to)
    if skip:
        prune["skip"] = list(skip)
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


# -- recipe files --------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One example input: random values of a shape and dtype (ints drawn from [low, high))."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    name: str | None = None
    low: int = 0
    high: int = 2

    def make(self, generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
        """A tensor of this spec; ``batch`` replaces the leading dimension."""
        shape = (batch, *self.shape[1:]) if batch is not None and self.shape else self.shape
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        return torch.randint(self.low, self.high, shape, generator=generator, dtype=self.dtype)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration batches come from: seeded random inputs or the digits images."""

    source: str = "random"
    batches: int = 4
    batch_size: int = 8


@dataclass
class RecipeSpec:
    """A parsed recipe file: everything one :func:`fxcompress.run` call needs.

    ``passes`` are pipeline entries exactly as :func:`fxcompress.run` takes
    them; ``run_options`` are its keyword arguments (``check``, ``seed``,
    ``backend``, ...).  Named recipes in the file are already expanded.
    """

    path: str
    factory: str
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_mode: bool = True
    inputs: tuple[InputSpec, ...] = ()
    passes: list[Entry] = field(default_factory=list)
    run_options: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationSpec | None = None

    @property
    def seed(self) -> int:
        return int(self.run_options.get("seed", 0))

    def build_model(self) -> nn.Module:
        """Import the factory, call it with its kwargs, and set eval mode unless told not to.

        The factory runs with torch's RNG seeded from ``run.seed`` (the caller's
        RNG state is restored), so a randomly initialised model is the same on
        every build.
        """
        fn = _import_ref(self.factory, self.path, "model.factory")
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = fn(**self.factory_kwargs)
        except TypeError as exc:
            raise ConfigError(f"{self.path}: [model] factory {self.factory!r} rejected kwargs "
                              f"{self.factory_kwargs}: {exc}; fix model.kwargs") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{self.path}: [model] factory {self.factory!r} returned "
                              f"{type(model).__name__}, not an nn.Module")
        return model.eval() if self.eval_mode else model

    def example_inputs(self) -> tuple | dict:
        """Seeded random example inputs: a dict when the inputs are named, else a tuple."""
        gen = torch.Generator().manual_seed(self.seed)
        if self.inputs and self.inputs[0].name is not None:
            return {s.name: s.make(gen) for s in self.inputs}
        return tuple(s.make(gen) for s in self.inputs)

    def calibration_data(self) -> list | None:
        """The calibration batches, or None when the file has no [calibration] table."""
        cal = self.calibration
        if cal is None:
            return None
        if cal.source == "digits":
            from .examples.digits import load_digits_data

            images = load_digits_data(self.seed).train_x
            return [images[i * cal.batch_size:(i + 1) * cal.batch_size] for i in range(cal.batches)
                    if i * cal.batch_size < len(images)]
        gen = torch.Generator().manual_seed(self.seed + 1)
        batches = []
        for _ in range(cal.batches):
            values = [s.make(gen, cal.batch_size) for s in self.inputs]
            named = self.inputs[0].name is not None
            batches.append({s.name: v for s, v in zip(self.inputs, values)} if named
                           else values[0] if len(values) == 1 else tuple(values))
        return batches

    def run(self, **overrides: Any) -> Any:
        """Build the model and run the pipeline; ``overrides`` replace run options."""
        from .api import run

        options = {**self.run_options, **overrides}
        options.setdefault("calibration_data", self.calibration_data())
        return run(self.build_model(), self.passes, self.example_inputs(), **options)


_TOP_KEYS = ("model", "inputs", "run", "calibration", "passes")
_MODEL_KEYS = ("factory", "kwargs", "eval")
_INPUT_KEYS = ("shape", "dtype", "name", "low", "high")
# [run] keys and their TOML types (run() itself checks the values, e.g. the check level).
_RUN_TYPES: dict[str, type | tuple[type, ...]] = {
    "check": str, "seed": int, "backend": str, "tolerance": (int, float), "progress": bool,
    "leaf_modules": list, "concrete_args": dict, "autowrap": list,
}
_CAL_KEYS = ("source", "batches", "batch_size")
_CAL_SOURCES = ("random", "digits")


def load_recipe(path: str | Path) -> RecipeSpec:
    """Parse and validate a recipe file; ConfigError naming file, key and remedy."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe file {where} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc
    _known(data, _TOP_KEYS, where, "the top level")

    model = _table(data, "model", where, required=True)
    _known(model, _MODEL_KEYS, where, "[model]")
    factory = _typed(model, "factory", str, where, "model", required=True)
    if ":" not in factory:
        raise ConfigError(f"{where}: model.factory must be 'pkg.module:callable', got {factory!r}")
    kwargs = _typed(model, "kwargs", dict, where, "model", default={})
    eval_mode = _typed(model, "eval", bool, where, "model", default=True)

    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError(f"{where}: needs at least one [[inputs]] table with a shape, "
                          f"e.g. [[inputs]] shape = [1, 3, 224, 224]")
    inputs = tuple(_input_spec(t, i, where) for i, t in enumerate(raw_inputs))
    if len({s.name is None for s in inputs}) > 1:
        raise ConfigError(f"{where}: give every [[inputs]] table a name (keyword inputs) or none (positional)")

    run_table = _table(data, "run", where)
    _known(run_table, _RUN_TYPES, where, "[run]")
    for key, tp in _RUN_TYPES.items():
        _typed(run_table, key, tp, where, "run")
    run_options = dict(run_table)
    for key in ("leaf_modules", "autowrap"):
        if key in run_options:
            refs = _typed(run_table, key, list, where, "run")
            # 'pkg.mod:Name' is a type or function to import; anything else a module-path pattern.
            run_options[key] = [_import_ref(r, where, f"run.{key}") if ":" in r else r for r in refs]

    calibration = None
    if "calibration" in data:
        cal = _table(data, "calibration", where)
        _known(cal, _CAL_KEYS, where, "[calibration]")
        calibration = CalibrationSpec(
            source=_typed(cal, "source", str, where, "calibration", default="random"),
            batches=_typed(cal, "batches", int, where, "calibration", default=4),
            batch_size=_typed(cal, "batch_size", int, where, "calibration", default=8),
        )
        if calibration.source not in _CAL_SOURCES:
            raise ConfigError(f"{where}: calibration.source must be one of {_CAL_SOURCES}, "
                              f"got {calibration.source!r}")
        if calibration.batches < 1 or calibration.batch_size < 1:
            raise ConfigError(f"{where}: calibration.batches and batch_size must be at least 1")

    passes = _passes(data.get("passes"), where)
    spec = RecipeSpec(where, factory, kwargs, eval_mode, inputs, passes, run_options, calibration)
    from .manager import normalize_pipeline

    try:  # names, options and their types: fail now, not after building the model
        normalize_pipeline(passes)
    except ConfigError as exc:
        raise ConfigError(f"{where}: [[passes]]: {exc}") from exc
    return spec


def _passes(raw: Any, where: str) -> list[Entry]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: passes must be an array of tables: write each as [[passes]]")
    entries: list[Entry] = []
    for i, table in enumerate(raw):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: passes[{i}] must be a table ([[passes]] name = ...)")
        options = dict(table)
        name, recipe = options.pop("name", None), options.pop("recipe", None)
        if (name is None) == (recipe is None):
            raise ConfigError(f"{where}: passes[{i}] needs exactly one of `name` (a pass) "
                              f"or `recipe` (a named recipe), got keys {sorted(table)}")
        if recipe is not None:
            try:
                entries.extend(get_recipe(recipe, **options))
            except ConfigError as exc:
                raise ConfigError(f"{where}: passes[{i}]: {exc}") from exc
        else:
            entries.append((name, options) if options else name)
    return entries


def _input_spec(table: Any, i: int, where: str) -> InputSpec:
    key = f"inputs[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {key} must be a table with a shape ([[inputs]] shape = [...])")
    _known(table, _INPUT_KEYS, where, key)
    shape = _typed(table, "shape", list, where, key, required=True)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(f"{where}: {key}.shape must be a list of positive integers, got {shape}")
    dtype_name = _typed(table, "dtype", str, where, key, default="float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{where}: {key}.dtype {dtype_name!r} is not a torch dtype "
                          f"(e.g. 'float32', 'bfloat16', 'int64')")
    low = _typed(table, "low", int, where, key, default=0)
    high = _typed(table, "high", int, where, key, default=2)
    if high <= low:
        raise ConfigError(f"{where}: {key}: high ({high}) must be greater than low ({low})")
    return InputSpec(tuple(shape), dtype, _typed(table, "name", str, where, key, default=None), low, high)


def _known(table: dict, keys: Iterable[str], where: str, section: str) -> None:
    for k in table:
        if k not in keys:
            found = difflib.get_close_matches(k, list(keys), n=1)
            hint = f" (did you mean {found[0]!r}?)" if found else ""
            raise ConfigError(f"{where}: unknown key {k!r} in {section}{hint}; valid keys: {', '.join(keys)}")


def _table(data: dict, key: str, where: str, required: bool = False) -> dict:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing the [{key}] table")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table: write it as [{key}]")
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "an array", dict: "a table",
               (int, float): "a number"}


def _typed(table: dict, key: str, tp: type | tuple[type, ...], where: str, section: str, *,
           required: bool = False, default: Any = None) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{where}: missing {section}.{key}")
        return default
    value = table[key]
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {section}.{key} must be {_TYPE_NAMES[tp]}, got {value!r}")
    return value


def _import_ref(ref: str, where: str, key: str) -> Any:
    """Resolve 'pkg.module:attr.path' to the object it names."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: {key} = {ref!r}: cannot import {module_name!r} ({exc}); "
                          f"check the spelling or install the package") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{where}: {key} = {ref!r}: {module_name} has no attribute "
                              f"{attr_path!r}{close_matches(part, names)}")
        obj = getattr(obj, part)
    return obj
