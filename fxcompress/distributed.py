"""Running fxcompress across processes with ``torch.distributed`` (``torchrun``).

Under ``torchrun`` each process (rank) builds the same model and runs the same
pipeline; what differs is the data each rank passes (its shard, as
:func:`shard` or a ``DistributedSampler`` gives it).  The library then:

* ``calibrate`` merges every activation observer across ranks
  (:func:`merge_observers`): all-reduced min/max for min/max observers, the
  observers' own ``merge`` (in rank order) for histogram-backed and
  moving-average ones, so every rank ends with the qparams one process would
  compute on the union of the shards;
* ``fxcompress.sensitivity`` splits its candidates across ranks and gathers
  the entries; ``finetune`` trains data-parallel (DDP);
* only rank 0 writes files (:func:`on_rank_zero`): reports, plots, artifacts
  (``Result.save``).

Failure handling: a step that may fail on one rank only (bad data in one
shard) runs inside :func:`collective_step`; every rank then learns of the
failure at the end of the step and raises :class:`DistributedError` naming the
rank, the error type and message, so no rank hangs in a later collective and
nothing is written.  Without an initialised process group (or with one rank)
every helper is a no-op and errors keep their own type.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError

__all__ = [
    "World",
    "world",
    "shard",
    "check_backend",
    "collective_step",
    "on_rank_zero",
    "all_gather_objects",
    "broadcast_object",
    "merge_observers",
    "BACKEND_DEVICES",
]

T = TypeVar("T")

#: The device types whose tensors each process-group backend can carry in collectives.
BACKEND_DEVICES: dict[str, frozenset[str]] = {
    "gloo": frozenset({"cpu", "cuda"}),
    "nccl": frozenset({"cuda"}),
    "mpi": frozenset({"cpu", "cuda"}),
    "ucc": frozenset({"cpu", "cuda"}),
    "xccl": frozenset({"xpu"}),
}


@dataclass(frozen=True)
class World:
    """This process's place in the default process group (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Whether more than one process takes part (collectives are needed)."""
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files: rank 0, or the only process."""
        return self.rank == 0


def world() -> World:
    """The default process group as a :class:`World` (``World()`` when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def shard(data: Sequence[T], w: World | None = None) -> list[T]:
    """This rank's shard of ``data``: items ``rank, rank + size, ...``, as ``DistributedSampler``
    deals them with ``shuffle=False`` but without padding, so shards of unequal length stay
    unequal (calibrate reports it) and no item is seen twice."""
    w = w or world()
    return list(data[w.rank::w.size])


def _backend_devices(backend: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` -> ``{"cpu": "gloo", "cuda": "nccl"}``; a plain name serves every device."""
    if ":" not in backend:
        return {device: backend for device in BACKEND_DEVICES.get(backend, ())}
    pairs = (part.split(":", 1) for part in backend.split(","))
    return {device.strip(): name.strip() for device, name in pairs}


def check_backend(backend: str | None, device: torch.device | str, what: str) -> None:
    """Raise :class:`DistributedError` when ``backend`` cannot carry ``device`` tensors.

    ``what`` names the tensors ("calibration observers", "gradients") for the message.
    """
    if backend is None:
        return
    device_type = torch.device(device).type
    if device_type not in _backend_devices(backend):
        able = sorted(name for name, devices in BACKEND_DEVICES.items() if device_type in devices)
        raise DistributedError(
            f"the process group's backend {backend!r} cannot carry {device_type} tensors, and the {what} "
            f"are {device_type} tensors; initialise the group with a backend that can "
            f"({', '.join(able) or 'none known'}: e.g. torch.distributed.init_process_group('gloo'), "
            f"or 'cpu:gloo,cuda:nccl' for both devices)")


def all_gather_objects(obj: Any, w: World | None = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group)."""
    w = w or world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, w: World | None = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    w = w or world()
    if not w.active:
        return obj
    box = [obj if w.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def collective_step(what: str, w: World | None = None) -> Iterator[None]:
    """Run a block on every rank, then agree on whether it failed anywhere.

    With one process the block's exception propagates unchanged.  Across
    processes every rank reaches the agreement (one ``all_gather_object``)
    even when its own block raised, and if any rank failed, every rank raises
    :class:`DistributedError` naming ``what``, each failing rank and its error
    (on the failing rank, chained to the original exception).
    """
    w = w or world()
    if not w.active:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:  # reported to every rank below, then raised
        failure = exc
    reports = all_gather_objects(None if failure is None else _describe(failure), w)
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if failed:
        detail = "; ".join(f"rank {rank} raised {text}" for rank, text in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {w.size} ranks: {detail}; every rank stops "
                               f"here and nothing is written") from failure


def on_rank_zero(fn: Callable[[], T], what: str, w: World | None = None) -> T:
    """Call ``fn`` on rank 0 only (it writes files) and return its result on every rank.

    A failure on rank 0 raises :class:`DistributedError` on every rank.
    """
    w = w or world()
    if not w.active:
        return fn()
    result: Any = None
    with collective_step(what, w):
        if w.is_writer:
            result = fn()
    return broadcast_object(result, w)


# -- observers ------------------------------------------------------------------------
def merge_observers(observers: Sequence[Any], w: World | None = None) -> None:
    """Merge each observer's state with the same observer on every other rank, in place.

    After it every rank holds, for each observer, the state one process would
    have after observing every rank's data: min/max observers exactly (their
    min, max and counts are all-reduced), the others through their ``merge``
    in rank order (exact for histograms sharing a grid, re-binned to about a
    bin width otherwise; a moving average as if rank 0's batches came first,
    then rank 1's, ...).  The observers must be listed in the same order on
    every rank (the graph's order: the same model gives it); a rank whose list
    differs in length, types or specs raises :class:`DistributedError` on all.
    """
    from .quant.observers import MinMaxObserver

    w = w or world()
    if not w.active or not observers:
        return
    check_backend(w.backend, "cpu", "calibration observers")
    layout = [(type(o).__name__, o.spec.to_dict(), o.where) for o in observers]
    layouts = all_gather_objects(layout, w)
    for rank, other in enumerate(layouts):
        if other != layout:
            raise DistributedError(f"rank {rank} has different observers than rank {w.rank} "
                                   f"({len(other)} vs {len(layout)}, or other types/specs): every rank must "
                                   f"build the same model and pipeline")
    exact = [o for o in observers if type(o) is MinMaxObserver]
    _all_reduce_min_max(exact, w)
    others = [o for o in observers if type(o) is not MinMaxObserver]
    states = all_gather_objects([_plain_state(o) for o in others], w)
    for index, observer in enumerate(others):
        merged = _fresh(observer)
        for rank_states in states:
            part = _fresh(observer)
            part.load_state_dict(rank_states[index])
            merged.merge(part)
        observer.load_state_dict(merged.state_dict())


def _plain_state(observer: Any) -> dict[str, torch.Tensor]:
    """The state as normal tensors (calibration writes inference tensors, which pickle poorly)."""
    with torch.inference_mode(False):
        return {k: v.clone() for k, v in observer.state_dict().items()}


def _fresh(observer: Any) -> Any:
    """An empty observer of the same type, spec and label."""
    return type(observer)(observer.spec, observer.where)


def _all_reduce_min_max(observers: Sequence[Any], w: World) -> None:
    """Min/max observers: one MIN, one MAX and one SUM all-reduce over all of them together.

    A rank that saw no data for an observer contributes +inf / -inf, so it
    changes nothing; the shapes come from the ranks that did see data.
    """
    if not observers:
        return
    shapes = all_gather_objects([tuple(o.min_val.shape) if o.has_data else None for o in observers], w)
    sizes = []
    for index, observer in enumerate(observers):
        seen = {s[index] for s in shapes if s[index] is not None}
        if len(seen) > 1:
            raise DistributedError(f"observer at {observer.where!r} has min/max of shapes {sorted(seen)} on "
                                   f"different ranks: every rank must observe tensors with the same channels")
        sizes.append(next(iter(seen)) if seen else None)
    lows, highs = [], []
    for observer, shape in zip(observers, sizes):
        if shape is None:
            continue
        n = int(torch.Size(shape).numel())
        lows.append(observer.min_val.reshape(-1).float() if observer.has_data else torch.full((n,), float("inf")))
        highs.append(observer.max_val.reshape(-1).float() if observer.has_data
                     else torch.full((n,), float("-inf")))
    with torch.inference_mode(False):
        low = torch.cat(lows) if lows else torch.zeros(0)
        high = torch.cat(highs) if highs else torch.zeros(0)
        counts = torch.stack([o.num_observed.clone() for o in observers])
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    offset = 0
    for index, (observer, shape) in enumerate(zip(observers, sizes)):
        observer.num_observed = counts[index].clone()
        if shape is None:
            continue
        n = int(torch.Size(shape).numel())
        observer.min_val = low[offset:offset + n].reshape(shape).clone()
        observer.max_val = high[offset:offset + n].reshape(shape).clone()
        offset += n
