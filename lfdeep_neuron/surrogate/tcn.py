"""Causal temporal convolutional network (TCN), full-sequence and one step at a time.

Shapes follow ``torch.nn.Conv1d``: a sequence is ``[B, C, T]`` (batch, channels, time steps). Every
convolution is *causal*: the output at step t sees inputs at steps <= t only (left zero padding of
``(kernel - 1) * dilation`` steps), so running a TCN on a sequence and running it step by step from a
zero state give the same numbers.

Building blocks
---------------
:class:`CausalConv1d`
    weight-normalised dilated causal convolution, optionally grouped;
:class:`TemporalBlock`
    two causal convolutions with ReLU and dropout, plus a residual path (a 1x1 convolution where the
    width changes). The last block of a TCN ends in a sigmoid instead of a ReLU (the variant of
    Verhellen et al. 2024), which keeps the features fed to the task towers in (0, 1);
:class:`TCN`
    a stack of blocks with dilations 1, 2, 4, ... . With ``n_groups = G > 1`` it is G independent
    TCNs of the same shape run as one network ("experts"): the first block reads the shared input,
    every later convolution is grouped, so the G experts never mix. Output ``[B, G * C_last, T]``,
    channel ``g * C_last + c`` is channel c of expert g.

Streaming
---------
``tcn.stream(n, device, dtype)`` returns a :class:`TCNStream` whose ``step(u)`` maps one input column
``u [n, C_in]`` to one output column ``[n, G * C_last]``. Each convolution keeps a ring of *partial
output sums* instead of a buffer of past inputs: when input u_t arrives it is multiplied once by all
kernel taps (one matmul, ``[n, C_in] @ [C_in, kernel * C_out]``) and tap j is added to the output that
is ``(kernel - 1 - j) * dilation`` steps ahead. The state per cell is ``((kernel - 1) * dilation + 1) *
C_out`` numbers per convolution -- independent of the input width (1920 for the Hay cell) and of how long
the stream has been running -- and each step costs the same whatever the history length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["CausalConv1d", "TemporalBlock", "TCN", "ConvStream", "TCNStream"]


class CausalConv1d(nn.Module):
    """Dilated causal 1-D convolution ``[B, c_in, T] -> [B, c_out, T]``.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels (totals over all groups).
    kernel : int
        Kernel size (taps).
    dilation : int
        Spacing of the taps in steps.
    groups : int
        As in ``nn.Conv1d``: ``groups`` independent convolutions over consecutive channel blocks.
    normalize : bool
        Weight normalisation (Salimans & Kingma 2016), one gain per output channel.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, groups: int = 1,
                 normalize: bool = True):
        super().__init__()
        conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation, groups=groups)
        self.conv = weight_norm(conv) if normalize else conv
        self.kernel, self.dilation, self.groups = kernel, dilation, groups
        self.pad = (kernel - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))

    @property
    def receptive_field(self) -> int:
        return self.pad + 1

    def stream(self, n: int, device=None, dtype=None) -> "ConvStream":
        """A one-step-at-a-time version of this convolution for ``n`` independent sequences."""
        with torch.no_grad():
            w = self.conv.weight.detach()  # weight norm applied here, once
            b = self.conv.bias.detach()
        return ConvStream(w, b, self.dilation, self.groups, n, device=device, dtype=dtype)


