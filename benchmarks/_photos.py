"""Real photo crops from scikit-learn's two sample images (``load_sample_images``: a temple in China
and a flower), for benchmarks that need real image statistics without a download.

:func:`photo_crops` cuts ``n`` seeded random square crops (side 20-100 % of the shorter image side,
anywhere in either image, half of them mirrored), resizes them to ``size`` and normalises them with
the ImageNet mean and standard deviation, as torchvision and EfficientNet models expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["photo_crops"]

_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def photo_crops(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` float32 crops, deterministic for ``seed``."""
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0 for img in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.2 + 0.8 * torch.rand((), generator=gen).item()))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = img[:, top:top + side, left:left + side].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if i % 4 >= 2:
            crop = crop.flip(-1)
        crops.append(crop)
    return (torch.cat(crops) - _MEAN) / _STD
