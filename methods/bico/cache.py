"""The globally bound context of one denoiser forward, computed once and shared by every site.

Why: the global binder's input is the same context at every cross-attention site of a forward (30
sites on Wan2.1-1.3B, 16 on SD1.5), so computing `ctx_g = where(mask, ctx + f_g(ctx), ctx)` at each
site repeats the same pass; with the cache a forward runs the global binder once and each site only
its own binder. Under autograd the shared tensor is one node of the forward's graph, so the global
binder's gradient is the sum over the sites that use it, as when each site computed it.

Who computes. An entry is owned by the site that made it: the first site of a forward, in forward
order. The owner recomputes at every call of its own (each one is a new forward, or the
recomputation of its checkpointed block in backward); every other site reuses the entry while the
key matches, and otherwise computes one and becomes its owner. Why not "the first call of a forward":
a forward has no marked start at a context hook, and under gradient checkpointing (diffusers'
non-reentrant `torch.utils.checkpoint`) a block recomputed in backward must save exactly the tensors
its forward saved. The owner's block ran the global binder in its forward, so it runs it again; the
other blocks reused the entry, and in backward it is still there (their checkpointed inputs keep
its context alive), so they reuse it again.

Key: the context tensor object and the declared rows object (both held weakly), plus what the caller
puts in `state` (BiCo: training rows or not, the stage phase, the binder parameters' versions, which
in-place optimiser steps bump).

Lifetime: the one entry is dropped as soon as its context tensor is freed (a weakref callback): at
inference at the end of each forward on Wan2.1 (the projected context is made inside it) or of
`generate` on SD1.5; in training when backward frees the step's graph. Nothing is kept across
training steps; `clear()` drops it at once (detach, a new stage).

Composition: each concept holds its own cache. A concept whose hook runs after another's at a site
receives that hook's per-site output, a new tensor at each site, so it computes at each site (as
without the cache): identity is the key, never values.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GlobalBinding:
    """What every site of one forward shares: the context with the absorbent token written (training;
    None when nothing is written: the entry must not hold its own key, the context, strongly), where
    the binders act, and the globally bound context (None when the mask is empty)."""

    written: torch.Tensor | None
    mask: torch.Tensor
    bound: torch.Tensor | None


@dataclass(frozen=True)
class _Entry:
    context: weakref.ref
    rows: weakref.ref
    state: tuple
    owner: int
    value: Any


class SiteSharedCache:
    """One shared value per forward, keyed as the module docstring says. `enabled=False` computes at
    every site (the uncached path, for comparisons)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entry: _Entry | None = None

    def get(self, context: torch.Tensor, rows: Any, state: tuple, site: int) -> Any:
        """The value shared in this forward, or None: the caller computes it (and `put`s it)."""
        entry = self._entry
        if entry is None or entry.owner == site:
            return None
        if entry.context() is not context or entry.rows() is not rows or entry.state != state:
            return None
        return entry.value

    def put(self, context: torch.Tensor, rows: Any, state: tuple, site: int, value: Any) -> None:
        if not self.enabled:
            return
        self._entry = _Entry(weakref.ref(context, _dropper(self)), weakref.ref(rows), state, site, value)

    def clear(self) -> None:
        self._entry = None

    @property
    def holds(self) -> bool:
        return self._entry is not None

    def _drop(self, context_ref: weakref.ref) -> None:
        if self._entry is not None and self._entry.context is context_ref:
            self._entry = None


def _dropper(cache: SiteSharedCache):
    """A weakref callback that drops the cache's entry when its context dies. It holds the cache
    weakly, so the entry (which holds the callback) does not keep its own cache alive."""
    cache_ref = weakref.ref(cache)

    def drop(context_ref: weakref.ref) -> None:
        owner = cache_ref()
        if owner is not None:
            owner._drop(context_ref)

    return drop
