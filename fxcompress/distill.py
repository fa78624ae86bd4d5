"""Distillation losses: a student's outputs against a teacher's, for outputs of any structure.

Used by :func:`fxcompress.finetune` (``teacher=``) to recover a pruned or
quantized model on unlabelled data.  Outputs are matched leaf by leaf
(tensors inside tuples, lists and dicts, in order); each floating-point leaf
contributes one term and the terms are averaged:

``"kl"``   ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` over the last
           dim, averaged over the other dims (logits; Hinton et al.);
``"mse"``  the mean squared difference (features, embeddings, boxes);
a function ``fn(student_out, teacher_out) -> scalar tensor`` replaces both and
receives the whole outputs (and the batch's inputs, when it has a parameter named
``inputs``).  :class:`LayerTaps` adds intermediate layers: the MSE
between the outputs of named submodules of the two models (``finetune(...,
distill_layers=[...])``; TinyBERT-style hidden-state distillation).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import fx

from .attention_mask import token_mask
from .errors import ConfigError, InputError

__all__ = ["Distill", "DISTILL_LOSSES", "distillation_loss", "check_distill_options", "output_leaves", "LayerTaps",
           "token_mse"]

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


def takes_inputs(fn: Callable) -> bool:
    """Whether a distillation function has a parameter named ``inputs`` (it then gets the batch's inputs)."""
    try:
        return "inputs" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def distillation_loss(student: Any, teacher: Any, distill: Distill = "kl", temperature: float = 1.0,
                      inputs: Any = None) -> torch.Tensor:
    """The distillation loss of ``student``'s outputs against ``teacher``'s (see the module doc).

    A function ``distill`` with a parameter named ``inputs`` is called with
    ``inputs=`` the batch's inputs too (a tensor, tuple or dict), e.g. to leave a
    padded batch's padding out of the loss through its ``attention_mask``.
    Raises :class:`InputError` when the two outputs differ in structure or in a
    leaf's shape, or hold no floating-point tensor to compare.
    """
    if callable(distill):
        return distill(student, teacher, inputs=inputs) if takes_inputs(distill) else distill(student, teacher)
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


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MSE of ``(*tokens, features)`` outputs over the tokens ``mask`` marks (an ``attention_mask``
    with as many entries as the outputs have tokens); the teacher's side is detached."""
    keep = mask.reshape(student.shape[:-1]).unsqueeze(-1).to(student.dtype)
    error = (student - teacher.detach().to(student.dtype)).square() * keep
    return error.sum() / (keep.sum().clamp_min(1.0) * student.shape[-1])


class LayerTaps:
    """Intermediate-layer distillation: the outputs of named submodules of a student and its teacher.

    ``layers`` names the modules to match: a list of paths both models have (a pruned model keeps
    the original's module paths), or a mapping ``{student_path: teacher_path}``.  Forward hooks
    record each module's output (the last call's, for a module called more than once);
    :meth:`loss` is the mean over the pairs of the MSE between the student's and the (detached)
    teacher's outputs of the step just run, and clears them.  Outputs are matched leaf by leaf like the models' outputs, so each pair must have the
    same structure and shapes: match the layers whose widths pruning kept (a transformer's residual
    stream: the LayerNorm after each block).  A padded batch's padding (its ``attention_mask``)
    never counts.  The hooks stay until :meth:`close`.

    Raises :class:`ConfigError` for an empty list or a path either model lacks, and
    :class:`InputError` when a named layer did not run in a step or the two outputs differ.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, layers: Any) -> None:
        pairs = list(layers.items()) if isinstance(layers, dict) else [(p, p) for p in layers] \
            if isinstance(layers, (list, tuple)) else None
        if not pairs or not all(isinstance(s, str) and isinstance(t, str) for s, t in pairs):
            raise ConfigError(f"distill_layers must be a non-empty list of module paths or a mapping "
                              f"{{student_path: teacher_path}}, got {layers!r}")
        self.pairs = pairs
        self.outputs: dict[tuple[str, str], Any] = {}
        self._handles = []
        try:
            for side, model, paths in (("student", student, [s for s, _ in pairs]),
                                       ("teacher", teacher, [t for _, t in pairs])):
                modules = dict(model.named_modules())
                for path in paths:
                    if path not in modules:
                        near = difflib.get_close_matches(path, list(modules), n=3)
                        raise ConfigError(f"distill_layers: the {side} has no module {path!r}"
                                          f"{f' (did you mean {near}?)' if near else ''}")
                    _check_called(model, path, side)
                    self._handles.append(modules[path].register_forward_hook(self._recorder(side, path)))
        except ConfigError:
            self.close()
            raise

    def _recorder(self, side: str, path: str) -> Callable:
        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[(side, path)] = output
        return record

    def loss(self, inputs: Any = None) -> torch.Tensor:
        """The mean MSE over the pairs for the forward passes just run; clears the recorded outputs.

        When ``inputs`` is a dict with an ``attention_mask`` and an output's leading dims hold as
        many positions as the mask, only the tokens the mask marks count (padding never does).
        """
        mask = token_mask(inputs)
        terms = []
        try:
            for s_path, t_path in self.pairs:
                missing = [f"{side} {p!r}" for side, p in (("student", s_path), ("teacher", t_path))
                           if (side, p) not in self.outputs]
                if missing:
                    raise InputError(f"distill_layers: {' and '.join(missing)} did not run in this step; "
                                     f"name layers every forward pass calls")
                student, teacher = self.outputs[("student", s_path)], self.outputs[("teacher", t_path)]
                if mask is not None and isinstance(student, torch.Tensor) \
                        and isinstance(teacher, torch.Tensor) and student.shape == teacher.shape \
                        and student.dim() >= 2 and student.shape[:-1].numel() == mask.numel():
                    terms.append(token_mse(student, teacher, mask))
                else:
                    terms.append(distillation_loss(student, teacher, "mse"))
        finally:
            self.outputs.clear()
        return torch.stack(terms).mean()

    def close(self) -> None:
        """Remove the hooks (the models are as they were before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _check_called(model: torch.nn.Module, path: str, side: str) -> None:
    """ConfigError when ``model`` is a graph that never calls module ``path`` (a container whose layers it inlined)."""
    if not isinstance(model, fx.GraphModule):
        return
    called = {str(n.target) for n in model.graph.nodes if n.op == "call_module"}
    if path not in called:
        inside = sorted(c for c in called if c.startswith(f"{path}."))[:6]
        raise ConfigError(f"distill_layers: the {side} is a graph that never calls {path!r}"
                          + (f" (a container: it calls its layers {inside}); name one of them" if inside
                             else "; name a module the graph calls"))
