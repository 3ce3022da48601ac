"""Dendritic branches with their own memory: a small recurrent unit per branch in front of an LSTM trunk.

Branch routing (:mod:`~lfdeep_neuron.surrogate.routing`) hands the backbones each branch's summed excitatory
and inhibitory input per 1-ms step. A single-layer LSTM trunk then has to compute every branch's local
nonlinearity -- the NMDA spike of a thin dendrite, which depends on that branch's own recent input and
depolarisation -- with units shared by all 193 branches. Beniaguev et al. (2021) found that the NMDA
conductances are what makes this cell need a deep network. This backbone (registered ``"branch_lstm"``) gives
each branch its own state:

* per branch b, a small LSTM of ``config.branch_units`` units reads ``(exc_b, inh_b, e_b)``, where ``e_b`` is
  a learned 2-d branch embedding (so branches can differ in threshold and time scale); its weights are shared
  by all branches, so it is one fused LSTM over ``batch x branches`` sequences;
* the trunk (:class:`~lfdeep_neuron.surrogate.recurrent.GroupedLSTM`) reads the whole backbone input (the
  branch sums and whatever follows them, e.g. the previous spike) plus every branch unit's output.

The first ``2 * config.n_branches`` input channels must be the routed sums (excitatory branches first), as
:class:`~lfdeep_neuron.surrogate.mtl.Surrogate` builds them. State per cell: ``2 * n_branches *
branch_units`` floats for the branches plus the trunk's, constant in time; stepping reproduces the full pass.
"""
from __future__ import annotations

import torch
from torch import nn

from lfdeep_neuron.surrogate.backbone import Backbone, register_backbone, single_width
from lfdeep_neuron.surrogate.recurrent import GroupedLSTM

__all__ = ["BranchLSTM"]

EMBED = 2   # width of the learned per-branch embedding


@register_backbone("branch_lstm")
class BranchLSTM(Backbone):
    """Per-branch LSTMs (shared weights, learned branch embedding) feeding a (grouped) LSTM trunk.

    Parameters
    ----------
    c_in : int
        Backbone input width; channels ``0 .. 2 * n_branches - 1`` are the routed branch sums.
    hidden : int
        Trunk units per group.
    n_groups : int
        Independent trunks (experts) reading the same branch units.
    n_branches : int
    branch_units : int
        LSTM units per branch.
    dropout : float
        On the trunk's output sequence (training only).
    """

    def __init__(self, c_in: int, hidden: int, n_groups: int = 1, n_branches: int = 193, branch_units: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if n_branches < 1 or c_in < 2 * n_branches:
            raise ValueError(f"the 'branch_lstm' backbone reads routed branch sums: it needs n_branches >= 1 and "
                             f"at least 2 * n_branches input channels, got n_branches={n_branches}, c_in={c_in}")
        if branch_units < 1:
            raise ValueError(f"branch_units must be >= 1, got {branch_units}")
        self.n_branches, self.branch_units = int(n_branches), int(branch_units)
        self.embed = nn.Parameter(0.5 * torch.randn(n_branches, EMBED))
        self.branch = nn.LSTM(2 + EMBED, branch_units)
        with torch.no_grad():                               # remember by default (forget-gate bias 1)
            self.branch.bias_ih_l0[branch_units:2 * branch_units] += 1.0
        self.trunk = GroupedLSTM(c_in + n_branches * branch_units, hidden, n_groups, dropout)
        self.c_in, self.c_out, self.n_groups = int(c_in), self.trunk.c_out, int(n_groups)

    @classmethod
    def from_config(cls, c_in: int, widths: tuple, n_groups: int, config) -> "BranchLSTM":
        return cls(c_in, single_width("branch_lstm", widths), n_groups, n_branches=config.n_branches,
                   branch_units=config.branch_units, dropout=config.dropout)

    def _branch_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, c_in, T]`` -> per-branch input sequences ``[T, B * n_branches, 2 + EMBED]``."""
        B, _, T = x.shape
        nb = self.n_branches
        pair = torch.stack([x[:, :nb], x[:, nb:2 * nb]], dim=-1)                 # [B, nb, T, 2]
        emb = self.embed[None, :, None, :].expand(B, nb, T, EMBED)
        return torch.cat([pair, emb], dim=-1).permute(2, 0, 1, 3).reshape(T, B * nb, 2 + EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T = x.shape
        h, _ = self.branch(self._branch_input(x))                                 # [T, B * nb, k]
        units = h.reshape(T, B, -1).permute(1, 2, 0)                             # [B, nb * k, T]
        return self.trunk(torch.cat([x, units], dim=1))

    def initial_state(self, batch: int, device=None, dtype=None) -> tuple:
        width = self.n_branches * self.branch_units
        zeros = torch.zeros(batch, width, device=device, dtype=dtype)
        return zeros, zeros.clone(), self.trunk.initial_state(batch, device, dtype)

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        h0, c0, trunk_state = state
        N, nb, k = x_t.shape[0], self.n_branches, self.branch_units
        _, (h, c) = self.branch(self._branch_input(x_t[:, :, None]),
                                (h0.reshape(1, N * nb, k), c0.reshape(1, N * nb, k)))
        h, c = h.reshape(N, nb * k), c.reshape(N, nb * k)
        out, trunk_state = self.trunk.step(torch.cat([x_t, h], dim=1), trunk_state)
        return out, (h, c, trunk_state)
