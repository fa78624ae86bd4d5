"""Module rewriting shared by the passes: replace a module at every path it is reachable under.

A module object may be reachable under several names (``self.a = self.b = conv``) and be
called by several nodes. Replacing it at one path only would leave the other names computing
the old module, so the passes that swap modules (observed, fake-quantized and folded layers,
activation quantizers) go through :func:`replace_modules`, which gives each module object one
replacement, installed at all of its paths.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["replace_modules", "module_paths"]


def module_paths(root: nn.Module) -> dict[int, list[str]]:
    """Every path of every submodule, by module identity (first path first)."""
    paths: dict[int, list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(module), []).append(path)
    return paths


def replace_modules(root: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace submodules of ``root``; returns how many distinct modules were replaced.

    ``replacement(path, module)`` is called once per distinct module object (with its first
    path) and returns the new module, or None to keep it; the new module is installed at every
    path the old one had. Submodules are visited parents first, as they were before any
    replacement.
    """
    replaced = 0
    seen: set[int] = set()
    paths = module_paths(root)
    for path, module in list(root.named_modules(remove_duplicate=False)):
        if not path or id(module) in seen:
            continue
        seen.add(id(module))
        new = replacement(path, module)
        if new is None:
            continue
        for alias in paths[id(module)]:
            root.set_submodule(alias, new)
        replaced += 1
    return replaced
