"""Recurrent backbones with O(1) state per step: grouped LSTMs and leaky memory units with learned time
constants. Both implement :class:`~lfdeep_neuron.surrogate.backbone.Backbone` and are registered as
``"lstm"`` and ``"elm"``.

A recurrence cannot be evaluated for all time steps at once, so the full pass runs the same cell function
over time (one input projection for the whole sequence first; per step only the recurrent part). It is
vectorised over cells and groups: G experts are one batched matmul (``bmm`` over a leading group dim),
never a Python loop. On the CPU a single LSTM (``n_groups = 1``, the MH trunk) runs its full pass through
PyTorch's fused ``nn.LSTM`` kernel instead, with the same weights (2.4x faster forward + backward on one thread:
``benchmarks/training_step.py``).
Stepping from :meth:`initial_state` reproduces the full pass to float round-off.

``config.dropout`` (training only) drops units of the output sequence, between the recurrence and the heads;
stepping is an evaluation and never drops.

Shapes: input ``[B, c_in, T]``; output ``[B, G * W, T]`` with channel ``g * W + k`` = unit k of group g;
state tensors ``[N, G * W]`` (cells first).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from lfdeep_neuron.surrogate.backbone import Backbone, register_backbone, single_width

__all__ = ["GroupedLSTM", "LeakyMemory"]


class _Recurrent(Backbone):
    """Shared loop: subclasses define ``_project(x) [..., G * A]`` and ``_cell(a [G, N, A], state) -> state``
    where ``state[0]`` is the output ``[G, N, W]``."""

    n_state: int = 1

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)                                  # on the output sequence, training only

    def _groups_first(self, t: torch.Tensor) -> torch.Tensor:       # [N, G * W] -> [G, N, W]
        return t.view(t.shape[0], self.n_groups, -1).transpose(0, 1)

    @staticmethod
    def _cells_first(t: torch.Tensor) -> torch.Tensor:                # [G, N, W] -> [N, G * W]
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    def initial_state(self, batch: int, device=None, dtype=None) -> tuple:
        return tuple(torch.zeros(batch, self.c_out, device=device, dtype=dtype) for _ in range(self.n_state))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T = x.shape
        a = self._project(x.transpose(1, 2))                             # [B, T, G * A]
        a = a.view(B, T, self.n_groups, -1).permute(1, 2, 0, 3)          # [T, G, B, A]
        state = tuple(self._groups_first(s) for s in self.initial_state(B, x.device, x.dtype))
        outs = []
        for a_t in a.unbind(0):   # the recurrence over time (vectorised over cells and groups); unbind, not
            state = self._cell(a_t, state)   # a[t]: one gradient stack instead of T full-size zero-filled ones
            outs.append(state[0])
        h = torch.stack(outs, dim=-1)                                    # [G, B, W, T]
        return self.drop(h.transpose(0, 1).reshape(B, self.c_out, T))

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        a = self._project(x_t).view(x_t.shape[0], self.n_groups, -1).transpose(0, 1)   # [G, N, A]
        new = self._cell(a, tuple(self._groups_first(s) for s in state))
        new = tuple(self._cells_first(s) for s in new)
        return new[0], new


@register_backbone("lstm")
class GroupedLSTM(_Recurrent):
    """G independent single-layer LSTMs of width H on a shared input (``n_groups = 1``: one LSTM).

    Gate pre-activations ``W_in x_t + b + U_g h_{t-1}`` in the order (input, forget, output, cell); the
    forget-gate bias starts at 1. State ``(h, c)``.
    """

    n_state = 2

    def __init__(self, c_in: int, hidden: int, n_groups: int = 1, dropout: float = 0.0):
        super().__init__(dropout)
        G, H = n_groups, hidden
        self.c_in, self.c_out, self.n_groups, self.hidden = c_in, G * H, G, H
        bound = 1.0 / math.sqrt(H)
        self.w_in = nn.Linear(c_in, G * 4 * H)
        nn.init.uniform_(self.w_in.weight, -bound, bound)
        with torch.no_grad():
            b = torch.empty(G, 4, H).uniform_(-bound, bound)
            b[:, 1] += 1.0                                               # remember by default
            self.w_in.bias.copy_(b.reshape(-1))
        self.w_rec = nn.Parameter(torch.empty(G, H, 4 * H).uniform_(-bound, bound))
        # The fused kernel's gate order is (input, forget, cell, output): a row permutation of ours.
        self.register_buffer("_fused_order", torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                                                        torch.arange(2 * H, 3 * H)]), persistent=False)
        self._fused = [nn.LSTM(c_in, H)] if G == 1 else None   # a list: its own parameters stay unregistered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is None or x.device.type != "cpu":   # the fused path is only tested on the CPU
            return super().forward(x)
        order = self._fused_order
        weights = {"weight_ih_l0": self.w_in.weight[order], "weight_hh_l0": self.w_rec[0].t()[order],
                   "bias_ih_l0": self.w_in.bias[order], "bias_hh_l0": torch.zeros_like(self.w_in.bias)}
        h, _ = functional_call(self._fused[0], weights, (x.permute(2, 0, 1),))   # [T, B, H]
        return self.drop(h.permute(1, 2, 0))

    @classmethod
    def from_config(cls, c_in: int, widths: tuple, n_groups: int, config) -> "GroupedLSTM":
        return cls(c_in, single_width("lstm", widths), n_groups, dropout=config.dropout)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_in(x)

    def _cell(self, a: torch.Tensor, state: tuple) -> tuple:
        h, c = state
        z = torch.baddbmm(a, h, self.w_rec)                              # [G, N, 4H]
        H = self.hidden
        gates = torch.sigmoid(z[..., :3 * H])
        c = gates[..., H:2 * H] * c + gates[..., :H] * torch.tanh(z[..., 3 * H:])
        return gates[..., 2 * H:3 * H] * torch.tanh(c), c


@register_backbone("elm")
class LeakyMemory(_Recurrent):
    """Leaky memory units with learned time constants (the idea of Spieler et al. 2024's ELM neuron).

    Each group has M memory units m with time constants tau in [``tau_min_ms``, ``tau_max_ms``] (learned,
    ``tau = tau_min + (tau_max - tau_min) sigmoid(theta)``, initialised log-uniformly over the range). Every
    1-ms step a one-hidden-layer network of the input and the memory proposes ``d = W_o tanh(W_x x_t + W_m
    m_{t-1} + b) + b_o`` and ``m_t = k m_{t-1} + (1 - k) d`` with ``k = exp(-1 ms / tau)``. The output is m.
    Hidden width: ``2 M`` per group.
    """

    n_state = 1

    def __init__(self, c_in: int, units: int, n_groups: int = 1, tau_min_ms: float = 1.0,
                 tau_max_ms: float = 150.0, dropout: float = 0.0):
        super().__init__(dropout)
        G, M = n_groups, units
        Hd = 2 * M
        self.c_in, self.c_out, self.n_groups, self.units = c_in, G * M, G, M
        self.tau_min_ms, self.tau_max_ms = float(tau_min_ms), float(tau_max_ms)
        self.w_in = nn.Linear(c_in, G * Hd)
        b_mem, b_out = 1.0 / math.sqrt(M), 1.0 / math.sqrt(Hd)
        self.w_mem = nn.Parameter(torch.empty(G, M, Hd).uniform_(-b_mem, b_mem))
        self.w_out = nn.Parameter(torch.empty(G, Hd, M).uniform_(-b_out, b_out))
        self.b_out = nn.Parameter(torch.zeros(G, 1, M))
        span = self.tau_max_ms - self.tau_min_ms
        tau0 = torch.logspace(math.log10(self.tau_min_ms + 0.5), math.log10(self.tau_max_ms - 0.5), M)
        frac = ((tau0 - self.tau_min_ms) / span).clamp(1e-4, 1 - 1e-4)
        self.theta = nn.Parameter(torch.log(frac / (1 - frac)).repeat(G, 1)[:, None, :])   # [G, 1, M]

    @classmethod
    def from_config(cls, c_in: int, widths: tuple, n_groups: int, config) -> "LeakyMemory":
        return cls(c_in, single_width("elm", widths), n_groups, dropout=config.dropout)

    def tau_ms(self) -> torch.Tensor:
        """Time constants ``[G, M]`` (ms)."""
        return (self.tau_min_ms + (self.tau_max_ms - self.tau_min_ms) * torch.sigmoid(self.theta))[:, 0]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_in(x)

    def _cell(self, a: torch.Tensor, state: tuple) -> tuple:
        (m,) = state
        keep = torch.exp(-1.0 / (self.tau_min_ms + (self.tau_max_ms - self.tau_min_ms) * torch.sigmoid(self.theta)))
        d = torch.baddbmm(self.b_out, torch.tanh(torch.baddbmm(a, m, self.w_mem)), self.w_out)
        return (torch.lerp(d, m, keep),)                                 # keep * m + (1 - keep) * d
