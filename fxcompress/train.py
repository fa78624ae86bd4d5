"""``finetune``: the small training loop that QAT, pruning recovery and distillation share.

It trains the model it is given *in place* (pass it ``Result.model``, which is
already fxcompress's own copy) and returns it in eval mode.  Batches are
``(inputs, target)`` pairs; ``inputs`` is a tensor, a tuple of positional
inputs or a dict of keyword inputs, like everywhere else in fxcompress.

QAT note: fxcompress folds BatchNorm into the convolutions *before* inserting
fake-quant (``fuse_conv_bn`` runs first in every quantization recipe), so the
weights being fake-quantized during fine-tuning are exactly the ones that will
be deployed and no BatchNorm statistics move during QAT.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .boundary import clone_inputs
from .distill import Distill, LayerTaps, check_distill_options, distillation_loss
from .errors import ConfigError, InputError
from .verify import role_of

__all__ = ["finetune", "split_batch", "call_with", "training_loss", "distillation_loss", "SCHEDULES",
           "lr_factor", "check_schedule"]

#: Learning-rate schedules: the factor on ``lr`` at each step after the warmup.
SCHEDULES = ("constant", "cosine", "linear")


def check_schedule(schedule: object, warmup: object, steps: int, where: str = "") -> None:
    """ConfigError for a schedule name that is not in :data:`SCHEDULES` or a warmup outside ``[0, steps)``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"{where}schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ConfigError(f"{where}warmup must be an int in [0, steps={steps}), got {warmup!r}")


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The factor on ``lr`` for optimizer step ``step`` (0-based) of ``steps``.

    A linear warmup from ``1 / warmup`` to 1 over the first ``warmup`` steps, then
    ``constant`` (1), ``cosine`` (half a cosine from 1 down to 0 at the last step) or
    ``linear`` (a straight line from 1 down to 0) over the steps that remain.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` from a labelled batch; InputError for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise InputError(
        f"finetune() needs (inputs, target) batches, got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
    )


def call_with(model: nn.Module, inputs: Any) -> Any:
    """Call a model with a tensor, a tuple of positional inputs or a dict of keyword inputs.

    The model gets copies of the tensors: a model that writes into its inputs
    leaves the caller's batches as they were.
    """
    inputs = clone_inputs(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _freeze_observers(model: nn.Module) -> int:
    frozen = 0
    for m in model.modules():
        if role_of(m) == "fake_quant" and hasattr(m, "freeze_observer"):
            m.freeze_observer()
            frozen += 1
    return frozen


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    freeze_observers_after: int | None = None,
    progress: bool = True,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill: Distill = "kl",
    temperature: float = 1.0,
    distill_weight: float = 1.0,
    labelled: bool | None = None,
    across_ranks: bool = True,
    schedule: str = "constant",
    warmup: int = 0,
    distill_layers: Any = None,
    layer_weight: float = 1.0,
) -> nn.Module:
    """Train ``model`` for ``steps`` optimizer steps over ``data`` (cycled as needed).

    The loss is ``loss_fn(outputs, target)`` on ``(inputs, target)`` batches, or,
    with a ``teacher`` model, a distillation loss on the teacher's outputs
    (:func:`distillation_loss`: ``distill="kl"`` on logits at ``temperature``,
    ``"mse"`` on features, or a function ``(student_out, teacher_out) -> loss``),
    for outputs of any structure (tensors, tuples, dicts: matched leaf by leaf).
    With both, the loss is ``distill_weight * distillation + (1 - distill_weight)
    * task``.  Distillation needs no labels: batches are then the inputs alone
    (a tensor, tuple or dict), unless ``labelled=True`` says they are ``(inputs,
    target)`` pairs whose targets are ignored; ``labelled`` defaults to whether a
    ``loss_fn`` is given.  The teacher runs in eval mode without gradients and is
    never changed.

    Across processes (an initialised ``torch.distributed`` group of more than one
    rank; ``across_ranks=False`` turns it off) the model trains data-parallel with
    ``DistributedDataParallel``: each rank reads its own shard of the data, gradients
    are averaged, every rank ends with the same weights (rank 0's initial ones), and a
    non-finite loss on any rank stops every rank with an error.

    ``freeze_observers_after=N`` stops fake-quant observers from updating their
    ranges after N steps (scales then stay fixed, the usual QAT schedule).
    ``schedule`` (``"constant"``, ``"cosine"``, ``"linear"``) and ``warmup`` (steps of
    linear warmup) shape the learning rate over the steps (:func:`lr_factor`); only
    parameters with ``requires_grad`` train, so freezing a layer is
    ``p.requires_grad_(False)`` on its parameters before the call.
    ``distill_layers`` (with a teacher): module paths (or ``{student_path:
    teacher_path}``) whose outputs are matched too, adding ``layer_weight`` times their
    mean MSE to the loss (:class:`~fxcompress.distill.LayerTaps`).
    Raises :class:`ConfigError` for bad arguments, :class:`InputError` for
    empty data or unlabelled batches, and stops with an error on a NaN loss
    (naming the step) rather than silently training on garbage.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune(): steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"finetune(): lr must be a positive number, got {lr!r}")
    optimizers = {"adam": torch.optim.Adam, "sgd": lambda p, **kw: torch.optim.SGD(p, momentum=0.9, **kw)}
    if optimizer not in optimizers:
        raise ConfigError(f"finetune(): optimizer must be one of {sorted(optimizers)}, got {optimizer!r}")
    check_schedule(schedule, warmup, steps, "finetune(): ")
    if loss_fn is None and teacher is None:
        raise ConfigError("finetune(): give loss_fn(outputs, target), a teacher model to distil from, or both")
    check_distill_options(distill, temperature, distill_weight, has_task=loss_fn is not None)
    if distill_layers is not None and teacher is None:
        raise ConfigError("finetune(): distill_layers matches a student's layers to a teacher's; give teacher=")
    if isinstance(layer_weight, bool) or not isinstance(layer_weight, (int, float)) or not layer_weight > 0:
        raise ConfigError(f"finetune(): layer_weight must be a positive number, got {layer_weight!r}")
    labelled = loss_fn is not None if labelled is None else labelled
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("finetune(): the model has no trainable parameters")
    w = distributed.world() if across_ranks else distributed.World()
    trained: nn.Module = model
    if w.active:
        distributed.check_backend(w.backend, params[0].device, "gradients")
        trained = nn.parallel.DistributedDataParallel(model)
    opt = optimizers[optimizer](params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, schedule, warmup))
    torch.manual_seed(seed)
    batches = _cycle(data)
    bar = range(steps)
    if progress and w.is_writer:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="finetune", unit="step", leave=False)
    taps = LayerTaps(model, teacher, distill_layers) if distill_layers is not None else None
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.eval()
    model.train()
    try:
        for step in bar:
            if freeze_observers_after is not None and step == freeze_observers_after:
                _freeze_observers(model)
            batch = next(batches)
            inputs, target = split_batch(batch) if labelled else (batch, None)
            outputs = call_with(trained, inputs)
            loss = training_loss(outputs, inputs, target, loss_fn, teacher, distill, temperature, distill_weight)
            if taps is not None:
                loss = loss + layer_weight * taps.loss(inputs)
            _check_finite(loss, step, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
    finally:
        model.eval()
        if taps is not None:
            taps.close()
        if teacher is not None:
            teacher.train(teacher_was_training)
    return model


def training_loss(outputs: Any, inputs: Any, target: Any, loss_fn: Callable | None, teacher: nn.Module | None,
               distill: Distill, temperature: float, distill_weight: float) -> torch.Tensor:
    """The loss of one batch: the task loss, the distillation loss, or their weighted sum."""
    if teacher is None:
        return loss_fn(outputs, target)  # type: ignore[misc]
    with torch.no_grad():
        reference = call_with(teacher, inputs)
    loss = distillation_loss(outputs, reference, distill, temperature, inputs=inputs)
    if loss_fn is None:
        return loss
    return distill_weight * loss + (1.0 - distill_weight) * loss_fn(outputs, target)


def _check_finite(loss: torch.Tensor, step: int, w: distributed.World) -> None:
    """A non-finite loss stops training, on every rank at once (one tiny all-reduce per step)."""
    finite = bool(torch.isfinite(loss.detach()))
    if not w.active:
        if not finite:
            raise InputError(f"finetune(): the loss became {loss.item()} at step {step}; lower lr")
        return
    bad = torch.zeros(w.size)
    bad[w.rank] = 0.0 if finite else 1.0
    torch.distributed.all_reduce(bad)
    if bad.any():
        ranks = [r for r in range(w.size) if bad[r]]
        raise InputError(f"finetune(): the loss became non-finite at step {step} on rank(s) {ranks} "
                         f"of {w.size}; lower lr")


def _cycle(data: Iterable) -> Any:
    """Cycle a re-iterable (a list, a DataLoader) without caching it in memory."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise InputError("finetune(): the training data is empty")
