"""``finetune``: the small training loop that QAT and pruning recovery share.

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

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .boundary import clone_inputs
from .errors import ConfigError, InputError

__all__ = ["finetune", "split_batch", "call_with"]


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
        if getattr(type(m), "fxc_role", None) == "fake_quant" and hasattr(m, "freeze_observer"):
            m.freeze_observer()
            frozen += 1
    return frozen


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    freeze_observers_after: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` for ``steps`` optimizer steps over ``data`` (cycled as needed).

    ``freeze_observers_after=N`` stops fake-quant observers from updating their
    ranges after N steps (scales then stay fixed, the usual QAT schedule).
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
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("finetune(): the model has no trainable parameters")
    opt = optimizers[optimizer](params, lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    batches = _cycle(data)
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="finetune", unit="step", leave=False)
    model.train()
    try:
        for step in bar:
            if freeze_observers_after is not None and step == freeze_observers_after:
                _freeze_observers(model)
            inputs, target = split_batch(next(batches))
            loss = loss_fn(call_with(model, inputs), target)
            if not torch.isfinite(loss):
                raise InputError(f"finetune(): the loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.eval()
    return model


def _cycle(data: Iterable) -> Any:
    """Cycle a re-iterable (a list, a DataLoader) without caching it in memory."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise InputError("finetune(): the training data is empty")
