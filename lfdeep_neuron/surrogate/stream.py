"""One-step (streaming) inference: advance many surrogate cells by 1 ms at a time.

>>> st = model.streamer(n_cells=1000)               # on the model's device; output z-scored
>>> for t in range(T):
...     v_t, spike_logit_t = st.step(x_syn[:, :, t])  # x_syn [1000, 1278, T]: closed loop
>>> st.state_bytes_per_cell()

Semantics
---------
A :class:`Streamer` owns, per cell, the model's state (``model.initial_state``: the state of every
backbone -- pending convolution sums of a TCN, ``(h, c)`` of an LSTM, leaky memories -- and the local synaptic
traces) and the last predicted voltages. Each step calls the model's pure ``model.step(x_t, state)`` and keeps
the state it returns; the model never changes the streamer's state behind its back. A step costs the same
whatever the history length. Starting from :meth:`Streamer.reset`, stepping through columns
``x[:, :, 0..T-1]`` gives the columns of the full-sequence pass ``model(x)`` in eval mode (to float
round-off): the full pass pads each convolution with zeros on the left / starts each recurrence at zero, the
streamer starts from ``model.initial_state``.

``step(x_t)`` accepts

* ``x_t [n_cells, n_channels]`` (synaptic channels only): **closed loop**. The streamer appends its own
  previous voltage prediction as the feedback input. For the first step after a reset the feedback is the
  initial voltage ``v0_mV`` given to the constructor or to :meth:`~Streamer.reset`, by default the model's
  ``v_rest`` buffer (set at training time from the data: the state at t = 0 of the training simulations
  when the dataset provides it, else the per-segment mean voltage).
* ``x_t [n_cells, n_inputs]`` (synaptic channels + z-scored feedback): **teacher-forced**, used as given.

and returns a :class:`~lfdeep_neuron.surrogate.mtl.Prediction` ``(v_t [n_cells, S], spike_logit_t
[n_cells])`` (plus ``.imem`` for models with membrane-current tasks), ``v_t`` z-scored or in mV
(``output``), and ``.spiked [n_cells]`` (bool): the spike decision of the step. Inputs are raw synaptic
channel values, as for the model (see :mod:`.mtl`).

Spikes
------
The streamer owns the spike decision, so that everything that streams (the co-simulation engine,
``rollout``, ``evaluate``) emits the same spikes: step k spikes when its logit exceeds ``spike_threshold``
and (``spike_rule='crossing'``, default) the previous step's did not -- a run of steps above the threshold
is one spike, as a NetCon threshold on a voltage; ``'level'``: every step above it. The threshold defaults
to the checkpoint's calibrated one (:func:`~.metrics.default_spike_threshold`) and may be a tensor
``[n_cells]`` (one per cell, e.g. to calibrate many thresholds in one batched run). A model with
``config.spike_history`` reads the spike of the previous step as an input: in closed loop the streamer
feeds it the spike it emitted (teacher-forced inputs carry their own spike row).

The streamer works on a frozen copy of the model (eval mode): create it after training.
"""
from __future__ import annotations

import copy

import torch

from lfdeep_neuron.surrogate.backbone import state_bytes, state_map
from lfdeep_neuron.surrogate.metrics import default_spike_threshold
from lfdeep_neuron.surrogate.mtl import Prediction, Surrogate

__all__ = ["Streamer", "closed_loop"]


