"""Recipe files: a whole :func:`fxcompress.run` call in TOML, for the ``fxcompress`` command.

One table per argument of ``run()`` (the format is documented in ``docs/recipes.md``)::

    [model]
    factory = "torchvision.models:resnet18"      # pkg.module:callable
    kwargs = { num_classes = 10 }

    [[inputs]]                                    # one table per positional input
    shape = [1, 3, 224, 224]                      # (give `name` for keyword inputs;
                                                  # a [text] table instead: fxcompress.recipe_text)

    [run]
    check = "full"
    frontend = "auto"                             # or "fx" / "export" (torch.export)
    loss_fn = "torch.nn.functional:cross_entropy" # any run() callable, by reference

    [calibration]
    source = "my_data:calibration_batches"        # or "random" / "digits"

    [[passes]]
    name = "fuse_conv_bn"                         # every other key is an option,
                                                  # scope and skip included
    [[passes]]
    recipe = "int8_static"                        # or a named recipe, expanded

**A recipe file is code**, as trusted as a Python script: running it imports the
modules it names and calls the functions it names (the model factory, a
calibration source, ``loss_fn``, ``eval_fn``, leaf types).  Run only recipes
you would run as scripts.  :func:`load_recipe` itself imports nothing: it
parses and validates everything it can (keys, types, shapes, dtypes, the
*form* of every reference, pass names and options) and raises
:class:`~fxcompress.errors.ConfigError` naming the file, the key and what to
do.  References are resolved when the recipe runs (:meth:`RecipeSpec.run`);
a model factory must be a ``nn.Module`` subclass or a Python function (a
built-in such as ``os:system`` is refused before it is called), which guards
against a typo, not against a hostile file.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .capture_export import FRONTENDS
from .errors import ConfigError
from .pass_base import close_matches
from .recipe_text import TextSpec, parse_text
from .recipes import get_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["InputSpec", "CalibrationSpec", "RecipeSpec", "load_recipe", "resolve_reference", "REFERENCE"]

Entry = Any  # a pipeline entry: a name, (name, {options}) or a Pass object

#: The form of an import reference: ``pkg.module:attr`` or ``pkg.module:Class.attr``.
REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
                       r"(\.[A-Za-z_][A-Za-z0-9_]*)*")


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
    """Where calibration batches come from.

    ``source`` is ``"random"`` (seeded inputs of the ``[[inputs]]`` shapes),
    ``"digits"`` (scikit-learn's digits images; ``labels`` makes them
    ``(images, labels)`` pairs, for fine-tuning) or a reference
    ``"pkg.module:name"`` to an iterable of batches or a function returning
    one, called with ``kwargs``.
    """

    source: str = "random"
    batches: int = 4
    batch_size: int = 8
    labels: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return ":" in self.source


@dataclass
class RecipeSpec:
    """A parsed recipe file: everything one :func:`fxcompress.run` call needs.

    ``passes`` are pipeline entries exactly as :func:`fxcompress.run` takes
    them; ``run_options`` are its keyword arguments (``check``, ``seed``,
    ``backend``, ...) as the file spells them: references (``loss_fn``,
    ``eval_fn``, ``"pkg.mod:Type"`` leaf modules and autowrap functions) are
    strings until :meth:`resolved_run_options` imports them.  Named recipes in
    the file are already expanded.
    """

    path: str
    factory: str
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_mode: bool = True
    inputs: tuple[InputSpec, ...] = ()
    passes: list[Entry] = field(default_factory=list)
    run_options: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationSpec | None = None
    text: TextSpec | None = None  # a [text] table: tokenizer + sentences instead of [[inputs]]

    @property
    def seed(self) -> int:
        return int(self.run_options.get("seed", 0))

    def build_model(self) -> nn.Module:
        """Import the factory, call it with its kwargs, and set eval mode unless told not to.

        The factory runs with torch's RNG seeded from ``run.seed`` (the caller's
        RNG state is restored), so a randomly initialised model is the same on
        every build.  A factory that is neither an ``nn.Module`` subclass nor a
        Python function is refused before it is called.
        """
        fn = resolve_reference(self.factory, self.path, "model.factory")
        if isinstance(fn, type) and not issubclass(fn, nn.Module):
            raise ConfigError(f"{self.path}: model.factory {self.factory!r} is the class {fn.__qualname__}, "
                              f"not an nn.Module subclass")
        if not isinstance(fn, type) and not inspect.isfunction(fn) and not inspect.ismethod(fn):
            raise ConfigError(f"{self.path}: model.factory {self.factory!r} is a {type(fn).__name__}, not an "
                              f"nn.Module class or a Python function returning a model; it was not called")
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
        """Seeded random example inputs: a dict when the inputs are named, else a tuple; with a
        ``[text]`` table, its sentences tokenized (keyword inputs)."""
        if self.text is not None:
            return self.text.encode(self.path)
        gen = torch.Generator().manual_seed(self.seed)
        if self.inputs and self.inputs[0].name is not None:
            return {s.name: s.make(gen) for s in self.inputs}
        return tuple(s.make(gen) for s in self.inputs)

    def calibration_data(self) -> Any:
        """The calibration batches, or None when the file has no [calibration] table."""
        cal = self.calibration
        if cal is None:
            return None
        if cal.is_reference:
            source = resolve_reference(cal.source, self.path, "calibration.source")
            if callable(source):
                try:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(self.seed + 1)
                        return source(**cal.kwargs)
                except TypeError as exc:
                    raise ConfigError(f"{self.path}: calibration.source {cal.source!r} rejected kwargs "
                                      f"{cal.kwargs}: {exc}; fix calibration.kwargs") from exc
            if cal.kwargs:
                raise ConfigError(f"{self.path}: calibration.source {cal.source!r} is not a function, so "
                                  f"calibration.kwargs cannot be given to it")
            return source
        if cal.source == "text":
            if self.text is None:
                raise ConfigError(f"{self.path}: calibration.source 'text' needs a [text] table")
            return self.text.batches(self.path, cal.batch_size, cal.batches)
        if cal.source == "digits":
            from .examples.digits import load_digits_data

            data = load_digits_data(self.seed)
            size = cal.batch_size
            spans = [(i * size, (i + 1) * size) for i in range(cal.batches) if i * size < len(data.train_x)]
            if cal.labels:
                return [(data.train_x[a:b], data.train_y[a:b]) for a, b in spans]
            return [data.train_x[a:b] for a, b in spans]
        if self.text is not None:
            raise ConfigError(f"{self.path}: calibration.source 'random' draws [[inputs]] shapes; with a [text] "
                              f"table use source = \"text\" (its sentences in batches)")
        gen = torch.Generator().manual_seed(self.seed + 1)
        batches = []
        for _ in range(cal.batches):
            values = [s.make(gen, cal.batch_size) for s in self.inputs]
            named = self.inputs[0].name is not None
            batches.append({s.name: v for s, v in zip(self.inputs, values)} if named
                           else values[0] if len(values) == 1 else tuple(values))
        return batches

    def resolved_run_options(self) -> dict[str, Any]:
        """``run_options`` with every reference imported (``loss_fn``, ``eval_fn``, leaf types, autowrap)."""
        options = dict(self.run_options)
        for key in ("loss_fn", "eval_fn"):
            if key in options:
                options[key] = resolve_reference(options[key], self.path, f"run.{key}")
        for key in ("leaf_modules", "autowrap"):
            if key in options:
                # 'pkg.mod:Name' is a type or function to import; anything else a module-path pattern.
                options[key] = [resolve_reference(r, self.path, f"run.{key}") if ":" in r else r
                                for r in options[key]]
        return options

    def run(self, **overrides: Any) -> Any:
        """Build the model and run the pipeline; ``overrides`` replace run options."""
        from .api import run

        options = {**self.resolved_run_options(), **overrides}
        if "calibration_data" not in options:
            options["calibration_data"] = self.calibration_data()
        return run(self.build_model(), self.passes, self.example_inputs(), **options)


_TOP_KEYS = ("model", "inputs", "text", "run", "calibration", "passes")
_MODEL_KEYS = ("factory", "kwargs", "eval")
_INPUT_KEYS = ("shape", "dtype", "name", "low", "high")
# [run] keys and their TOML types (run() itself checks the values, e.g. the check level).
_RUN_TYPES: dict[str, type | tuple[type, ...]] = {
    "check": str, "seed": int, "backend": str, "tolerance": (int, float), "progress": bool,
    "leaf_modules": list, "concrete_args": dict, "autowrap": list, "loss_fn": str, "eval_fn": str,
    "frontend": str,
}
_CAL_KEYS = ("source", "batches", "batch_size", "labels", "kwargs")
_CAL_SOURCES = ("random", "digits", "text")


def _read(path: str | Path, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe file {where} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"recipe file {where} is a directory; give the path of a .toml file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read recipe file {where}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); a recipe is a TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc


def load_recipe(path: str | Path) -> RecipeSpec:
    """Parse and validate a recipe file without importing anything; ConfigError naming file, key and remedy."""
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"load_recipe() takes a file path, got {type(path).__name__} {path!r}")
    where = str(path)
    data = _read(path, where)
    _known(data, _TOP_KEYS, where, "the top level")

    model = _table(data, "model", where, required=True)
    _known(model, _MODEL_KEYS, where, "[model]")
    factory = _reference(_typed(model, "factory", str, where, "model", required=True), where, "model.factory")
    kwargs = _typed(model, "kwargs", dict, where, "model", default={})
    eval_mode = _typed(model, "eval", bool, where, "model", default=True)

    raw_inputs = data.get("inputs")
    text = parse_text(data["text"], where) if "text" in data else None
    if text is not None and raw_inputs is not None:
        raise ConfigError(f"{where}: give either [[inputs]] tables or a [text] table, not both")
    if text is None and (not isinstance(raw_inputs, list) or not raw_inputs):
        raise ConfigError(f"{where}: needs at least one [[inputs]] table with a shape, "
                          f"e.g. [[inputs]] shape = [1, 3, 224, 224] (or a [text] table for a text model)")
    inputs = tuple(_input_spec(t, i, where) for i, t in enumerate(raw_inputs or ()))
    if len({s.name is None for s in inputs}) > 1:
        raise ConfigError(f"{where}: give every [[inputs]] table a name (keyword inputs) or none (positional)")

    run_table = _table(data, "run", where)
    _known(run_table, _RUN_TYPES, where, "[run]")
    for key, tp in _RUN_TYPES.items():
        _typed(run_table, key, tp, where, "run")
    if "frontend" in run_table and run_table["frontend"] not in FRONTENDS:
        raise ConfigError(f"{where}: run.frontend is {run_table['frontend']!r}; give one of {list(FRONTENDS)} "
                          f"(\"auto\" tries symbolic tracing, then torch.export)")
    for key in ("loss_fn", "eval_fn"):
        if key in run_table:
            _reference(run_table[key], where, f"run.{key}")
    for key in ("leaf_modules", "autowrap"):
        for item in run_table.get(key, []):
            if not isinstance(item, str):
                raise ConfigError(f"{where}: run.{key} holds {item!r}; give 'pkg.module:Name' references"
                                  + (" or module-path patterns" if key == "leaf_modules" else ""))
            if ":" in item or key == "autowrap":
                _reference(item, where, f"run.{key}")

    calibration = _calibration(data, where)
    passes = _passes(data.get("passes"), where)
    spec = RecipeSpec(where, factory, kwargs, eval_mode, inputs, passes, dict(run_table), calibration, text)
    from .manager import normalize_pipeline

    try:  # names, options and their types: fail now, not after building the model
        normalize_pipeline(passes)
    except ConfigError as exc:
        raise ConfigError(f"{where}: [[passes]]: {exc}") from exc
    return spec


def _calibration(data: dict, where: str) -> CalibrationSpec | None:
    if "calibration" not in data:
        return None
    cal = _table(data, "calibration", where)
    _known(cal, _CAL_KEYS, where, "[calibration]")
    source = _typed(cal, "source", str, where, "calibration", default="random")
    if ":" in source:
        _reference(source, where, "calibration.source")
        given = sorted(set(cal) & {"batches", "batch_size", "labels"})
        if given:
            raise ConfigError(f"{where}: calibration.{given[0]} applies to the 'random' and 'digits' sources; "
                              f"a reference source makes its own batches (give it calibration.kwargs)")
    elif source not in _CAL_SOURCES:
        raise ConfigError(f"{where}: calibration.source must be one of {_CAL_SOURCES} or a 'pkg.module:name' "
                          f"reference, got {source!r}")
    spec = CalibrationSpec(
        source=source,
        batches=_typed(cal, "batches", int, where, "calibration", default=4),
        batch_size=_typed(cal, "batch_size", int, where, "calibration", default=8),
        labels=_typed(cal, "labels", bool, where, "calibration", default=False),
        kwargs=_typed(cal, "kwargs", dict, where, "calibration", default={}),
    )
    if spec.batches < 1 or spec.batch_size < 1:
        raise ConfigError(f"{where}: calibration.batches and batch_size must be at least 1")
    if spec.labels and source != "digits":
        raise ConfigError(f"{where}: calibration.labels applies to the 'digits' source only")
    if spec.kwargs and not spec.is_reference:
        raise ConfigError(f"{where}: calibration.kwargs applies to a 'pkg.module:name' source only")
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


def _reference(ref: str, where: str, key: str) -> str:
    """``ref`` if it has the form 'pkg.module:attr' (nothing is imported), else ConfigError."""
    if not REFERENCE.fullmatch(ref):
        raise ConfigError(f"{where}: {key} must be 'pkg.module:callable' (a module path, a colon, a name), "
                          f"got {ref!r}")
    return ref


def resolve_reference(ref: str, where: str, key: str) -> Any:
    """Import ``pkg.module`` and return the object 'pkg.module:attr.path' names (this runs the module)."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: {key} = {ref!r}: cannot import {module_name!r} ({exc}); check the "
                          f"spelling, install the package, or run from the directory that holds it") from exc
    except Exception as exc:  # the module's own code failed while it was imported
        raise ConfigError(f"{where}: {key} = {ref!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{where}: {key} = {ref!r}: {module_name} has no attribute "
                              f"{attr_path!r}{close_matches(part, names)}")
        obj = getattr(obj, part)
    return obj
