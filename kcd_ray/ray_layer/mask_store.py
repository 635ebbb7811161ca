"""The condensation mask and the epoch served to the Ray Data plan: a named actor holding the current state.

``MaskStore`` keeps ``(version, kept, overlay)`` and the current training ``epoch``. ``kept`` is a
bool array indexed by sample id, put in the object store by the actor itself (so it lives as long as the actor and every
reader maps it zero-copy from shared memory); ``overlay`` is the blend-overlay manifest
(a small JSON-able dict, see ``kcd_ray.data.blend``) or None. Version 0 (nothing published)
means every sample is kept and no image is blended; ``current()`` then returns
``(0, None, None)``.

Readers (the train map in ``pipeline.py``) call :func:`read_state`, which asks the actor for the
version, a *reference* to the array, the overlay and the epoch in one call, and fetches the array
only when the version or the array changed (cached per worker process, keyed by version and object
id). :func:`read_mask` is the same without the epoch. Versions must increase, except that
``replace=True`` re-serves a version after a resume.

Epoch. The train plan is built once and re-executed by Ray Data every epoch, so the epoch that
seeds the row order and the augmentation is read from here at execution time: the training
worker on rank 0 calls :func:`set_epoch` before iterating each epoch (then a barrier), so every
map task of that execution sees it. Set it (and publish masks) between epochs only: the map
tasks of one execution read the store at different times. Any int is accepted (negative ones for an initialisation
stage, smaller ones after a resume); nothing is derived from how often a plan ran. A store that
was never given an epoch serves 0.

Lifetime: the actor is not detached, so it is fate-shared with the process that created it.
Create it from the driver (``get_mask_store(name, create=True)`` before ``trainer.fit()``); a
Train worker that created it would take it down when the worker group restarts. It is placed on the
head node (as Ray Train places its own state actor): a lost worker node (spot, elastic runs) must not take
the run's mask with it, and a driver need not run on the head.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np
import ray

from kcd_ray.data.kept import is_kept  # noqa: F401 - the mask's membership test

HEAD_NODE = "node:__internal_head__"  # the head node's own resource (ray._common.constants.HEAD_NODE_RESOURCE_NAME)


@ray.remote(num_cpus=0, max_concurrency=8)
class MaskStore:
    """Named actor: the current condensation mask version and data epoch (see the module docstring)."""

    def __init__(self):
        self._version = 0
        self._ref = None  # ObjectRef of the bool array, owned by this actor
        self._overlay = None
        self._num_kept = None
        self._epoch = 0
        self._world = 1  # how many Train workers share the epoch (the "full" order pads to a multiple of it)

    def publish(self, version: int, kept_ids, overlay: Optional[dict] = None, num_samples: Optional[int] = None,
                replace: bool = False) -> int:
        """``replace=True`` re-serves a version after a resume (it may be older than what a crashed run published)."""
        version = int(version)
        if version <= self._version and not replace:
            raise ValueError(f"version: {version} must be greater than the current version {self._version}")
        kept = kept_bool_array(kept_ids, num_samples)
        self._ref = ray.put(kept)
        self._version, self._overlay, self._num_kept = version, overlay, int(kept.sum())
        return version

    def current(self):
        """(version, kept bool array or None = all kept, overlay manifest or None)."""
        return self._version, (ray.get(self._ref) if self._ref is not None else None), self._overlay

    def current_ref(self):
        """(version, [ObjectRef of the kept array] or None, overlay): cheap, for cached readers."""
        return self._version, ([self._ref] if self._ref is not None else None), self._overlay

    def state_ref(self):
        """(version, [ObjectRef of the kept array] or None, overlay, epoch, world): one call per reader batch."""
        return (self._version, ([self._ref] if self._ref is not None else None), self._overlay, self._epoch,
                self._world)

    def set_epoch(self, epoch: int, world: int = 1) -> int:
        self._epoch, self._world = int(epoch), int(world)
        return self._epoch

    def epoch(self) -> int:
        return self._epoch

    def version(self) -> int:
        return self._version

    def summary(self) -> dict:
        return {"version": self._version, "num_kept": self._num_kept, "overlay": self._overlay is not None,
                "epoch": self._epoch, "world": self._world}


class MaskState(NamedTuple):
    """What one reader batch sees: the mask (``kept`` None = all kept), its overlay, the current epoch and the
    number of Train workers it is split between."""

    version: int
    kept: Optional[np.ndarray]
    overlay: Optional[dict]
    epoch: int
    world: int = 1


def kept_bool_array(kept_ids, num_samples: Optional[int] = None) -> np.ndarray:
    """kept ids (int array) or an already-built bool mask -> bool array indexed by sample id.

    Ids beyond the array's end read as "not kept" (see :func:`is_kept`), so ``num_samples`` is
    only needed to size the array exactly.
    """
    a = np.asarray(kept_ids)
    if a.dtype == np.bool_:
        if a.ndim != 1:
            raise ValueError(f"kept_ids: a bool mask must be 1-D, got shape {a.shape}")
        return a.copy()
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"kept_ids: expected integer sample ids or a bool mask, got dtype {a.dtype}")
    a = a.astype(np.int64).reshape(-1)
    if a.size and a.min() < 0:
        raise ValueError(f"kept_ids: sample ids must be >= 0, got {int(a.min())}")
    n = int(num_samples) if num_samples is not None else (int(a.max()) + 1 if a.size else 0)
    if a.size and a.max() >= n:
        raise ValueError(f"kept_ids: id {int(a.max())} is out of range for num_samples={n}")
    out = np.zeros(n, np.bool_)
    out[a] = True
    return out


def get_mask_store(name: str, create: bool = True):
    """Handle of the named MaskStore; ``create`` makes it if missing (call that on the driver)."""
    if not name:
        raise ValueError("mask_store_name: expected a non-empty actor name")
    if create:
        # Keep a handle in this process: Ray kills a non-detached actor once no handle is left,
        # and callers often drop the return value (the store is found by name later).
        handle = _OWNED[name] = MaskStore.options(name=name, get_if_exists=True, lifetime=None,
                                                  resources={HEAD_NODE: 0.001},
                                                  # outside a Tune trial's placement group, which has no head share
                                                  scheduling_strategy="DEFAULT").remote()
        return handle
    try:
        return ray.get_actor(name)
    except ValueError:
        raise ValueError(f"mask store {name!r}: no such actor in this Ray job/namespace; create it on the "
                         f"driver with get_mask_store({name!r}, create=True) before building the trainer") from None


def _handle(store: Union[str, "ray.actor.ActorHandle"]):
    return get_mask_store(store, create=False) if isinstance(store, str) else store


def publish_mask(store: Union[str, "ray.actor.ActorHandle"], version: int, kept_ids, overlay: Optional[dict] = None,
                 num_samples: Optional[int] = None, replace: bool = False) -> int:
    """Publish a new mask version and wait until the store holds it; returns the version."""
    return ray.get(_handle(store).publish.remote(int(version), np.asarray(kept_ids), overlay, num_samples, replace))


def set_epoch(store: Union[str, "ray.actor.ActorHandle"], epoch: int, world: int = 1) -> None:
    """Make ``epoch`` the one the next executions of the train plan use; returns once the store holds it.

    ``store``: the actor's name or handle. Call it on one process (Train rank 0) before each epoch's
    iteration, then a barrier, so no worker starts the epoch before the store holds it. Any int
    (negative ones included); it need not increase. ``world``: the number of Train workers the epoch is
    split between (an elastic run changes it between attempts).
    """
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
        raise TypeError(f"epoch: expected an int, got {type(epoch).__name__} {epoch!r}")
    if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
        raise ValueError(f"world: expected an int >= 1 (the number of Train workers), got {world!r}")
    ray.get(_handle(store).set_epoch.remote(int(epoch), int(world)))


_OWNED: dict = {}  # stores created by this process, kept alive until it exits
_HANDLES: dict = {}
_CACHE: dict = {}  # store name -> ((version, array object id), kept array or None)


def _state_ref(name: str):
    for attempt in range(2):
        handle = _HANDLES.get(name)
        if handle is None:
            handle = _HANDLES[name] = get_mask_store(name, create=False)
        try:
            return ray.get(handle.state_ref.remote())
        except ray.exceptions.RayActorError:  # the store was re-created under the same name
            _HANDLES.pop(name, None)
            if attempt:
                raise


def read_state(name: str) -> MaskState:
    """(version, kept bool array or None, overlay, epoch) of the named store: ONE actor call.

    The kept array is fetched only when (version, array object id) changed since this process last
    read it (a resumed run may re-serve a version number with a new array).
    """
    version, ref, overlay, epoch, world = _state_ref(name)
    key = (version, ref[0].hex() if ref is not None else None)
    cached = _CACHE.get(name)
    if cached is not None and cached[0] == key:
        kept = cached[1]
    else:
        kept = ray.get(ref[0]) if ref is not None else None
        _CACHE[name] = (key, kept)
    return MaskState(version, kept, overlay, epoch, world)


def read_mask(name: str) -> tuple[int, Optional[np.ndarray], Optional[dict]]:
    """(version, kept bool array or None, overlay) of the named store, cached per version in this process."""
    state = read_state(name)
    return state.version, state.kept, state.overlay