class Streamer:
    """Stateful one-step inference for ``n_cells`` cells; see the module docstring.

    Parameters
    ----------
    model : Surrogate
    n_cells : int
    device : torch.device or str, optional
        Default: the model's device.
    feedback : bool
        Feed the previous prediction back when ``step`` gets synaptic channels only. Ignored (False) for
        models trained without feedback.
    output : {"z", "mV"}
        Units of the returned voltages (and ``imem``: z-scored or nA).
    v0_mV : array-like [S] or [n_cells, S], optional
        Initial voltage used as the first feedback; default ``model.v_rest``.
    dtype : torch.dtype, optional
        Computation dtype (default: the model's); e.g. ``torch.float16`` on a GPU.
    spike_threshold : float or Tensor [n_cells], optional
        Spike-logit threshold (default: the checkpoint's calibrated one, else 0).
    spike_rule : {"crossing", "level"}
        See the module docstring.
    """

    def __init__(self, model: Surrogate, n_cells: int, device=None, feedback: bool = True, output: str = "z",
                 v0_mV=None, dtype=None, spike_threshold=None, spike_rule: str = "crossing"):
        if output not in ("z", "mV"):
            raise ValueError(f"output must be 'z' or 'mV', got {output!r}")
        if spike_rule not in ("crossing", "level"):
            raise ValueError(f"spike_rule must be 'crossing' or 'level', got {spike_rule!r}")
        # State made of normal tensors even when created under torch.inference_mode(), so that the
        # streamer can be stepped and reset both inside and outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            self._build(model, n_cells, device, feedback, output, v0_mV, dtype)
            thr = default_spike_threshold(model) if spike_threshold is None else spike_threshold
            thr = torch.as_tensor(thr, device=self.device, dtype=self.dtype)
            if thr.dim() > 1 or (thr.dim() == 1 and thr.numel() != self.n_cells):
                raise ValueError(f"spike_threshold must be a number or [n_cells={self.n_cells}], got shape "
                                 f"{tuple(thr.shape)}")
            self.spike_threshold = thr
        self.spike_rule = spike_rule

    def _build(self, model, n_cells, device, feedback, output, v0_mV, dtype) -> None:
        if int(n_cells) < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        p = next(model.parameters())
        self.device = p.device if device is None else torch.device(device)
        self.dtype = p.dtype if dtype is None else dtype
        self.model = copy.deepcopy(model).eval().to(device=self.device, dtype=self.dtype).requires_grad_(False)
        self.n_cells = int(n_cells)
        self.feedback = bool(feedback and model.config.feedback)
        self.output = output
        self.n_segments, self.n_channels, self.n_inputs = model.n_segments, model.n_channels, model.n_inputs
        self.state = self.model.initial_state(self.n_cells, self.device, self.dtype)
        self.fb = torch.zeros(self.n_cells, self.n_segments, device=self.device, dtype=self.dtype)
        self.history = bool(model.config.spike_history)
        self.above = torch.zeros(self.n_cells, dtype=torch.bool, device=self.device)   # logit above at k-1
        self.spiked = torch.zeros(self.n_cells, dtype=torch.bool, device=self.device)  # spike emitted at k-1
        self.t = 0
        self.reset(v0_mV)

    def reset(self, v0_mV=None, cells=None) -> None:
        """Forget the history and set the initial feedback voltage.

        Parameters
        ----------
        v0_mV : array-like [S], [n_cells, S] or [len(cells), S], optional
            Voltage (mV) at the step before the next one; default ``model.v_rest``.
        cells : index tensor / list, optional
            Reset only these cells (default all).
        """
        m = self.model
        idx = slice(None) if cells is None else torch.as_tensor(cells, device=self.device, dtype=torch.long)
        v0 = m.v_rest if v0_mV is None else torch.as_tensor(v0_mV, device=self.device, dtype=self.dtype)
        if v0.shape[-1] != self.n_segments or v0.dim() > 2:
            raise ValueError(f"v0_mV must be [S] or [cells, S] with S = {self.n_segments}, got {tuple(v0.shape)}")
        with torch.no_grad():
            if cells is None:
                self.state = m.initial_state(self.n_cells, self.device, self.dtype)
            else:
                fresh = m.initial_state(len(idx), self.device, self.dtype)
                self.state = state_map(lambda s, s0: s.index_copy(0, idx, s0), self.state, fresh)
            self.fb[idx] = m.to_z(v0)
            self.above[idx] = False
            self.spiked[idx] = False
        if cells is None:
            self.t = 0

    def state_bytes_per_cell(self) -> int:
        """Bytes of state per cell (the model's state + the fed-back voltages + two spike flags)."""
        return state_bytes(self.state) + self.fb[0].numel() * self.fb.element_size() + 2

    @torch.no_grad()
    def step(self, x_t) -> Prediction:
        """Advance all cells by one step; see the module docstring for ``x_t`` and the outputs."""
        m = self.model
        x_t = torch.as_tensor(x_t, device=self.device, dtype=self.dtype)
        if x_t.dim() != 2 or x_t.shape[0] != self.n_cells:
            raise ValueError(f"x_t must be [n_cells={self.n_cells}, channels], got {tuple(x_t.shape)}")
        own = [self.fb] if self.feedback else []
        if self.history:
            own.append(self.spiked[:, None].to(self.dtype))
        if own and x_t.shape[1] == self.n_channels:            # closed loop: append what the streamer owns
            x_t = torch.cat([x_t, *own], dim=1)
        elif x_t.shape[1] != self.n_inputs:
            closed = f" or {self.n_channels} (synaptic only, closed loop)" if own else ""
            raise ValueError(f"x_t has {x_t.shape[1]} channels; expected {self.n_inputs} (teacher-forced){closed}")
        y, self.state = m.step(x_t, self.state)                 # [n_cells, n_tasks]; the model's pure step
        self.t += 1
        pred = m.split_tasks(y)
        self.fb.copy_(pred.v)
        above = pred.spike_logit > self.spike_threshold
        spiked = above & ~self.above if self.spike_rule == "crossing" else above
        self.above, self.spiked = above, spiked
        if self.output == "z":
            return Prediction(pred.v, pred.spike_logit, pred.imem, spiked)
        imem = None if pred.imem is None else m.imem_to_nA(pred.imem)
        return Prediction(m.to_mV(pred.v), pred.spike_logit, imem, spiked)


