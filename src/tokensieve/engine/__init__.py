"""The engine: per-instance shims around the decoder layers that apply the ledger.

``prune(model, method, **options)`` is a context manager. On entry it checks the method against the
model (raising before anything is touched), then installs, on this model instance only:

* a forward pre-hook and hook on the top-level model, which open and close a *pass* (one forward
  call: the prefill or one decode step), read the input layout and turn the cache into a
  :class:`~tokensieve.cache.LedgerCache`;
* a ``forward`` attribute on each decoder layer (the shim) that applies the method's selections at
  its points, gathers the layer's keyword arguments (rotary rows, position ids, mask) for the alive
  rows, calls the original layer, and records and evicts that layer's cache entries;
* for a method that merges inside the vision tower (ToMe), a ``forward`` attribute on each vision
  encoder layer up to the feature layer (:mod:`tokensieve.tower`).

Leaving the context removes all of it, also when the body raises.

One concern per module: :mod:`.context` (``prune()``, ``Run``), :mod:`.core` (checks, install/remove,
passes, the layer shim), :mod:`.selection` (views and selections), :mod:`.positions` (rotary rows,
position ids, masks), :mod:`.inside` (tokens leaving inside a layer), :mod:`.projections` (a layer's q/k projections
computed once for the layer and the attention rows a method reads), :mod:`.transitions` (TransPrune's
accumulated transitions), :mod:`.cache_side` (cache rows, eviction, shifted cache positions),
:mod:`.revival` (tokens chosen again at every pass, the Aux Cache that revives them),
:mod:`.reporting` (the per-sample report), :mod:`.state` (what the parts share).
"""

from .context import Run, prune
from .core import Engine
from .reporting import UNPRUNED_NOTE

__all__ = ["Engine", "Run", "UNPRUNED_NOTE", "prune"]
