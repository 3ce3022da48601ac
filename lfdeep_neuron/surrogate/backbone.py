"""Sequence backbones: the declared interface of every trunk, expert group and compressor, and its registry.

A surrogate (:mod:`~lfdeep_neuron.surrogate.mtl`) turns its input sequence into features with one or more
*backbones* and maps the features to its tasks with towers. A backbone is any ``nn.Module`` subclass of
:class:`Backbone` that provides two equivalent ways of running:

``forward(x [B, c_in, T]) -> [B, c_out, T]``
    the full-sequence pass used for training; causal: output t depends on inputs 0..t only.
``step(x_t [N, c_in], state) -> (h_t [N, c_out], new_state)``
    one time step for N independent sequences (cells) in eval mode. **Pure**: the state passed in is not
    modified; the caller (the :class:`~lfdeep_neuron.surrogate.stream.Streamer`) owns it and keeps the
    returned one. ``initial_state(N, device, dtype)`` is the state before the first step.

Starting from ``initial_state`` and stepping through the columns of ``x`` must reproduce ``forward(x)`` (to
float round-off) and the state must not grow with time (O(1) per step). A state is a tuple of tensors, each
with the cells on dim 0, so that a caller can reset some cells by writing ``initial_state`` rows into them.

``n_groups = G > 1`` asks for G independent backbones computed as one ("experts"): they all read the same
input and output ``[B, G * c_group, T]``, channel ``g * c_group + c`` being channel c of group g.

Adding a backbone is one new file and one registration::

    @register_backbone("mine")
    class Mine(Backbone):
        @classmethod
        def from_config(cls, c_in, widths, n_groups, config): ...

after which ``SurrogateConfig(backbone="mine")`` builds MH / MMoE / MMoEEx on it. ``widths`` are the
per-group layer widths of the role (``config.channels`` for trunks and experts, ``config.compressor`` for
the MMoE gate compressor); ``config`` is the whole :class:`~lfdeep_neuron.surrogate.mtl.SurrogateConfig`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["Backbone", "State", "BACKBONES", "register_backbone", "build_backbone", "single_width", "state_map",
           "state_bytes"]

State = tuple   # of tensors (or nested tuples of tensors), cells on dim 0 of every tensor


class Backbone(nn.Module):
    """Interface of a sequence backbone (see the module docstring). Subclasses set ``c_in``, ``c_out``
    and ``n_groups`` and implement :meth:`forward`, :meth:`initial_state`, :meth:`step`, :meth:`from_config`."""

    c_in: int
    c_out: int
    n_groups: int = 1

    @classmethod
    def from_config(cls, c_in: int, widths: tuple, n_groups: int, config) -> "Backbone":
        """Build for ``c_in`` input channels, per-group layer ``widths``, ``n_groups`` groups."""
        raise NotImplementedError

    @property
    def receptive_field(self) -> float:
        """Input steps that can influence one output step (``math.inf`` for recurrent backbones)."""
        return math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # [B, c_in, T] -> [B, c_out, T]
        raise NotImplementedError

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError


#: name -> Backbone subclass
BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make a :class:`Backbone` subclass buildable as ``SurrogateConfig(backbone=name)``."""
    def deco(cls: type[Backbone]) -> type[Backbone]:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"register_backbone({name!r}): {cls!r} is not a Backbone subclass")
        if name in BACKBONES and BACKBONES[name] is not cls:
            raise ValueError(f"backbone name {name!r} is already taken by {BACKBONES[name].__name__}")
        BACKBONES[name] = cls
        return cls
    return deco


def _load_builtin() -> None:
    # The built-in backbones register themselves on import.
    from lfdeep_neuron.surrogate import branch, recurrent, tcn  # noqa: F401


def build_backbone(name: str, c_in: int, widths, n_groups: int, config) -> Backbone:
    """The registered backbone ``name`` built for this role (see the module docstring)."""
    _load_builtin()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name].from_config(int(c_in), tuple(widths), int(n_groups), config)


def single_width(name: str, widths: tuple) -> int:
    """The one layer width of a backbone with a single recurrent layer (``widths`` as ``from_config`` gets it)."""
    if len(widths) != 1 or int(widths[0]) < 1:
        raise ValueError(f"the {name!r} backbone has one recurrent layer: give its width as one number "
                         f"(e.g. channels=64), got {tuple(widths)}")
    return int(widths[0])


def state_map(fn, *states):
    """Apply ``fn`` leaf-wise over one or more states of the same structure (nested tuples of tensors)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return fn(*states)
    return tuple(state_map(fn, *parts) for parts in zip(*states))


def state_bytes(state) -> int:
    """Bytes of ``state`` per cell (dim 0 = cells)."""
    if isinstance(state, torch.Tensor):
        return state[0].numel() * state.element_size() if state.dim() and state.shape[0] else 0
    return sum(state_bytes(s) for s in state)
