"""Mask conventions, each written once.

:class:`~fxcompress.prune.attention.PrunedMultiheadAttention` and
:class:`~fxcompress.quant.lowered_attention.QuantMultiheadAttention` both take the
masks ``nn.MultiheadAttention`` takes and hand one additive mask to
``F.scaled_dot_product_attention`` (:func:`additive_mask`).  The passes and helpers that
measure on calibration batches (activation importance, reconstruction, layer distillation)
leave padding out through :func:`token_mask`.
"""

from __future__ import annotations

import torch

from fxcompress.errors import InputError

__all__ = ["additive_mask", "token_mask"]


def token_mask(batch: object) -> torch.Tensor | None:
    """The real tokens of a batch: a dict batch's ``attention_mask`` (1 = token, 0 = padding), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, torch.Tensor) else None


def _additive(mask: torch.Tensor, dtype: torch.dtype, name: str, owner: str) -> torch.Tensor:
    """A mask (bool: True = not attended; or float, added) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise InputError(f"{owner}: {name} must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


def additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, *, batch: int,
                  heads: int, tgt: int, src: int, dtype: torch.dtype, owner: str) -> torch.Tensor | None:
    """One additive mask broadcastable to ``(batch, heads, tgt, src)``, or None without masks.

    ``attn_mask`` is ``(tgt, src)`` or ``(batch * heads, tgt, src)`` (heads inner, as in
    ``nn.MultiheadAttention``); ``key_padding_mask`` is ``(batch, src)``. Other shapes
    raise :class:`~fxcompress.errors.InputError` naming ``owner``'s expectations.
    """
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype, "attn_mask", owner)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, tgt, src)
        elif mask.shape != (tgt, src):
            raise InputError(f"attn_mask must be ({tgt}, {src}) or ({batch * heads}, {tgt}, {src}), "
                             f"got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, src):
            raise InputError(f"key_padding_mask must be ({batch}, {src}), got {tuple(key_padding_mask.shape)}")
        padding = _additive(key_padding_mask, dtype, "key_padding_mask", owner).view(batch, 1, 1, src)
        mask = padding if mask is None else mask + padding
    return mask
