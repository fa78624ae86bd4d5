"""Digits: a real task that trains in seconds on a CPU, for demos, tests and benchmarks.

scikit-learn ships the 1797 8x8 handwritten digit images of the UCI "optdigits"
set, so nothing is downloaded.  The two models are small but have what
compression passes care about: conv-BN-ReLU chains, residual adds, max pooling,
a flatten into linear layers, and (in the ResNet) strided blocks with 1x1
downsample branches.

Guarantees: :func:`load_digits_data` and :func:`train` are deterministic for a
seed (training runs single-threaded so float reductions happen in one order),
neither touches the caller's global RNG state, and :func:`pretrained_digits_cnn`
reaches at least 95% test accuracy (about 98% in practice).
"""

from __future__ import annotations

import copy
import math
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsData",
    "DigitsCNN",
    "DigitsResNet",
    "load_digits_data",
    "train",
    "accuracy",
    "pretrained_digits_cnn",
    "pretrained_digits_resnet",
]

NUM_CLASSES = 10
_TEST_FRACTION = 0.2
_BATCH_SIZE = 64


class DigitsData(NamedTuple):
    """Train and test split: images ``[N, 1, 8, 8]`` float32, labels ``[N]`` int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is an extra, not a runtime dependency
        raise ImportError(
            "the digits example needs scikit-learn: pip install 'fxcompress[test]'"
        ) from err
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1)
    return images, torch.from_numpy(digits.target).to(torch.int64)


def load_digits_data(seed: int = 0) -> DigitsData:
    """A seeded 80/20 split of the digits, normalised with the training split's mean and std.

    The same seed always gives the same split; the tensors are fresh copies.
    """
    images, labels = _digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * _TEST_FRACTION)
    test, train_ = order[:n_test], order[n_test:]
    mean, std = images[train_].mean(), images[train_].std()
    normalised = (images - mean) / std
    return DigitsData(normalised[train_], labels[train_], normalised[test], labels[test])


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]


class DigitsCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block, max-pool, conv-BN-ReLU, max-pool, flatten, MLP head.

    Input ``[N, 1, 8, 8]``, output logits ``[N, 10]``; about 18k parameters.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, width), nn.ReLU())
        self.branch = nn.Sequential(
            *_conv_bn(width, width), nn.ReLU(), *_conv_bn(width, width)
        )
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv = nn.Sequential(*_conv_bn(width, 2 * width), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.fc1 = nn.Linear(2 * width * 2 * 2, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.branch(x))
        x = self.pool2(self.conv(self.pool1(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 conv-BN downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, stride), nn.ReLU(), *_conv_bn(cout, cout)
        )
        self.downsample = (
            nn.Sequential(*_conv_bn(cin, cout, stride, kernel=1))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class DigitsResNet(nn.Module):
    """A small ResNet: stem, one basic block per width (strided after the first), avg-pool, linear.

    With the default widths ``(16, 32, 64)`` the maps go 8x8 -> 4x4 -> 2x2.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, widths[0]), nn.ReLU())
        blocks = [BasicBlock(widths[0], widths[0])]
        blocks += [BasicBlock(a, b, stride=2) for a, b in zip(widths, widths[1:])]
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def train(
    model: nn.Module, data: DigitsData, *, epochs: int = 15, lr: float = 0.05, seed: int = 0
) -> nn.Module:
    """Train ``model`` in place on ``data``'s training split; returns it in eval mode.

    SGD with Nesterov momentum, cosine learning-rate decay, cross-entropy,
    seeded shuffling, one thread: two calls on equal models with equal
    arguments produce bit-identical weights.  Neither the global RNG nor the
    thread count is changed for the caller.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps = epochs * math.ceil(len(data.train_y) / _BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(data.train_y), generator=gen)
            for batch in order.split(_BATCH_SIZE):
                loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in percent, evaluated in eval mode.

    The model's training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        predictions = model(x).argmax(dim=1)
    finally:
        model.train(was_training)
    return 100.0 * (predictions == y).float().mean().item()


def _seeded(factory: type[nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@functools.lru_cache(maxsize=None)
def _trained(factory: type[nn.Module], seed: int) -> nn.Module:
    return train(_seeded(factory, seed), load_digits_data(seed), seed=seed)


def pretrained_digits_cnn(seed: int = 0) -> DigitsCNN:
    """A :class:`DigitsCNN` trained on ``load_digits_data(seed)`` (≥ 95% test accuracy).

    Trained once per seed and process (a few seconds); each call returns a
    fresh copy in eval mode, so callers may modify it.
    """
    return copy.deepcopy(_trained(DigitsCNN, seed))


def pretrained_digits_resnet(seed: int = 0) -> DigitsResNet:
    """A :class:`DigitsResNet` trained on ``load_digits_data(seed)``; like :func:`pretrained_digits_cnn`."""
    return copy.deepcopy(_trained(DigitsResNet, seed))