class ConvStream:
    """Causal convolution stepped one column at a time (see the module docstring).

    Parameters
    ----------
    weight : Tensor [c_out, c_in / groups, kernel]
        Effective convolution weight (weight norm already applied).
    bias : Tensor [c_out]
    dilation, groups : int
    n : int
        Number of independent sequences (cells) stepped together.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dilation: int, groups: int, n: int,
                 device=None, dtype=None):
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        c_out, c_in_g, k = weight.shape
        g = groups
        c_out_g = c_out // g
        self.n, self.k, self.groups = n, k, g
        self.c_in, self.c_out, self.c_in_g, self.c_out_g = c_in_g * g, c_out, c_in_g, c_out_g
        # w[g, i, m * c_out_g + c]: weight of input channel i of group g for output channel c of that group
        # when the output lies m * dilation steps after the input, i.e. kernel tap k - 1 - m.
        w = weight.view(g, c_out_g, c_in_g, k).flip(-1).permute(0, 2, 3, 1)
        self.w = w.reshape(g, c_in_g, k * c_out_g).to(device=device, dtype=dtype).contiguous()
        self.b = bias.to(device=device, dtype=dtype)
        self.length = (k - 1) * dilation + 1  # ring length
        # slots[p, m]: ring slot of the output m * dilation steps after a step whose own slot is p
        offsets = torch.arange(k) * dilation
        self.slots = ((torch.arange(self.length)[:, None] + offsets[None, :]) % self.length).to(device)
        self.acc = torch.zeros(n, self.length, c_out, device=device, dtype=dtype) if k > 1 else None

    def reset(self, cells: torch.Tensor | None = None) -> None:
        """Forget the history (all cells, or the given cell indices)."""
        if self.acc is None:
            return
        if cells is None:
            self.acc.zero_()
        else:
            self.acc[cells] = 0

    def state_bytes_per_cell(self) -> int:
        return 0 if self.acc is None else self.acc[0].numel() * self.acc.element_size()

    def step(self, u: torch.Tensor, t: int) -> torch.Tensor:
        """Consume input column ``u [n, c_in]`` of step ``t``; return output column ``[n, c_out]``."""
        n, g = u.shape[0], self.groups
        if g == 1:
            p = u @ self.w[0]                                             # [n, k * c_out]
        else:
            p = torch.bmm(u.view(n, g, self.c_in_g).transpose(0, 1), self.w)  # [g, n, k * c_out_g]
            p = p.view(g, n, self.k, self.c_out_g).permute(1, 2, 0, 3)
        p = p.reshape(n, self.k, self.c_out)                              # [n, m, c_out]
        if self.acc is None:                                              # 1x1 convolution: no state
            return p[:, 0] + self.b
        slot = t % self.length
        self.acc.index_add_(1, self.slots[slot], p)
        y = self.acc[:, slot] + self.b
        self.acc[:, slot] = 0
        return y


class TemporalBlock(nn.Module):
    """Residual block: two causal convolutions (ReLU, dropout) plus a skip path.

    ``out = act(drop(relu(conv2(drop(relu(conv1(x)))))) + skip(x))`` with ``act`` = ReLU, or sigmoid for
    the last block of a TCN; ``skip`` is the identity or a 1x1 convolution when widths/grouping differ.

    Parameters
    ----------
    c_in, c_out : int
        Total input / output channels.
    kernel, dilation : int
    dropout : float
    groups_in : int
        Grouping of the convolutions that read the block input (1 when the input is shared by all experts).
    groups : int
        Grouping of the convolutions inside the block (number of experts).
    last : bool
        Use ``last_activation`` for the output instead of ReLU.
    last_activation : {"sigmoid", "relu"}
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int, dropout: float,
                 groups_in: int = 1, groups: int = 1, last: bool = False, last_activation: str = "sigmoid"):
        super().__init__()
        self.conv1 = CausalConv1d(c_in, c_out, kernel, dilation, groups=groups_in)
        self.conv2 = CausalConv1d(c_out, c_out, kernel, dilation, groups=groups)
        needs_skip_conv = c_in != c_out or groups_in != groups
        self.skip = CausalConv1d(c_in, c_out, 1, 1, groups=groups_in, normalize=False) if needs_skip_conv else None
        self.drop = nn.Dropout(dropout)
        if last_activation not in ("sigmoid", "relu"):
            raise ValueError(f"last_activation must be 'sigmoid' or 'relu', got {last_activation!r}")
        self.out_act = torch.sigmoid if (last and last_activation == "sigmoid") else torch.relu

    @property
    def receptive_field(self) -> int:
        return self.conv1.pad + self.conv2.pad + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.conv1(x)))
        h = self.drop(torch.relu(self.conv2(h)))
        return self.out_act(h + (x if self.skip is None else self.skip(x)))

    # -- streaming --------------------------------------------------------------------------------
    def stream(self, n: int, device=None, dtype=None) -> list:
        convs = [self.conv1, self.conv2] + ([self.skip] if self.skip is not None else [])
        return [c.stream(n, device, dtype) for c in convs]

    def step(self, u: torch.Tensor, state: list, t: int) -> torch.Tensor:
        """One step of the block in eval mode (no dropout): ``u [n, c_in] -> [n, c_out]``."""
        h = torch.relu(state[0].step(u, t))
        h = torch.relu(state[1].step(h, t))
        return self.out_act(h + (u if len(state) == 2 else state[2].step(u, t)))


class TCN(nn.Module):
    """Stack of :class:`TemporalBlock` with dilations ``2**i``; optionally ``n_groups`` experts at once.

    Parameters
    ----------
    c_in : int
        Input channels (shared by all groups).
    channels : sequence of int
        Channels of each block, per group; ``len(channels)`` blocks.
    kernel : int
    dropout : float
    n_groups : int
        Number of independent TCNs ("experts") computed together; output ``[B, n_groups * channels[-1], T]``.
    dilations : sequence of int, optional
        Per-block dilation; default ``1, 2, 4, ...``.
    last_activation : {"sigmoid", "relu"}
        Output activation of the last block.
    """

    def __init__(self, c_in: int, channels, kernel: int, dropout: float = 0.0, n_groups: int = 1,
                 dilations=None, last_activation: str = "sigmoid"):
        super().__init__()
        channels = list(channels)
        dilations = list(dilations) if dilations is not None else [2 ** i for i in range(len(channels))]
        if len(dilations) != len(channels):
            raise ValueError(f"{len(dilations)} dilations for {len(channels)} blocks")
        blocks, width = [], c_in
        for i, (c, d) in enumerate(zip(channels, dilations)):
            blocks.append(TemporalBlock(width, n_groups * c, kernel, d, dropout,
                                        groups_in=1 if i == 0 else n_groups, groups=n_groups,
                                        last=i == len(channels) - 1, last_activation=last_activation))
            width = n_groups * c
        self.blocks = nn.ModuleList(blocks)
        self.c_in, self.c_out, self.n_groups = c_in, width, n_groups

    @property
    def receptive_field(self) -> int:
        """Steps of input that can influence one output step (including the current one)."""
        return 1 + sum(b.receptive_field - 1 for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def stream(self, n: int, device=None, dtype=None) -> "TCNStream":
        return TCNStream(self, n, device, dtype)


class TCNStream:
    """A :class:`TCN` advanced one step at a time for ``n`` sequences (eval mode, no dropout)."""

    def __init__(self, tcn: TCN, n: int, device=None, dtype=None):
        self.blocks = list(tcn.blocks)
        self.states = [b.stream(n, device, dtype) for b in self.blocks]

    def step(self, u: torch.Tensor, t: int) -> torch.Tensor:
        for block, state in zip(self.blocks, self.states):
            u = block.step(u, state, t)
        return u

    def reset(self, cells=None) -> None:
        for state in self.states:
            for conv in state:
                conv.reset(cells)

    def state_bytes_per_cell(self) -> int:
        return sum(conv.state_bytes_per_cell() for state in self.states for conv in state)
