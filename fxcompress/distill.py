"""Distillation losses: a student's outputs against a teacher's, for outputs of any structure.

Used by :func:`fxcompress.finetune` (``teacher=``) to recover a pruned or
quantized model on unlabelled data.  Outputs are matched leaf by leaf
(tensors inside tuples, lists and dicts, in order); each floating-point leaf
contributes one term and the terms are averaged:

``"kl"``   ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` over the last
           dim, averaged over the other dims (logits; Hinton et al.);
``"mse"``  the mean squared difference (features, embeddings, boxes);
a function ``fn(student_out, teacher_out) -> scalar tensor`` replaces both and
receives the whole outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

__all__ = ["Distill", "DISTILL_LOSSES", "distillation_loss", "check_distill_options", "output_leaves"]

Distill = Union[Literal["kl", "mse"], Callable[[Any, Any], torch.Tensor]]
DISTILL_LOSSES = ("kl", "mse")


def check_distill_options(distill: Any, temperature: Any, distill_weight: Any, *, has_task: bool) -> None:
    """ConfigError for a distillation loss, temperature or weight that cannot work."""
    if not (callable(distill) or distill in DISTILL_LOSSES):
        raise ConfigError(f"distill must be one of {DISTILL_LOSSES} or a function (student_out, teacher_out) "
                          f"-> loss, got {distill!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) \
            or not 0.0 <= distill_weight <= 1.0:
        raise ConfigError(f"distill_weight must be a number in [0, 1], got {distill_weight!r}")
    if not has_task and distill_weight != 1.0:
        raise ConfigError(f"distill_weight={distill_weight} mixes in a task loss, but no loss_fn is given")


def output_leaves(value: Any, path: str = "out") -> list[tuple[str, Any]]:
    """The leaves of a nested output with their paths (``out[0]['logits']``)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in output_leaves(v, f"{path}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in output_leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def distillation_loss(student: Any, teacher: Any, distill: Distill = "kl", temperature: float = 1.0) -> torch.Tensor:
    """The distillation loss of ``student``'s outputs against ``teacher``'s (see the module doc).

    Raises :class:`InputError` when the two outputs differ in structure or in a
    leaf's shape, or hold no floating-point tensor to compare.
    """
    if callable(distill):
        return distill(student, teacher)
    s_leaves, t_leaves = output_leaves(student), output_leaves(teacher)
    if [p for p, _ in s_leaves] != [p for p, _ in t_leaves]:
        raise InputError(f"distillation: the student's outputs {[p for p, _ in s_leaves]} do not have the "
                         f"teacher's structure {[p for p, _ in t_leaves]}")
    terms = []
    for (path, s), (_, t) in zip(s_leaves, t_leaves):
        if not (isinstance(s, torch.Tensor) and s.is_floating_point()):
            continue
        if s.shape != t.shape:
            raise InputError(f"distillation: {path} is {tuple(s.shape)} for the student but {tuple(t.shape)} "
                             f"for the teacher; distil models with the same outputs")
        t = t.detach().to(s.dtype)
        if distill == "kl":
            log_p = F.log_softmax(s.reshape(-1, s.shape[-1]) / temperature, dim=-1)
            log_q = F.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, dim=-1)
            terms.append(F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature ** 2)
        else:
            terms.append(F.mse_loss(s, t))
    if not terms:
        raise InputError("distillation: the outputs hold no floating-point tensor to compare")
    return torch.stack(terms).sum() / len(terms) if len(terms) > 1 else terms[0]
