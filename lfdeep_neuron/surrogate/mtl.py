"""Multitask surrogates of a neuron: MH, MMoE and MMoEEx (Verhellen et al. 2024), all tasks batched.

One model predicts, every 1 ms step, the membrane potential of every segment of the cell and the somatic
spike logit (and optionally the bin-mean membrane current of every segment, for the LFP). Each of those
quantities is a *task* with its own tower; task order is ``[v_0 .. v_{S-1}, spike, (imem_0 .. imem_{S-1})]``.

Architectures
-------------
``MH`` (hard parameter sharing)
    one trunk shared by all tasks -> per-task tower.
``MMoE`` (multi-gate mixture of experts)
    E experts (one grouped backbone); a small *compressor* backbone reads the same input and feeds one
    softmax gate per task (so gate parameters do not grow with the input width); each task's tower reads
    its gate-weighted mixture of the experts.
``MMoEEx`` (MMoE with exclusivity)
    as MMoE, but a fixed random mask removes a subset of experts from each task's gate (probability
    ``exclusivity`` per task-expert pair, at least one expert kept per task); masked gate entries are exactly 0.

Trunk, experts and compressor are :class:`~lfdeep_neuron.surrogate.backbone.Backbone` s named by
``config.backbone``: ``"tcn"`` (causal TCN, the paper's), ``"lstm"``, ``"elm"`` (recurrent, O(1) state),
``"branch_lstm"`` (a small LSTM per dendritic branch in front of an LSTM trunk; needs ``n_branches``) or any
registered one. Options for spiking (issue 11): ``n_branches`` routes the channels through the dendritic
sections before the backbones (:mod:`~lfdeep_neuron.surrogate.routing`); ``direct_heads`` adds a linear path
from the whole trunk (all experts) to the soma voltage and the spike logit; ``soma_clip_mV`` records that the
soma task learns a clipped target.

Local synaptic features (``config.local_taus``, ours, not in the paper): a tower reads the experts'
mixture (or MH's trunk), which is 8 channels wide, so it cannot see *its own* segment's inputs, which
dominate a dendritic segment's voltage (a local EPSP) and membrane current. With ``local_taus``, the
first tower layer (linear towers: the output) also reads 2K features of its segment: exponential traces
(time constants ``local_taus`` ms, fixed) of the segment's excitatory and inhibitory channel (the channel
layout of ARCHITECTURE.md). They cost O(S K) state per cell when streaming.

Towers are ``Linear(C, H) -> ELU -> Linear(H, 1)`` per task, stored as stacked weights ``[n_tasks, C, H]``
and applied with batched matrix products over tasks (addmm / baddbmm / bmm), or linear (width 0); the gates of
all tasks are one matmul and the expert mixture one bmm. There is no Python loop over tasks or experts.

Units and conventions (input and output)
----------------------------------------
``x [B, n_inputs, T]``, column t = step t (1 ms, inputs in (t-1, t] ms):

* rows ``0 .. n_channels-1``: synaptic channels, raw (sum of NetCon weights per step, weight 1 = one
  reference synapse activation); the model applies ``sign(x) * log1p(|x|)`` itself;
* rows ``n_channels ..`` (when ``config.feedback``): the voltage of every segment at the *previous* step
  t-1, z-scored with the model's own normalisation (``model.to_z(v_mV)``).
* last row (when ``config.spike_history``): 1 if the soma spiked in the previous step t-1, else 0 (in
  training the true spike label; when streaming, the spike the streamer emitted: see :mod:`.stream`).

``model(x)`` returns a :class:`Prediction`, a 2-tuple ``(v_z [B, S, T], spike_logit [B, T])``: ``v_z`` is the
z-scored voltage at step t (``model.to_mV(v_z)`` gives mV: point samples, like ``v_1ms``); ``spike_logit`` is
the logit of "the soma spikes in (t-1, t]". With ``config.imem_tasks`` the tuple also carries ``.imem``
(z-scored bin-mean membrane currents, ``model.imem_to_nA``). The normalisation lives in buffers
(``v_mean``, ``v_std``, ``v_rest`` in mV, ``imem_mean``, ``imem_std`` in nA) set by
:meth:`Surrogate.set_normalization`, and is saved by :mod:`~lfdeep_neuron.surrogate.checkpoint` (not in
``state_dict``).

Example
-------
>>> model = MMoE.from_config("tiny", n_segments=5, n_channels=8)
>>> v_z, spike_logit = model(torch.zeros(2, model.n_inputs, 50))
>>> st = model.streamer(n_cells=3)                     # one-step inference, see stream.py
>>> v_t, s_t = st.step(torch.zeros(3, model.n_channels))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lfdeep_neuron.surrogate.backbone import Backbone, build_backbone
from lfdeep_neuron.surrogate.routing import BranchRouting

__all__ = ["SurrogateConfig", "CONFIGS", "Prediction", "Surrogate", "MH", "MMoE", "MMoEEx", "ARCHS",
           "build_model", "default_local_channels"]


# ---------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SurrogateConfig:
    """Everything that defines the network's shape (saved in checkpoints)."""
    n_channels: int = 1278           # synaptic input channels (Hay: 639 excitatory + 639 inhibitory)
    n_segments: int = 642            # S: voltage tasks (every segment, canonical order)
    feedback: bool = True            # inputs include the z-scored voltages of all segments at t-1
    residual: bool = False           # voltage towers predict the change from t-1 (needs feedback). Measured on
                                     # the synthetic cell: better teacher-forced, but closed loop diverged
                                     # (with and without --rollout 2): for experiments only
    imem_tasks: bool = False         # extra tasks: bin-mean membrane current of every segment
    local_taus: tuple = ()           # ms; each tower also reads its own segment's synaptic channels through
                                     # fixed exponential filters of these time constants (() = off, as the paper)
    channels: tuple = (32, 16, 8)    # TCN channels per block (per expert)
    kernel: int = 10                 # taps per causal convolution
    dilations: tuple | None = None   # per block; default 1, 2, 4, ...
    dropout: float = 0.2
    last_activation: str = "sigmoid"  # activation of the last TCN block ("relu" = plain TCN)
    n_experts: int = 5               # MMoE / MMoEEx
    compressor: tuple = (16, 8)      # compressor TCN channels (MMoE / MMoEEx gates)
    tower_soft: int = 10             # tower width for MMoE / MMoEEx (0: linear towers)
    tower_hard: int = 25             # tower width for MH (0: linear towers)
    exclusivity: float = 0.3         # MMoEEx: probability that a task-expert gate entry is masked
    mask_seed: int = 0               # MMoEEx: seed of the fixed random mask
    backbone: str = "tcn"            # registered Backbone of trunk / experts / compressor ("tcn", "lstm", "elm",
                                     # "branch_lstm")
    n_branches: int = 0              # > 0: backbones read per-branch exc/inh sums of the channels (routing.py)
                                     # instead of the channels themselves; the Hay cell has 193 branches
    direct_heads: bool = False       # soma-voltage and spike tasks also read the whole trunk / all experts
                                     # through a linear layer (not only their tower on the 8-wide mixture)
    soma_clip_mV: float | None = None  # the soma-voltage task was trained on targets clipped at this value
                                     # (spikes live in the spike output); informs training and evaluation
    soma_channels: tuple = ()        # non-empty (needs direct_heads): the direct heads read their own backbone
                                     # of these widths (same kind) instead of the trunk / experts, so the
                                     # soma and spike outputs do not compete with 642 voltages for its units
    spike_history: bool = False      # one more input row: the somatic spike of the previous step (1/0) -- the
                                     # true one in training, the emitted one (threshold crossing) when streaming
    branch_units: int = 4            # backbone "branch_lstm" (branch.py): recurrent units per dendritic branch

    def __post_init__(self):
        def ints(v):   # a single int (e.g. from "--set compressor=8") or a sequence
            return (int(v),) if isinstance(v, (int, float)) else tuple(int(c) for c in v)

        self.channels, self.compressor = ints(self.channels), ints(self.compressor)
        self.soma_channels = ints(self.soma_channels) if self.soma_channels else ()
        taus = self.local_taus if isinstance(self.local_taus, (list, tuple)) else (self.local_taus,)
        self.local_taus = tuple(float(t) for t in taus)
        if any(not t > 0 for t in self.local_taus):
            raise ValueError(f"local_taus must be positive time constants (ms), got {self.local_taus}")
        if self.dilations is not None:
            self.dilations = ints(self.dilations)
        if len(self.dilations or self.channels) != len(self.channels):
            raise ValueError(f"{len(self.dilations)} dilations for {len(self.channels)} TCN blocks")
        if self.n_segments < 1 or self.n_channels < 1:
            raise ValueError(f"n_segments and n_channels must be >= 1, got {self.n_segments}, {self.n_channels}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")
        if self.residual and not self.feedback:
            raise ValueError("residual=True needs feedback=True (the change is taken from the fed-back voltage)")
        if not 0.0 <= self.exclusivity < 1.0:
            raise ValueError(f"exclusivity must be in [0, 1), got {self.exclusivity}")
        self.n_branches = int(self.n_branches)
        if self.n_branches < 0:
            raise ValueError(f"n_branches must be >= 0, got {self.n_branches}")
        self.direct_heads = bool(self.direct_heads)
        if self.soma_channels and not self.direct_heads:
            raise ValueError("soma_channels needs direct_heads=True (the soma backbone feeds the direct heads)")
        if self.soma_channels and min(self.soma_channels) < 1:
            raise ValueError(f"soma_channels must be positive widths, got {self.soma_channels}")
        if self.soma_clip_mV is not None:
            self.soma_clip_mV = float(self.soma_clip_mV)
        self.spike_history = bool(self.spike_history)
        self.branch_units = int(self.branch_units)
        if self.branch_units < 1:
            raise ValueError(f"branch_units must be >= 1, got {self.branch_units}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


#: Named configurations: overrides of :class:`SurrogateConfig`. Sizes default to the Hay cell.
#: Parameters with Hay sizes (1920 inputs, 643 tasks) -- MH / MMoE (= MMoEEx), receptive field:
#: paper 858k / 3.92M, 127 ms;  fast 480k / 1.44M, 127 ms;  wide 1.55M / 7.56M, 211 ms.
CONFIGS: dict[str, dict] = {
    # Verhellen et al. 2024: TCN [32, 16, 8], kernel 10, dropout 0.2, 5 experts, towers 10 / 25 ELU units;
    # dilations 1, 2, 4 give a receptive field of 127 ms (>= the paper's 100 ms history).
    "paper": dict(),
    # For tests and development on synthetic data (any n_segments / n_channels).
    "tiny": dict(channels=(8, 4), kernel=3, dropout=0.0, n_experts=3, compressor=(4,),
                 tower_soft=4, tower_hard=6, n_segments=6, n_channels=10),
    # Same receptive field as "paper" (127 ms) with fewer taps: kernel 4, dilations 1, 2, 6, 12 (4 blocks);
    # the 1920-wide input is multiplied by 4 taps instead of 10 (cheaper first layer, smaller state).
    "fast": dict(channels=(32, 16, 16, 8), kernel=4, dilations=(1, 2, 6, 12), n_experts=4, compressor=(8,)),
    # "fast" + local synaptic features (traces of 2, 8, 32 ms of each segment's own channels). Measured on
    # 138 s of training data, MMoE with current tasks, no feedback, same budget: test RMSE 4.51 vs 4.78 mV,
    # current-task loss 0.42 vs 1.05 (z units), LFP correlation 0.33 vs 0.09 (models/MODEL_CARD.md).
    "fast_local": dict(channels=(32, 16, 16, 8), kernel=4, dilations=(1, 2, 6, 12), n_experts=4, compressor=(8,),
                       local_taus=(2.0, 8.0, 32.0)),
    # Wider and deeper experts, for when data are plentiful.
    "wide": dict(channels=(64, 32, 16, 16), kernel=8, dilations=(1, 2, 4, 8), n_experts=6, compressor=(16, 8),
                 tower_soft=16, tower_hard=32),
    # Spike-capable designs (issue 11): channels routed through the 193 Hay sections, a recurrent trunk /
    # experts with O(1) state, a direct linear path from the whole trunk to the soma and spike outputs, the
    # soma target clipped at -55 mV, no voltage feedback, local synaptic traces for the segment towers.
    "spike_lstm": dict(backbone="lstm", channels=(32,), compressor=(8,), n_experts=4, n_branches=193,
                       direct_heads=True, soma_clip_mV=-55.0, feedback=False, dropout=0.0,
                       local_taus=(2.0, 8.0, 32.0), tower_soft=0, tower_hard=0),
    "spike_elm": dict(backbone="elm", channels=(32,), compressor=(8,), n_experts=4, n_branches=193,
                      direct_heads=True, soma_clip_mV=-55.0, feedback=False, dropout=0.0,
                      local_taus=(2.0, 8.0, 32.0), tower_soft=0, tower_hard=0),
}


def default_local_channels(n_segments: int, n_channels: int) -> torch.Tensor:
    """``[S, 2]`` channel of the excitatory and the inhibitory synapse of each segment (``n_channels``: none).

    The channel layout of docs/ARCHITECTURE.md, "Segments and channels": with ``n = n_channels // 2``
    synaptic segments, channel ``c < n`` is the excitatory and ``n + c`` the inhibitory synapse of segment
    ``c + 1`` (segment 0, the soma, and the segments after the dendrites, the axon, have none).
    """
    n = n_channels // 2
    if n_channels % 2 or n > n_segments - 1:
        raise ValueError(f"local_taus needs the channel layout of docs/ARCHITECTURE.md, 'Segments and channels' "
                         f"(an even number of channels, at most 2 per non-somatic segment); got {n_channels} "
                         f"channels for {n_segments} segments")
    out = torch.full((n_segments, 2), n_channels, dtype=torch.long)
    out[1:n + 1, 0] = torch.arange(n)
    out[1:n + 1, 1] = torch.arange(n, 2 * n)
    return out


def make_config(name: str = "paper", **overrides) -> SurrogateConfig:
    """The named configuration with ``overrides`` applied (unknown keys are an error)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    known = {f.name for f in dataclasses.fields(SurrogateConfig)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown config keys {sorted(bad)}; known: {sorted(known)}")
    return SurrogateConfig(**{**CONFIGS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
class Prediction(tuple):
    """``(v, spike_logit)``; ``.imem`` holds the membrane-current tasks (None unless the model has them),
    ``.spiked`` the spike decisions of a streamed run (None for a model's own pass: the model only scores).

    A plain 2-tuple for unpacking (``v, s = model(x)``), with named access ``.v``, ``.spike_logit``, ``.imem``.
    """

    def __new__(cls, v, spike_logit, imem=None, spiked=None):
        self = super().__new__(cls, (v, spike_logit))
        self.imem = imem
        self.spiked = spiked
        return self

    @property
    def v(self):
        return self[0]

    @property
    def spike_logit(self):
        return self[1]


# ---------------------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------------------
class Towers(nn.Module):
    """One ``Linear(C, H) -> ELU -> Linear(H, 1)`` tower per task, all applied at once.

    ``forward(h)`` takes rows of features, either shared by all tasks ``[R, C]`` (MH) or per task
    ``[R, n_tasks, C]`` (MMoE), and returns ``[R, n_tasks]``. R = batch x time rows. ``mixture`` applies
    them to a gated mixture of experts.

    ``width = 0`` makes every tower linear (``y_n = w_n . h + b_n``; local features, if any, added linearly
    to the output): the nonlinearity then lives in the backbones. Per step and cell this costs
    ``n_tasks * C`` (MH) or ``n_tasks * E * C`` (MMoE, the mixture folded into the readout) multiply-adds
    instead of ``n_tasks * H * (C + F)`` plus ``n_tasks * H`` activations -- the difference between ~10 and
    ~100 MB of intermediate tensors per step for 1000 Hay cells.
    """

    def __init__(self, n_tasks: int, c_in: int, width: int, n_local: int = 0):
        super().__init__()
        self.linear = width == 0
        if self.linear:
            bound = 1 / math.sqrt(c_in)
            self.w1 = nn.Parameter(torch.empty(n_tasks, c_in).uniform_(-bound, bound))
            self.b2 = nn.Parameter(torch.zeros(n_tasks))
            if n_local:
                self.w_loc = nn.Parameter(torch.empty(n_tasks, n_local).uniform_(-bound, bound))
            return
        bound1, bound2 = 1 / math.sqrt(c_in), 1 / math.sqrt(width)  # nn.Linear's default init range
        self.w1 = nn.Parameter(torch.empty(n_tasks, c_in, width).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(n_tasks, width).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(n_tasks, width).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(n_tasks))
        if n_local:        # weights of each task's own local features (see Surrogate.local_rows)
            bound = 1 / math.sqrt(c_in + n_local)
            self.w_loc = nn.Parameter(torch.empty(n_tasks, n_local, width).uniform_(-bound, bound))

    def _linear_local(self, y: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        return y if local is None else y + (local * self.w_loc).sum(-1)

    def forward(self, h: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """``local [R, n_tasks, F]``: per-task extra features (models with ``local_taus``)."""
        if self.linear:
            y = torch.addmm(self.b2, h, self.w1.t()) if h.dim() == 2 else (h * self.w1).sum(-1) + self.b2
            return self._linear_local(y, local)
        n, c, width = self.w1.shape
        if h.dim() == 2:   # shared features [R, C]: one GEMM for all towers
            z = torch.addmm(self.b1.reshape(-1), h, self.w1.permute(1, 0, 2).reshape(c, n * width))
            z = z.view(h.shape[0], n, width).transpose(0, 1)                 # [n, R, H]
        else:              # per-task features [R, n, C]: one batched GEMM over tasks
            z = torch.baddbmm(self.b1[:, None], h.transpose(0, 1), self.w1)   # [n, R, H]
        if local is not None:
            z = torch.baddbmm(z, local.transpose(0, 1), self.w_loc)           # + each task's own features
        return (torch.bmm(F.elu(z), self.w2[:, :, None])[..., 0] + self.b2[:, None]).t()  # [R, n]

    def mixture(self, gates: torch.Tensor, experts: torch.Tensor, local: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Towers on each task's gated mixture: ``gates [R, E, n_tasks]``, ``experts [R, E, C]`` -> ``[R, n_tasks]``."""
        if self.linear:    # sum_e g_en (f_e . w_n): the readout of every expert first, one GEMM
            R, E, C = experts.shape
            per_expert = (experts.reshape(R * E, C) @ self.w1.t()).view(R, E, -1)   # [R, E, n]
            return self._linear_local((gates * per_expert).sum(1) + self.b2, local)
        return self(torch.bmm(gates.transpose(1, 2), experts), local)         # mixture [R, n_tasks, C]


def _rows(h: torch.Tensor) -> torch.Tensor:
    """``[B, C, T] -> [B*T, C]`` (row b*T + t)."""
    return h.transpose(1, 2).reshape(-1, h.shape[1])


class Surrogate(nn.Module):
    """Common part of MH / MMoE / MMoEEx: sizes, normalisation, input encoding, output split, streaming.

    Subclasses build their :class:`~lfdeep_neuron.surrogate.backbone.Backbone` s with :func:`build_backbone`,
    list them in :meth:`backbones` (the first one is the *trunk* that the direct heads read) and define
    ``_heads(*feature_rows, local=None)`` mapping the backbones' output rows to task outputs ``[R, n_tasks]``.
    Everything else (input encoding, local features, direct heads, residual, full pass and the pure
    :meth:`step`) is shared.
    """

    arch: str = ""

    def __init__(self, config: SurrogateConfig):
        super().__init__()
        self.config = config
        S = config.n_segments
        self.n_segments = S
        self.n_channels = config.n_channels
        self.n_inputs = config.n_channels + (S if config.feedback else 0) + int(config.spike_history)
        self.n_tasks = S + 1 + (S if config.imem_tasks else 0)
        # Normalisation (mV, nA): not in state_dict; checkpoints store it explicitly.
        self.register_buffer("v_mean", torch.zeros(S), persistent=False)
        self.register_buffer("v_std", torch.ones(S), persistent=False)
        self.register_buffer("v_rest", torch.zeros(S), persistent=False)
        self.register_buffer("imem_mean", torch.zeros(S), persistent=False)
        self.register_buffer("imem_std", torch.ones(S), persistent=False)
        self.meta: dict = {}
        # Local synaptic features (config.local_taus): per step k, for every channel c and time constant
        # tau_j, the trace y_cj(k) = exp(-1/tau_j) y_cj(k-1) + u_c(k) of the transformed input u; the
        # tower of a segment's tasks reads the traces of that segment's excitatory and inhibitory channel.
        taus = config.local_taus
        self.n_local = 2 * len(taus)
        if taus:
            self.register_buffer("local_decay", torch.exp(-1.0 / torch.tensor(taus)), persistent=False)
            self.register_buffer("local_channels", default_local_channels(S, config.n_channels))
            task_seg = torch.cat([torch.arange(S), torch.zeros(1, dtype=torch.long)]
                                 + ([torch.arange(S)] if config.imem_tasks else []))
            self.register_buffer("task_segment", task_seg, persistent=False)   # spike task: the soma
        # Branch routing (config.n_branches): the backbones read per-branch sums instead of the channels.
        self.routing = BranchRouting(config.n_channels, config.n_branches) if config.n_branches else None
        n_syn_features = self.routing.c_out if self.routing is not None else config.n_channels
        #: width of the backbones' input: synaptic features (+ fed-back voltages) (+ the previous spike)
        self.n_features = n_syn_features + (S if config.feedback else 0) + int(config.spike_history)

    def _init_direct(self, width: int) -> None:
        """Direct heads (config.direct_heads): a linear map from the trunk's ``width`` features (or, with
        ``config.soma_channels``, from the soma backbone's) to the soma voltage and the spike logit, added to
        their towers; starts at zero (the towers alone)."""
        c = self.config
        self.soma_net = None
        if c.soma_channels:
            self.soma_net = build_backbone(c.backbone, self.n_features, c.soma_channels, 1, c)
            width = self.soma_net.c_out
        if c.direct_heads:
            self.direct = nn.Linear(width, 2)
            nn.init.zeros_(self.direct.weight)
            nn.init.zeros_(self.direct.bias)
            self.register_buffer("direct_tasks", torch.tensor([0, self.n_segments]), persistent=False)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str = "paper", **overrides) -> "Surrogate":
        """Build ``cls`` with the named configuration (see :data:`CONFIGS`) and keyword overrides."""
        return cls(make_config(name, **overrides))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def backbones(self) -> tuple[Backbone, ...]:
        """The backbones whose rows feed the towers, in order (the first is the trunk)."""
        raise NotImplementedError

    def all_backbones(self) -> tuple[Backbone, ...]:
        """Every backbone that reads the encoded input: :meth:`backbones`, then the soma backbone if any."""
        return self.backbones() + ((self.soma_net,) if self.soma_net is not None else ())

    @property
    def receptive_field(self) -> int:
        """Input steps (ms) that influence one output step; -1 when unbounded (recurrent backbones)."""
        rf = max(b.receptive_field for b in self.all_backbones())
        return -1 if math.isinf(rf) else int(rf)

    # -- normalisation --------------------------------------------------------------------------------
    def set_normalization(self, v_mean, v_std, v_rest=None, imem_mean=None, imem_std=None,
                          min_std: float = 1e-3) -> None:
        """Set the per-segment normalisation (mV; imem in nA). ``v_rest`` (mV) is the default initial
        feedback of a closed-loop run (default ``v_mean``). Standard deviations are floored at ``min_std``."""
        def put(name, value, floor=None):
            t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if t.numel() != self.n_segments:
                raise ValueError(f"{name} has {t.numel()} entries; the model has {self.n_segments} segments")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains non-finite values")
            if floor is not None:
                t = t.clamp_min(floor)
            getattr(self, name).copy_(t)

        put("v_mean", v_mean)
        put("v_std", v_std, min_std)
        put("v_rest", v_mean if v_rest is None else v_rest)
        if imem_mean is not None:
            put("imem_mean", imem_mean)
        if imem_std is not None:
            put("imem_std", imem_std, min_std)

    def normalization(self) -> dict:
        """The normalisation buffers as a dict of CPU tensors (what checkpoints store)."""
        keys = ["v_mean", "v_std", "v_rest"] + (["imem_mean", "imem_std"] if self.config.imem_tasks else [])
        return {k: getattr(self, k).detach().cpu().clone() for k in keys}

    @staticmethod
    def _seg_view(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # [B, S, T] -> S on dim 1; [N, S] or [S] -> S last.
        return buf[:, None] if like.dim() == 3 else buf

    def to_mV(self, v_z: torch.Tensor) -> torch.Tensor:
        """z-scored voltages -> mV. Shapes ``[B, S, T]``, ``[N, S]`` or ``[S]``."""
        return v_z * self._seg_view(self.v_std, v_z) + self._seg_view(self.v_mean, v_z)

    def to_z(self, v_mV: torch.Tensor) -> torch.Tensor:
        """mV -> z-scored voltages. Shapes ``[B, S, T]``, ``[N, S]`` or ``[S]``."""
        return (v_mV - self._seg_view(self.v_mean, v_mV)) / self._seg_view(self.v_std, v_mV)

    def imem_to_nA(self, imem_z: torch.Tensor) -> torch.Tensor:
        return imem_z * self._seg_view(self.imem_std, imem_z) + self._seg_view(self.imem_mean, imem_z)

    def imem_to_z(self, imem_nA: torch.Tensor) -> torch.Tensor:
        return (imem_nA - self._seg_view(self.imem_mean, imem_nA)) / self._seg_view(self.imem_std, imem_nA)

    # -- forward ----------------------------------------------------------------------------------------
    def make_inputs(self, x_syn: torch.Tensor, v_prev_mV: torch.Tensor | None = None,
                    spike_prev: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced model input ``[B, n_inputs, T]``.

        Parameters
        ----------
        x_syn : Tensor [B, n_channels, T]
            Raw synaptic channels; column t = inputs in (t-1, t] ms.
        v_prev_mV : Tensor [B, S, T]
            Feedback in mV: column t holds the voltages at step t-1 (required when ``config.feedback``).
        spike_prev : Tensor [B, T]
            Spike history: column t is 1 when the soma spiked at step t-1 (required when
            ``config.spike_history``).
        """
        parts = [x_syn]
        if self.config.feedback:
            if v_prev_mV is None:
                raise ValueError("this model takes feedback voltages: pass v_prev_mV [B, S, T]")
            parts.append(self.to_z(v_prev_mV))
        if self.config.spike_history:
            if spike_prev is None:
                raise ValueError("this model takes its spike history: pass spike_prev [B, T]")
            parts.append(spike_prev.to(x_syn.dtype)[:, None])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def syn_transform(syn: torch.Tensor) -> torch.Tensor:
        """What the network sees of raw synaptic channel values: ``sign(x) log1p(|x|)`` (0 stays 0)."""
        return torch.sign(syn) * torch.log1p(syn.abs())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model input ``[B, n_inputs, ...]`` -> (backbone input ``[B, n_features, ...]``, transformed
        synaptic channels ``[B, n_channels, ...]``). Works on sequences ``[B, C, T]`` and columns ``[N, C]``."""
        c = self.n_channels
        u = self.syn_transform(x[:, :c])
        syn = self.routing(u) if self.routing is not None else u
        return (syn if x.shape[1] == c else torch.cat([syn, x[:, c:]], dim=1)), u

    def backbone_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbones read for raw model input ``x`` (see :meth:`encode`)."""
        return self.encode(x)[0]

    def _check_input(self, x: torch.Tensor, what: str) -> None:
        if x.shape[1] != self.n_inputs:
            fb = f" + {self.n_segments} feedback voltages" if self.config.feedback else ""
            fb += " + the previous spike" if self.config.spike_history else ""
            raise ValueError(f"{what} has {x.shape[1]} input channels; the model expects {self.n_inputs} "
                             f"({self.n_channels} synaptic{fb}); shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, all_tasks: bool = False):
        """Full-sequence pass.

        Parameters
        ----------
        x : Tensor [B, n_inputs, T]
            See the module docstring for units.
        all_tasks : bool
            Return the raw task tensor ``[B, n_tasks, T]`` instead of a :class:`Prediction` (for training).
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [B, n_inputs, T], got shape {tuple(x.shape)}")
        self._check_input(x, "x")
        B, _, T = x.shape
        feats, u = self.encode(x)
        local = None
        traces = None
        if self.n_local:                                                 # [B, S, 2, K, T] -> [B, S, F, T]
            traces = self.local_traces(u).flatten(2, 3)
        rows = [_rows(b(feats)) for b in self.all_backbones()]
        y = self._outputs(rows, traces)                                  # [B*T, n_tasks]
        y = y.reshape(B, T, self.n_tasks).transpose(1, 2)                # [B, n_tasks, T]
        y = self._add_residual(y, x)
        return y if all_tasks else self.split_tasks(y)

    def _outputs(self, rows: list, traces: torch.Tensor | None) -> torch.Tensor:
        """Rows of :meth:`all_backbones` (+ local traces ``[B, S, F, T]``, rows R = B*T) -> task outputs
        ``[R, n_tasks]`` (before the residual). The towers read the rows of :meth:`backbones`; the direct heads
        the soma backbone's, if any, else the trunk's."""
        if self.soma_net is not None:
            rows, direct_rows = rows[:-1], rows[-1]
        else:
            direct_rows = rows[0]
        if traces is None:
            y = self._heads(*rows)
        elif self.towers.linear:                 # local features enter the output linearly, per segment
            y = self._heads(*rows) + self._linear_local(traces)
        else:                                    # each task's tower reads its segment's traces
            y = self._heads(*rows, local=self.local_rows(traces.permute(0, 3, 1, 2).flatten(0, 1)))
        return self._direct(y, direct_rows)

    def _linear_local(self, traces: torch.Tensor) -> torch.Tensor:
        """Linear towers: ``w_loc . traces`` of each task's segment, traces ``[B, S, F, T]`` -> ``[B*T, n_tasks]``
        (the spike task reads the soma, which has no synapses: 0). Task n < S is segment n, imem task S+1+s is
        s, so the voltage and current weights of a segment stack into one ``[G, F]`` matrix: one batched GEMM
        per (cell, segment) over the time axis reads the traces once and materialises no ``[R, S, F]``
        product, forward or backward. A single step (T = 1, streaming) is a plain weighted sum."""
        B, S, n_f, T = traces.shape
        w = self.towers.w_loc
        w_tasks = (w[:S], w[S + 1:]) if self.config.imem_tasks else (w[:S],)
        if T == 1:                                                       # [N, S, F] . [S, F] per task group
            out = [(traces[..., 0] * w_g).sum(-1) for w_g in w_tasks]
        else:
            prod = torch.matmul(torch.stack(w_tasks, 1), traces)        # [S, G, F] @ [B, S, F, T] -> [B, S, G, T]
            prod = prod.permute(0, 3, 2, 1).reshape(B * T, len(w_tasks), S)
            out = prod.unbind(1)
        return torch.cat([out[0], traces.new_zeros(B * T, 1), *out[1:]], dim=1)

    def _direct(self, y: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """Add the direct heads (soma voltage, spike) read from the trunk rows ``[R, H]`` to ``y [R, n_tasks]``."""
        if not self.config.direct_heads:
            return y
        return y.index_add(1, self.direct_tasks, self.direct(trunk))

    def segment_inputs(self, u_syn: torch.Tensor) -> torch.Tensor:
        """Transformed channels ``[B, C, ...]`` -> each segment's own (excitatory, inhibitory) input
        ``[B, S, 2, ...]`` (zeros for segments without synapses)."""
        pad = torch.cat([u_syn, u_syn.new_zeros(u_syn.shape[0], 1, *u_syn.shape[2:])], dim=1)
        return pad.index_select(1, self.local_channels.reshape(-1)).view(u_syn.shape[0], self.n_segments, 2,
                                                                         *u_syn.shape[2:])

    @torch.no_grad()
    def local_traces(self, u_syn: torch.Tensor, block: int = 16) -> torch.Tensor:
        """Exponential traces ``[B, S, 2, K, T]`` of each segment's transformed synaptic inputs (from
        ``u_syn [B, C, T]``, 1 ms steps, starting from zero): ``y(t) = d_k y(t-1) + x(t)``, the recursion
        :meth:`step` runs. Inputs, not parameters: no gradient flows here.

        Computed by blocks of ``block`` steps: inside a block the recursion is a matrix product with the
        lower-triangular Toeplitz matrix of powers ``d_k^(i-j)`` (one GEMM for all cells, segments, taus and
        blocks); then each block adds ``d_k^(i+1)`` times the trace at the end of the block before, a scan over
        the T / block blocks. Same values as the step-by-step recursion (float rounding apart), in time-last
        layout, at a fraction of the cost of a Python loop over every step."""
        seg = self.segment_inputs(u_syn)                                     # [B, S, 2, T]
        B, S, _, T = seg.shape
        d = self.local_decay                                                 # [K]
        K, L = len(d), max(1, min(block, T))
        nb = -(-T // L)
        x = F.pad(seg, (0, nb * L - T)).reshape(-1, L)                       # [M * nb, L], M = B*S*2
        lag = torch.arange(L, device=seg.device)
        lag = lag[:, None] - lag[None, :]                                    # [i, j] = i - j
        toe = torch.where(lag >= 0, d[:, None, None] ** lag.clamp(min=0).to(d.dtype), 0.0)   # [K, i, j]
        with torch.autocast(seg.device.type, enabled=False):              # traces in the inputs' precision
            z = (x @ toe.to(x.dtype).permute(2, 0, 1).reshape(L, K * L)).view(-1, nb, K, L)  # in-block, from zero
        z = z.permute(0, 2, 1, 3).contiguous()                               # [M, K, nb, L]
        carry = (d.view(1, K) ** torch.arange(1, L + 1, device=seg.device, dtype=d.dtype)[:, None]).to(x.dtype)
        ends = z[..., L - 1].clone()                                         # [M, K, nb]: block ends, from zero
        for j in range(1, nb):              # a scan over blocks, not steps (vectorised over everything else)
            ends[..., j] += carry[L - 1] * ends[..., j - 1]
        z[:, :, 1:].addcmul_(ends[:, :, :-1, None], carry.t()[None, :, None, :])   # what enters from earlier blocks
        return z.view(B, S, 2, K, nb * L)[..., :T]

    def local_rows(self, traces: torch.Tensor) -> torch.Tensor:
        """Segment traces ``[R, S, F]`` -> each task's own features ``[R, n_tasks, F]``: the traces of the
        excitatory then the inhibitory channel of the task's segment (the spike task: the soma's, zeros)."""
        return traces.index_select(1, self.task_segment)

    def _add_residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """With ``config.residual``: voltage outputs = fed-back voltage (z) + tower output. Tasks / raw inputs
        on dim 1: ``[B, n_tasks, T]`` with ``[B, n_inputs, T]``, or ``[N, n_tasks]`` with ``[N, n_inputs]``."""
        if not self.config.residual:
            return y
        S, C = self.n_segments, self.n_channels
        return torch.cat([y[:, :S] + x[:, C:C + S], y[:, S:]], dim=1)

    def split_tasks(self, y: torch.Tensor) -> Prediction:
        """Task tensor ``[B, n_tasks, T]`` or ``[N, n_tasks]`` -> :class:`Prediction` (z-scored)."""
        S = self.n_segments
        v, spike = y[:, :S], y[:, S]
        imem = y[:, S + 1:] if self.config.imem_tasks else None
        return Prediction(v, spike, imem)

    # -- streaming --------------------------------------------------------------------------------------
    def streamer(self, n_cells: int, device=None, feedback: bool = True, output: str = "z", v0_mV=None,
                 dtype=None, spike_threshold=None, spike_rule: str = "crossing"):
        """One-step inference for ``n_cells`` cells; see :class:`lfdeep_neuron.surrogate.stream.Streamer`."""
        from lfdeep_neuron.surrogate.stream import Streamer
        return Streamer(self, n_cells, device=device, feedback=feedback, output=output, v0_mV=v0_mV,
                        dtype=dtype, spike_threshold=spike_threshold, spike_rule=spike_rule)

    def initial_state(self, n_cells: int, device=None, dtype=None) -> tuple:
        """State before the first :meth:`step`: ``(backbone states, (local traces [N, S, 2, K],) or ())``."""
        local = ((torch.zeros(n_cells, self.n_segments, 2, self.n_local // 2, device=device, dtype=dtype),)
                 if self.n_local else ())
        return tuple(b.initial_state(n_cells, device, dtype) for b in self.all_backbones()), local

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One 1-ms step of all tasks for N cells (eval mode): raw input column ``x_t [N, n_inputs]`` ->
        (``[N, n_tasks]``, new state). Pure: ``state`` is left untouched (the streamer owns it)."""
        feats, u = self.encode(x_t)
        states, local = state
        rows, new = [], []
        for backbone, s in zip(self.all_backbones(), states):   # trunk, or experts + compressor (+ soma net)
            h, s = backbone.step(feats, s)
            rows.append(h)
            new.append(s)
        traces = None
        if self.n_local:
            local = (torch.addcmul(self.segment_inputs(u)[..., None], local[0], self.local_decay),)  # as forward
            traces = local[0].view(x_t.shape[0], self.n_segments, self.n_local, 1)   # [N, S, F, T = 1]
        y = self._add_residual(self._outputs(rows, traces), x_t)
        return y, (tuple(new), local)

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={self.arch}, S={c.n_segments}, inputs={self.n_inputs}, tasks={self.n_tasks}, "
                f"receptive_field={self.receptive_field} steps")


class MH(Surrogate):
    """Hard parameter sharing: one TCN trunk, one tower (width ``tower_hard``) per task."""

    arch = "mh"

    def __init__(self, config: SurrogateConfig):
        super().__init__(config)
        c = config
        self.trunk = build_backbone(c.backbone, self.n_features, c.channels, 1, c)
        self.towers = Towers(self.n_tasks, self.trunk.c_out, c.tower_hard, self.n_local)
        self._init_direct(self.trunk.c_out)

    def backbones(self):
        return (self.trunk,)

    def _heads(self, trunk: torch.Tensor, local=None) -> torch.Tensor:
        return self.towers(trunk, local)                                   # [R, C] -> [R, n_tasks]


class MMoE(Surrogate):
    """Multi-gate mixture of experts: E TCN experts, a compressor TCN, one softmax gate and tower per task."""

    arch = "mmoe"

    def __init__(self, config: SurrogateConfig):
        super().__init__(config)
        c = config
        E = c.n_experts
        self.experts = build_backbone(c.backbone, self.n_features, c.channels, E, c)
        C = self.experts.c_out // E
        self.compressor = build_backbone(c.backbone, self.n_features, c.compressor, 1, c)
        K = self.compressor.c_out
        # gate logits of row r: comp[r] @ gate_w, viewed [E, n_tasks] (experts first: softmax over a
        # leading dim is much faster on CPU than over a trailing dim of 5)
        self.gate_w = nn.Parameter(torch.empty(K, E * self.n_tasks).uniform_(-1 / math.sqrt(K), 1 / math.sqrt(K)))
        self.gate_b = nn.Parameter(torch.zeros(E, self.n_tasks))
        self.towers = Towers(self.n_tasks, C, c.tower_soft, self.n_local)
        self.n_experts, self.expert_width = E, C
        self._init_direct(self.experts.c_out)

    def backbones(self):
        return (self.experts, self.compressor)

    def gates(self, comp: torch.Tensor) -> torch.Tensor:
        """Compressor rows ``[R, K]`` -> gate weights ``[R, E, n_tasks]`` (softmax over experts, dim 1)."""
        logits = torch.addmm(self.gate_b.reshape(-1), comp, self.gate_w).view(-1, self.n_experts, self.n_tasks)
        return torch.softmax(self._mask_logits(logits), dim=1)

    def _mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _heads(self, experts: torch.Tensor, comp: torch.Tensor, local=None) -> torch.Tensor:
        f = experts.view(-1, self.n_experts, self.expert_width)             # [R, E, C]
        return self.towers.mixture(self.gates(comp), f, local)


class MMoEEx(MMoE):
    """MMoE with exclusivity: a fixed random subset of (task, expert) gate entries is removed.

    ``mask [n_tasks, E]`` (a buffer, saved in ``state_dict``) is drawn once from ``config.mask_seed``: each
    entry is dropped with probability ``config.exclusivity``; a task left with no expert keeps one at random.
    Dropped entries get logit -inf, so their gate weight is exactly 0 and the others renormalise.
    """

    arch = "mmoeex"

    def __init__(self, config: SurrogateConfig):
        super().__init__(config)
        g = torch.Generator().manual_seed(config.mask_seed)
        keep = torch.rand(self.n_tasks, self.n_experts, generator=g) >= config.exclusivity
        rescue = torch.randint(self.n_experts, (self.n_tasks,), generator=g)
        empty = ~keep.any(dim=1)
        keep[empty, rescue[empty]] = True
        self.register_buffer("mask", keep)

    def _mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.mask.t(), float("-inf"))          # logits [R, E, n_tasks]


ARCHS: dict[str, type[Surrogate]] = {"mh": MH, "mmoe": MMoE, "mmoeex": MMoEEx}


def build_model(arch: str, config: str | SurrogateConfig | dict = "paper", **overrides) -> Surrogate:
    """``build_model("mmoe", "paper", n_segments=8)``; ``config`` may be a name, a config or a dict."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if isinstance(config, SurrogateConfig):
        cfg = dataclasses.replace(config, **overrides)
    elif isinstance(config, dict):
        cfg = SurrogateConfig(**{**config, **overrides})
    else:
        cfg = make_config(config, **overrides)
    return ARCHS[arch](cfg)
