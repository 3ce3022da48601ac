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
:class:`TCN` is a :class:`~lfdeep_neuron.surrogate.backbone.Backbone` (registered as ``"tcn"``):
``step(u, state)`` maps one input column ``u [n, C_in]`` to one output column ``[n, G * C_last]`` without
touching ``state``. Each convolution keeps *pending partial output sums* instead of a buffer of past inputs:
when input u_t arrives it is multiplied once by all kernel taps (one matmul, ``[n, C_in] @ [C_in, kernel *
C_out]``) and tap j is added to the output that is ``(kernel - 1 - j) * dilation`` steps ahead. The state per
cell is ``(kernel - 1) * dilation * C_out`` numbers per convolution -- independent of the input width (1920
for the Hay cell) and of how long the stream has been running -- and each step costs the same whatever the
history length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lfdeep_neuron.surrogate.backbone import Backbone, register_backbone

__all__ = ["CausalConv1d", "TemporalBlock", "TCN"]


def _param_key(module: nn.Module):
    """Identity and version of a module's parameters: changes whenever a weight is replaced or updated."""
    try:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())
    except RuntimeError:          # inference tensors have no version counter: never cache
        return None


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
        self.c_in, self.c_out = c_in, c_out
        self.pad = (kernel - 1) * dilation
        # output slot (steps ahead - 1) that tap m >= 1 of the current input feeds, after the shift
        self.register_buffer("ahead", torch.arange(1, kernel) * dilation - 1, persistent=False)
        self._taps_key, self._taps = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))

    @property
    def receptive_field(self) -> int:
        return self.pad + 1

    # -- streaming --------------------------------------------------------------------------------
    def taps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights laid out for stepping: ``w [g, c_in / g, kernel * c_out / g]`` (entry ``[g, i, m * c + o]``:
        input channel i of group g to output o of that group when the output lies m * dilation steps after the
        input, i.e. kernel tap ``kernel - 1 - m``) and the bias. Weight norm applied; cached until a
        parameter changes."""
        key = _param_key(self)
        if key is not None and key == self._taps_key:
            return self._taps
        with torch.no_grad():
            weight, bias = self.conv.weight.detach(), self.conv.bias.detach()
            c_out, c_in_g, k = weight.shape
            g = self.groups
            w = weight.view(g, c_out // g, c_in_g, k).flip(-1).permute(0, 2, 3, 1)
            taps = (w.reshape(g, c_in_g, k * (c_out // g)).contiguous(), bias.clone())
        self._taps_key, self._taps = key, taps
        return taps

    def initial_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        """Pending partial sums ``[batch, (kernel - 1) * dilation, c_out]`` (zeros: nothing seen yet);
        entry j is the part already known of the output ``j`` steps after the next one."""
        return torch.zeros(batch, self.pad, self.c_out, device=device, dtype=dtype)

    def step(self, u: torch.Tensor, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume ``u [n, c_in]``; return the output column ``[n, c_out]`` and the new pending sums."""
        w, b = self.taps()
        n, g, k = u.shape[0], self.groups, self.kernel
        if g == 1:
            p = u @ w[0]                                                  # [n, k * c_out]
        else:
            p = torch.bmm(u.view(n, g, -1).transpose(0, 1), w)           # [g, n, k * c_out_g]
            p = p.view(g, n, k, -1).permute(1, 2, 0, 3)
        p = p.reshape(n, k, self.c_out)                                   # [n, m, c_out]
        if k == 1:                                                        # 1x1 convolution: no state
            return p[:, 0] + b, pending
        y = pending[:, 0] + p[:, 0] + b
        new = F.pad(pending[:, 1:], (0, 0, 0, 1))                         # one step later; a fresh tensor
        new.index_add_(1, self.ahead, p[:, 1:])
        return y, new


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
    def initial_state(self, batch: int, device=None, dtype=None) -> tuple:
        return (self.conv1.initial_state(batch, device, dtype), self.conv2.initial_state(batch, device, dtype))

    def step(self, u: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One step of the block in eval mode (no dropout): ``u [n, c_in] -> [n, c_out]``."""
        h, s1 = self.conv1.step(u, state[0])
        h, s2 = self.conv2.step(torch.relu(h), state[1])
        skip = u if self.skip is None else self.skip.step(u, None)[0]
        return self.out_act(torch.relu(h) + skip), (s1, s2)


@register_backbone("tcn")
class TCN(Backbone):
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

    @classmethod
    def from_config(cls, c_in: int, widths: tuple, n_groups: int, config) -> "TCN":
        dil = None if config.dilations is None else config.dilations[:len(widths)]
        return cls(c_in, widths, config.kernel, config.dropout, n_groups=n_groups, dilations=dil,
                   last_activation=config.last_activation)

    @property
    def receptive_field(self) -> int:
        """Steps of input that can influence one output step (including the current one)."""
        return 1 + sum(b.receptive_field - 1 for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def initial_state(self, batch: int, device=None, dtype=None) -> tuple:
        return tuple(b.initial_state(batch, device, dtype) for b in self.blocks)

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        new = []
        for block, s in zip(self.blocks, state):          # a few blocks, in sequence
            x_t, s = block.step(x_t, s)
            new.append(s)
        return x_t, tuple(new)