@torch.no_grad()
def closed_loop(model: Surrogate, x_syn: torch.Tensor, v0_mV=None, output: str = "mV", device=None,
                progress: bool = False, spike_threshold=None, spike_rule: str = "crossing",
                voltages: bool = True) -> Prediction:
    """Closed-loop (autoregressive) run of whole sequences with a :class:`Streamer`.

    Parameters
    ----------
    model : Surrogate
    x_syn : Tensor [B, n_channels, T]
        Raw synaptic channels per 1 ms step.
    v0_mV : Tensor [S] or [B, S], optional
        Voltage at the step before column 0 (default ``model.v_rest``).
    output : {"z", "mV"}
    device : optional
        Where to run (default: the model's device).
    progress : bool
        Show a tqdm bar over time steps.
    spike_threshold : float or Tensor [B], optional
        Threshold of the spike decision (default: the checkpoint's); per sequence when a tensor.
    spike_rule : {"crossing", "level"}
    voltages : bool
        False: keep only the spike logits and decisions (``v`` and ``imem`` None), e.g. to calibrate
        thresholds on many copies of long sequences.

    Returns
    -------
    Prediction
        ``v [B, S, T]``, ``spike_logit [B, T]`` (and ``imem [B, S, T]`` when the model has it), and
        ``.spiked [B, T]`` (bool): the streamer's spike decisions.
    """
    B, C, T = x_syn.shape
    # A model without feedback inputs (config.feedback False) has no voltage loop to close: its run is
    # the plain streamed prediction from the synaptic inputs (plus, with spike history, its own spikes).
    st = Streamer(model, B, device=device, feedback=True, output=output, v0_mV=v0_mV,
                  spike_threshold=spike_threshold, spike_rule=spike_rule)
    x_syn = x_syn.to(st.device, st.dtype)
    v = torch.empty(T, B, model.n_segments, device=st.device, dtype=st.dtype) if voltages else None
    s = torch.empty(T, B, device=st.device, dtype=st.dtype)
    spiked = torch.empty(T, B, device=st.device, dtype=torch.bool)
    imem = torch.empty_like(v) if voltages and model.config.imem_tasks else None
    steps = range(T)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="closed loop", unit="ms")
    for t in steps:
        out = st.step(x_syn[:, :, t])
        s[t], spiked[t] = out.spike_logit, out.spiked
        if v is not None:
            v[t] = out.v
        if imem is not None:
            imem[t] = out.imem
    return Prediction(None if v is None else v.permute(1, 2, 0), s.t(),
                      None if imem is None else imem.permute(1, 2, 0), spiked.t())
