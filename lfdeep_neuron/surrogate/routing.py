"""Branch routing: the synaptic channels summed per dendritic branch before any backbone sees them.

The Hay cell's 1278 channels sit on 639 dendritic segments, which belong to 193 sections (84 basal
``dend``, 109 apical ``apic``). Synapses on one section interact strongly (shared local depolarisation, NMDA
spikes) and weakly across sections, so a small model learns faster when it sees per-branch input rather than
per-synapse input (the insight of the Branch-ELM neuron, Spieler et al. 2024). :class:`BranchRouting` maps
transformed channel values ``u [B, C, ...]`` to ``2 * n_branches`` features::

    f[b]             = log1p( sum over excitatory channels c of branch b of  w_c * u_c )
    f[n_branches + b] = log1p( sum over inhibitory channels c of branch b of  w_c * u_c )

with learnable positive per-synapse weights ``w_c = exp(log_w_c)`` (start: 1). The sums are one
``index_add`` over channels (no loop over branches) and cost O(C) per cell and step. The channel-to-branch
map is a persistent buffer (saved with the weights); :func:`section_branches` computes it from a segment and
a channel table, and :meth:`BranchRouting.set_branches` installs it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["BranchRouting", "section_branches"]


def _str(a) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)])


def section_branches(segments: dict, synapses: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Branch of every channel = the section of its segment.

    Parameters
    ----------
    segments : dict
        Segment table (``sec_type``, ``sec_index`` per segment).
    synapses : dict
        Channel table (``seg_idx``, ``type`` (0 excitatory, 1 inhibitory) per channel).

    Returns
    -------
    branch : int64 [C]
        Branch index of every channel, numbered by first appearance in channel order.
    kind : int64 [C]
        0 excitatory, 1 inhibitory.
    n_branches : int
    """
    sec = np.char.add(np.char.add(_str(segments["sec_type"]), ":"), np.asarray(segments["sec_index"]).astype(str))
    seg = np.asarray(synapses["seg_idx"]).astype(np.int64)
    kind = np.asarray(synapses["type"]).astype(np.int64)
    if seg.min(initial=0) < 0 or seg.max(initial=0) >= sec.size:
        raise ValueError(f"channel table names segments outside 0..{sec.size - 1}")
    if not np.isin(kind, (0, 1)).all():
        raise ValueError("channel table 'type' must be 0 (excitatory) or 1 (inhibitory)")
    _, first, inverse = np.unique(sec[seg], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))          # rank of each unique section by first appearance
    return order[inverse].astype(np.int64), kind, int(first.size)


class BranchRouting(nn.Module):
    """Per-branch excitatory and inhibitory sums of positively weighted channels (see the module docstring).

    Parameters
    ----------
    n_channels : int
    n_branches : int
        Built with a placeholder map (the channel layout of ARCHITECTURE.md: channel ``c < C/2`` excitatory,
        its partner ``C/2 + c`` inhibitory, segment ``c`` of the half in branch ``c % n_branches``); install
        the real one with :meth:`set_branches` before training (checkpoints store it).
    """

    def __init__(self, n_channels: int, n_branches: int):
        super().__init__()
        if n_branches < 1:
            raise ValueError(f"n_branches must be >= 1, got {n_branches}")
        self.n_channels, self.n_branches = int(n_channels), int(n_branches)
        half = max(1, n_channels // 2)
        c = torch.arange(n_channels)
        self.register_buffer("target", (c % half) % n_branches + n_branches * (c >= half).long())
        self.log_w = nn.Parameter(torch.zeros(n_channels))

    @property
    def c_out(self) -> int:
        return 2 * self.n_branches

    def set_branches(self, branch, kind) -> None:
        """Install the channel -> branch map (``branch [C]`` in 0..n_branches-1, ``kind [C]`` 0 exc / 1 inh)."""
        branch = torch.as_tensor(np.asarray(branch), dtype=torch.long).reshape(-1)
        kind = torch.as_tensor(np.asarray(kind), dtype=torch.long).reshape(-1)
        if branch.numel() != self.n_channels or kind.numel() != self.n_channels:
            raise ValueError(f"branch map has {branch.numel()} / {kind.numel()} entries for {self.n_channels} "
                             "channels")
        if int(branch.min()) < 0 or int(branch.max()) >= self.n_branches:
            raise ValueError(f"branch indices must lie in 0..{self.n_branches - 1}")
        self.target.copy_(branch + self.n_branches * kind)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u [B, C, ...]`` (non-negative transformed channel values) -> ``[B, 2 * n_branches, ...]``."""
        w = torch.exp(self.log_w).view(-1, *([1] * (u.dim() - 2)))
        out = u.new_zeros(u.shape[0], self.c_out, *u.shape[2:])
        return torch.log1p(out.index_add(1, self.target, u * w).clamp_min(0))
