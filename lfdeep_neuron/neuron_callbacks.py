"""Python callables handed to NEURON (``FInitializeHandler``, ``cvode.event``) that do not own their target.

NEURON keeps every handler and queued event alive for as long as it likes; a bound method would keep its
object (an engine, an LFP sampler) alive with it and form cycles through hoc objects. :class:`WeakMethodCall`
holds the object through a weak reference instead, and pauses Python's garbage collector during the call:
a collection inside a NEURON callback could free hoc objects NEURON is still iterating over.
"""
from __future__ import annotations

import gc
import weakref

__all__ = ["WeakMethodCall"]


class WeakMethodCall:
    """``obj.<name>()`` through a weak reference (nothing happens once ``obj`` is gone), GC paused.

    Parameters
    ----------
    obj : object
        The target; only a weak reference is kept.
    name : str
        Name of the method to call (no arguments).
    """

    __slots__ = ("ref", "name")

    def __init__(self, obj, name: str):
        self.ref = weakref.ref(obj)
        self.name = name

    def __call__(self):
        obj = self.ref()
        if obj is None:
            return
        enabled = gc.isenabled()
        gc.disable()
        try:
            getattr(obj, self.name)()
        finally:
            if enabled:
                gc.enable()
