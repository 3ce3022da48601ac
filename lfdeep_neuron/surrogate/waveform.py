"""Action potentials in the predicted voltages: a per-segment spike waveform added where a spike is emitted.

Surrogates trained on a clipped soma target (``config.soma_clip_mV``) carry the somatic spike in their
spike-logit output only: their voltage traces have no action potential, and neither have their dendrites the
back-propagating one, while the LFP of an L5 pyramidal cell is dominated by it. A :class:`SpikeWaveform`
puts them back: for every emitted spike it adds, to every segment's voltage (and membrane current, for models
with current tasks), a kernel learned from data -- the spike-triggered average of the model's closed-loop
residual aligned on the true spikes (:func:`fit_spike_waveform`).

Alignment
---------
Step k yields the voltages *at* k ms; a spike emitted at step k (the spike logit crossed its threshold in
step k, i.e. the spike lies in (k-1, k] ms) adds kernel column j to step ``k + delay_steps + j``,
j = 0 .. K-1. A true spike at s ms falls in step ``ceil(s)`` (the dataset's binning), which is where the
fit aligns it.

Overlap rule (one rule, both forms)
-----------------------------------
A new spike **restarts** the waveform: at any step at most one kernel column is added, that of the most
recent spike (the earlier spike's remaining columns are dropped). An action potential is not a linear event
that sums with the tail of the previous one, and the fit averages each kernel column only over spikes not yet
followed by another spike (see :func:`spike_triggered_average`), so the kernel describes exactly what this
rule applies. The streaming state is then one integer per cell: steps since the last spike.

Two forms, identical results (tested):

* :meth:`SpikeWaveform.apply` on whole sequences ``v [B, S, T]``, ``spiked [B, T]`` (e.g. ``evaluate``,
  ``rollout``);
* :meth:`SpikeWaveform.step` one step at a time for N cells with a :class:`WaveformState` (the co-simulation
  engine): O(1) state and work per cell, one indexed add for all cells that are inside a waveform.

Neither changes the model: the waveform is added to what the model hands out, never to its state or its
fed-back voltages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lfdeep_neuron.errors import InputError

__all__ = ["SpikeWaveform", "WaveformState", "spike_triggered_average", "fit_spike_waveform",
           "model_waveform", "configure_parser", "run", "OVERLAP_RULE"]

#: The overlap rule of :class:`SpikeWaveform` (see the module docstring).
OVERLAP_RULE = "restart"


@dataclass(frozen=True)
class WaveformState:
    """Streaming state of :meth:`SpikeWaveform.step` for N cells.

    Attributes
    ----------
    age : Tensor int64 [N]
        Steps since each cell's last spike (0 = it spiked at the latest step); ``span`` (= delay + K) and
        above means "no waveform running" (also the value before any spike).
    """

    age: torch.Tensor


@dataclass
class SpikeWaveform:
    """Per-segment spike waveform added to predicted voltages (and currents) at emitted spikes.

    Parameters
    ----------
    kernel_v_mV : Tensor or array [S, K]
        Added to segment s's voltage at step ``k + delay_steps + j`` for a spike emitted at step k (mV).
    kernel_i_nA : Tensor or array [S, K], optional
        The same for the bin-mean membrane currents (nA) of models with current tasks.
    delay_steps : int
        Steps between the spike's step and kernel column 0 (default 0: column 0 lands on the spike's own step).
    n_spikes : int
        Spikes the fit averaged (0 when made by hand).
    info : dict
        Free-form provenance (data, model, options of the fit).

    Notes
    -----
    Overlap rule: a new spike restarts the waveform (:data:`OVERLAP_RULE`, module docstring).
    """

    kernel_v_mV: torch.Tensor
    kernel_i_nA: torch.Tensor | None = None
    delay_steps: int = 0
    n_spikes: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kernel_v_mV = self._kernel(self.kernel_v_mV, "kernel_v_mV")
        if self.kernel_i_nA is not None:
            self.kernel_i_nA = self._kernel(self.kernel_i_nA, "kernel_i_nA").to(self.kernel_v_mV.device)
            if self.kernel_i_nA.shape != self.kernel_v_mV.shape:
                raise InputError(f"spike waveform: kernel_i_nA is {tuple(self.kernel_i_nA.shape)}, kernel_v_mV "
                                 f"{tuple(self.kernel_v_mV.shape)}: they must have the same [S, K] shape")
        if int(self.delay_steps) != self.delay_steps or self.delay_steps < 0:
            raise InputError(f"spike waveform: delay_steps must be an integer >= 0, got {self.delay_steps!r}")
        self.delay_steps = int(self.delay_steps)
        self.n_spikes = int(self.n_spikes)
        # kernels padded with a zero column, transposed to [K + 1, S]: row `span` adds nothing
        self._pad_v = self._padded(self.kernel_v_mV)
        self._pad_i = None if self.kernel_i_nA is None else self._padded(self.kernel_i_nA)

    @staticmethod
    def _kernel(k, name) -> torch.Tensor:
        t = torch.as_tensor(k)
        if t.dim() != 2 or t.shape[1] < 1 or not t.is_floating_point():
            raise InputError(f"spike waveform: {name} must be a float [S, K] array with K >= 1, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if not torch.isfinite(t).all():
            raise InputError(f"spike waveform: {name} contains non-finite values")
        return t

    def _padded(self, kernel: torch.Tensor) -> torch.Tensor:
        zeros = kernel.new_zeros(kernel.shape[0], self.delay_steps)
        return torch.cat([zeros, kernel, kernel.new_zeros(kernel.shape[0], 1)], dim=1).t().contiguous()

    # -- shape ------------------------------------------------------------------------------------------
    @property
    def n_segments(self) -> int:
        return int(self.kernel_v_mV.shape[0])

    @property
    def kernel_ms(self) -> int:
        """K: kernel columns (steps)."""
        return int(self.kernel_v_mV.shape[1])

    @property
    def span(self) -> int:
        """Steps a waveform lasts after its spike's step (delay + K); ages >= span add nothing."""
        return self.delay_steps + self.kernel_ms

    @property
    def soma_peak_mV(self) -> float:
        """Largest entry of the soma's (segment 0) voltage kernel (mV)."""
        return float(self.kernel_v_mV[0].max())

    def to(self, device=None, dtype=None) -> "SpikeWaveform":
        """A copy with its kernels on ``device`` / in ``dtype``."""
        mv = lambda k: None if k is None else k.to(device=device, dtype=dtype)  # noqa: E731
        return SpikeWaveform(mv(self.kernel_v_mV), mv(self.kernel_i_nA), self.delay_steps, self.n_spikes,
                             dict(self.info))

    def summary(self) -> str:
        """One line: spikes used, K, soma peak."""
        cur = ", with currents" if self.kernel_i_nA is not None else ""
        return (f"spike waveform: {self.n_segments} segments x {self.kernel_ms} ms{cur}, {self.n_spikes} spikes "
                f"averaged, soma kernel peak {self.soma_peak_mV:+.1f} mV")

    # -- whole sequences --------------------------------------------------------------------------------
    def ages(self, spiked) -> torch.Tensor:
        """Steps since the last spike ``[B, T]`` int64, capped at :attr:`span` (= no spike yet / too long ago).

        Parameters
        ----------
        spiked : bool Tensor or array [B, T]
        """
        sp = torch.as_tensor(np.asarray(spiked) if not isinstance(spiked, torch.Tensor) else spiked).bool()
        if sp.dim() != 2:
            raise ValueError(f"spiked must be [B, T], got {tuple(sp.shape)}")
        T = sp.shape[1]
        steps = torch.arange(T, device=sp.device).expand_as(sp)
        last = torch.where(sp, steps, torch.full_like(steps, -self.span - 1)).cummax(dim=1).values
        return (steps - last).clamp_max(self.span)

    def _added(self, padded: torch.Tensor, age: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``padded[age]`` as ``[..., S]`` on ``like``'s device and dtype."""
        return padded.to(device=like.device, dtype=like.dtype).index_select(0, age.reshape(-1).to(like.device)) \
            .view(*age.shape, padded.shape[1])

    def apply(self, v, spiked, imem=None):
        """Add the waveform to whole sequences (pure: returns new arrays).

        Parameters
        ----------
        v : Tensor or ndarray [B, S, T]
            Predicted voltages (mV), column k = step k.
        spiked : bool Tensor or ndarray [B, T]
            Steps at which a spike was emitted.
        imem : Tensor or ndarray [B, S, T], optional
            Predicted bin-mean membrane currents (nA); gets ``kernel_i_nA`` when the waveform has one
            (returned unchanged otherwise).

        Returns
        -------
        ``(v', imem')`` of the input types (``imem'`` None when ``imem`` is None).
        """
        is_np = not isinstance(v, torch.Tensor)
        vt = torch.as_tensor(v)
        if vt.dim() != 3 or vt.shape[1] != self.n_segments:
            raise ValueError(f"v must be [B, S={self.n_segments}, T], got {tuple(vt.shape)}")
        age = self.ages(spiked)
        if tuple(age.shape) != (vt.shape[0], vt.shape[2]):
            raise ValueError(f"spiked is {tuple(age.shape)}; v is {tuple(vt.shape)}: expected [B, T]")
        out_v = vt + self._added(self._pad_v, age, vt).permute(0, 2, 1)
        out_i = None
        if imem is not None:
            it = torch.as_tensor(imem)
            if tuple(it.shape) != tuple(vt.shape):
                raise ValueError(f"imem is {tuple(it.shape)}; v is {tuple(vt.shape)}: they must match")
            out_i = it if self._pad_i is None else it + self._added(self._pad_i, age, it).permute(0, 2, 1)
        if is_np:
            return out_v.numpy(), None if out_i is None else np.asarray(out_i)
        return out_v, out_i

    # -- streaming --------------------------------------------------------------------------------------
    def initial_state(self, n_cells: int, device=None) -> WaveformState:
        """State before the first step: no waveform running in any of ``n_cells`` cells."""
        return WaveformState(torch.full((int(n_cells),), self.span, dtype=torch.int64, device=device))

    def step(self, state: WaveformState, v: torch.Tensor, spiked: torch.Tensor, imem=None, inplace: bool = False):
        """One step for N cells (pure unless ``inplace``: returns new tensors and a new state).

        Parameters
        ----------
        state : WaveformState
            From :meth:`initial_state` or the previous step.
        v : Tensor [N, S]
            This step's predicted voltages (mV).
        spiked : bool Tensor [N]
            Which cells emitted a spike at this step.
        imem : Tensor [N, S], optional
            This step's predicted membrane currents (nA).
        inplace : bool
            Add into ``v`` and ``imem`` themselves (no copy of the [N, S] arrays; what the co-simulation
            engine does with the streamer's fresh outputs). The state is never modified in place.

        Returns
        -------
        ``(v', imem', new_state)``: only the rows of cells inside a waveform change (one ``index_add`` for
        all of them); ``imem'`` is None when ``imem`` is None.
        """
        spiked = torch.as_tensor(spiked, device=state.age.device).bool()
        age = torch.where(spiked, torch.zeros_like(state.age), (state.age + 1).clamp_max(self.span))
        live = torch.nonzero(age < self.span).flatten()
        new = WaveformState(age)
        if live.numel() == 0:
            return v, imem, new
        rows = age.index_select(0, live)
        v = self._add_rows(v, live, self._pad_v, rows, inplace)
        if imem is not None and self._pad_i is not None:
            imem = self._add_rows(imem, live, self._pad_i, rows, inplace)
        return v, imem, new

    @staticmethod
    def _add_rows(x: torch.Tensor, live: torch.Tensor, padded: torch.Tensor, rows: torch.Tensor, inplace: bool):
        """``x[live] += padded[rows]`` (one indexed add), in place or on a copy."""
        dev = x.device
        add = padded.to(device=dev, dtype=x.dtype).index_select(0, rows.to(dev))
        return x.index_add_(0, live.to(dev), add) if inplace else x.index_add(0, live.to(dev), add)

    # -- persistence ------------------------------------------------------------------------------------
    def to_payload(self) -> dict:
        """Plain dict for a checkpoint (tensors, numbers, strings; ``torch.load(weights_only=True)``-safe)."""
        out = {"kernel_v_mV": self.kernel_v_mV.detach().cpu().float().clone(), "delay_steps": self.delay_steps,
               "n_spikes": self.n_spikes, "overlap": OVERLAP_RULE, "info": dict(self.info)}
        if self.kernel_i_nA is not None:
            out["kernel_i_nA"] = self.kernel_i_nA.detach().cpu().float().clone()
        return out

    @classmethod
    def from_payload(cls, payload: dict, where: str = "checkpoint") -> "SpikeWaveform":
        """Inverse of :meth:`to_payload`; :class:`InputError` naming ``where`` when malformed."""
        if not isinstance(payload, dict) or "kernel_v_mV" not in payload:
            raise InputError(f"{where}: spike_waveform is not a dict with kernel_v_mV")
        if payload.get("overlap", OVERLAP_RULE) != OVERLAP_RULE:
            raise InputError(f"{where}: spike_waveform overlap rule {payload.get('overlap')!r} is not supported "
                             f"(this code applies {OVERLAP_RULE!r})")
        try:
            return cls(payload["kernel_v_mV"], payload.get("kernel_i_nA"), payload.get("delay_steps", 0),
                       payload.get("n_spikes", 0), dict(payload.get("info", {})))
        except InputError as err:
            raise InputError(f"{where}: {err}") from err


def model_waveform(model) -> SpikeWaveform | None:
    """The spike waveform a loaded surrogate carries (``model.meta['spike_waveform']``), else None."""
    meta = getattr(model, "meta", None) or {}
    return meta.get("spike_waveform")


# ---------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------
def spike_triggered_average(residual, spike_bins, kernel_ms: int, isolation_ms: int | None = None,
                            baseline_ms: int = 0):
    """Spike-triggered average of ``residual`` over the K bins starting at each isolated spike's bin.

    Parameters
    ----------
    residual : ndarray [S, T]
        E.g. true minus predicted voltage (mV); column k = step k.
    spike_bins : int array
        Steps of the spikes (a spike at s ms is in step ``ceil(s)``).
    kernel_ms : int
        K: columns of the average (column j = step k + j).
    isolation_ms : int, optional
        Spikes with another spike in the ``isolation_ms`` steps before are not used (default K).
    baseline_ms : int
        If > 0, subtract each spike's mean residual over the ``baseline_ms`` steps before its step (spikes
        without that many steps before are not used).

    Returns
    -------
    kernel : ndarray float64 [S, K]
        Column j averages the residual at step k + j over the used spikes whose window still holds that step
        and has no later spike at or before it (the restart rule: the next spike ends a window); columns no
        spike reaches are 0.
    counts : ndarray int64 [K]
        Spikes averaged per column.
    used : ndarray int64
        The steps of the spikes used.
    """
    r = np.asarray(residual, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"residual must be [S, T], got {r.shape}")
    S, T = r.shape
    K = int(kernel_ms)
    if K < 1:
        raise ValueError(f"kernel_ms must be >= 1, got {kernel_ms}")
    iso = K if isolation_ms is None else int(isolation_ms)
    base = int(baseline_ms)
    bins = np.unique(np.asarray(spike_bins, dtype=np.int64).reshape(-1))
    bins = bins[(bins >= 0) & (bins < T)]
    prev = np.r_[np.iinfo(np.int64).min // 2, bins[:-1]]
    nxt = np.r_[bins[1:], T]
    keep = (bins - prev > iso) & (bins - base >= 0) & (bins >= 1)
    used, nxt = bins[keep], nxt[keep]
    j = np.arange(K)
    counts = np.zeros(K, dtype=np.int64)
    if used.size == 0:
        return np.zeros((S, K)), counts, used
    steps = used[:, None] + j                                   # [n, K]
    mask = steps < np.minimum(nxt, T)[:, None]                  # window ends at the next spike / the end
    win = r[:, np.minimum(steps, T - 1)]                        # [S, n, K]
    if base > 0:
        pre = r[:, used[:, None] - np.arange(1, base + 1)].mean(axis=2)     # [S, n]
        win = win - pre[:, :, None]
    counts = mask.sum(axis=0)
    total = (win * mask).sum(axis=1)                            # [S, K]
    kernel = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    return kernel, counts.astype(np.int64), used


@torch.no_grad()
def _predict(model, x_syn: torch.Tensor, v0_mV: torch.Tensor, spike: torch.Tensor, device
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-loop prediction of steps 1..T-1 (mV, nA): ``[S, T-1]`` each (imem None without current tasks).
    A model with spike history and no voltage feedback reads the true spikes ``spike [T]``: the waveform is
    added at emitted spikes, so it is fitted on the residual of a run whose spikes are the true ones (with
    voltage feedback too, the streamed run feeds back its own spikes at the checkpoint's threshold)."""
    from lfdeep_neuron.surrogate.stream import closed_loop

    x = x_syn[None, :, 1:].to(device)
    if model.config.feedback:
        pred = closed_loop(model, x, v0_mV=v0_mV[None].to(device), output="mV", device=device)
        v, imem = pred.v, pred.imem
    else:       # no feedback: the full pass is the closed-loop prediction
        pred = model(model.make_inputs(x, spike_prev=spike[None, :-1].to(device)))
        v = model.to_mV(pred.v)
        imem = None if pred.imem is None else model.imem_to_nA(pred.imem)
    return v[0].float().cpu(), None if imem is None else imem[0].float().cpu()


def fit_spike_waveform(model, sims, kernel_ms: int = 10, max_sims: int | None = None,
                       isolation_ms: int | None = None, baseline_ms: int = 0, device="cpu",
                       progress: bool = False) -> SpikeWaveform:
    """Fit a :class:`SpikeWaveform`: STA of the model's closed-loop residual at the true spikes.

    Parameters
    ----------
    model : Surrogate
    sims : SimulationDataset
        Whole simulations (``window_ms=None``) with fields ``x_syn``, ``v``, ``spike`` (+ ``imem`` for models
        with current tasks); any sequence of such item dicts with ``window_ms = None`` works.
    kernel_ms : int
        K, the waveform's length in 1-ms steps.
    max_sims : int, optional
        Use the first ``max_sims`` simulations.
    isolation_ms, baseline_ms : int
        See :func:`spike_triggered_average` (default isolation: K ms; no baseline subtraction).
    device : str or torch.device

    Returns
    -------
    SpikeWaveform
        Spikes are pooled over simulations (each column weighted by its spike count); ``info`` holds the
        options, the simulations used and the per-column counts.

    Raises
    ------
    InputError
        When the simulations hold no usable (isolated) spike.

    Notes
    -----
    One simulation at a time. Feedback models are streamed (O(1) memory per step); models without feedback
    run their full pass over the whole simulation (faster, but its activations are held at once: peak RSS
    1.7 GB for a 6-s record with the bundled model).
    """
    if getattr(sims, "window_ms", None) is not None:
        raise InputError("fit_spike_waveform needs whole simulations: a SimulationDataset with window_ms=None")
    want_i = bool(model.config.imem_tasks)
    if want_i and "imem" not in getattr(sims, "fields", ("imem",)):
        raise InputError("the model predicts membrane currents: the dataset must read the 'imem' field too")
    model = model.eval().to(device)
    n = len(sims) if max_sims is None else min(int(max_sims), len(sims))
    K = int(kernel_ms)
    S = model.n_segments
    tot_v, tot_i = np.zeros((S, K)), np.zeros((S, K))
    counts = np.zeros(K, dtype=np.int64)
    n_used, used_sims = 0, []
    items = range(n)
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="fit spike waveform", unit="sim")
    for pos in items:
        item = sims[pos]
        v = torch.as_tensor(item["v"])
        sim = int(item["sim_index"]) if "sim_index" in item else pos
        if v.dim() != 2 or v.shape[0] != S:
            raise InputError(f"simulation {sim}: voltages of shape {tuple(v.shape)}; the model predicts {S} segments")
        bins = np.flatnonzero(np.asarray(item["spike"]) > 0)
        if bins.size == 0:
            continue
        v_pred, i_pred = _predict(model, torch.as_tensor(item["x_syn"]).float(), v[:, 0].float(),
                                  torch.as_tensor(np.asarray(item["spike"])).float(), device)
        res = np.zeros(tuple(v.shape), dtype=np.float64)
        res[:, 1:] = v[:, 1:].numpy() - v_pred.numpy()
        k_v, c, used = spike_triggered_average(res, bins, K, isolation_ms, baseline_ms)
        if used.size == 0:
            continue
        tot_v += k_v * c
        if want_i:
            res_i = np.zeros(tuple(v.shape), dtype=np.float64)
            res_i[:, 1:] = np.asarray(item["imem"])[:, 1:] - i_pred.numpy()
            k_i, _, _ = spike_triggered_average(res_i, bins, K, isolation_ms, baseline_ms)
            tot_i += k_i * c
        counts += c
        n_used += used.size
        used_sims.append(sim)
    if n_used == 0:
        where = f"{getattr(sims, 'root', 'the data')} (split {getattr(sims, 'split', None) or 'all'})"
        raise InputError(f"no isolated somatic spike (none in the {K} ms before) in the {n} simulation(s) of "
                         f"{where}: nothing to fit a spike waveform on")
    div = np.maximum(counts, 1)
    info = {"kernel_ms": K, "isolation_ms": K if isolation_ms is None else int(isolation_ms),
            "baseline_ms": int(baseline_ms), "sims": used_sims, "column_counts": counts.tolist(),
            "split": str(getattr(sims, "split", "")), "data": str(getattr(sims, "root", "")),
            "residual": "closed loop, true minus predicted, aligned on step ceil(spike time)"}
    return SpikeWaveform(torch.from_numpy(tot_v / div).float(),
                         torch.from_numpy(tot_i / div).float() if want_i else None,
                         delay_steps=0, n_spikes=n_used, info=info)


# ---------------------------------------------------------------------------------------------------------
# CLI: lfdeep-neuron waveform
# ---------------------------------------------------------------------------------------------------------
def configure_parser(p) -> None:
    from lfdeep_neuron.surrogate.checkpoint import checkpoint_argument

    p.add_argument("--model", required=True, type=checkpoint_argument, metavar="CKPT",
                   help="surrogate checkpoint (.pt, or a pointer file such as models/DEFAULT: the checkpoint "
                        "it names is written)")
    p.add_argument("--data", required=True, help="dataset directory (sim_*.h5 records)")
    p.add_argument("--split", default="train", choices=("train", "val", "test", "all"),
                   help="simulations to fit on (default train)")
    p.add_argument("--max-sims", type=int, default=None, help="use at most this many simulations (default: all)")
    p.add_argument("--kernel-ms", type=int, default=10, help="waveform length K in 1-ms steps (default 10)")
    p.add_argument("--baseline-ms", type=int, default=0,
                   help="subtract the mean residual of this many steps before each spike (default 0: none)")
    p.add_argument("--out", default=None, help="checkpoint to write (default: --model, in place, atomically)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate, write_spike_waveform

    if args.kernel_ms < 1:
        raise InputError(f"--kernel-ms must be >= 1, got {args.kernel_ms}")
    if args.max_sims is not None and args.max_sims < 1:
        raise InputError(f"--max-sims must be >= 1, got {args.max_sims}")
    if args.baseline_ms < 0:
        raise InputError(f"--baseline-ms must be >= 0, got {args.baseline_ms}")
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    model = load_surrogate(args.model, map_location=args.device)
    fields = ("x_syn", "v", "spike") + (("imem",) if model.config.imem_tasks else ())
    sims = SimulationDataset(args.data, split=None if args.split == "all" else args.split, window_ms=None,
                             fields=fields)
    if sims.n_segments != model.n_segments:
        raise InputError(f"{args.data}: records have {sims.n_segments} segments; {args.model} predicts "
                         f"{model.n_segments}")
    wf = fit_spike_waveform(model, sims, kernel_ms=args.kernel_ms, max_sims=args.max_sims,
                            baseline_ms=args.baseline_ms, device=args.device, progress=not args.no_progress)
    wf.info["checkpoint"] = str(args.model)
    out = write_spike_waveform(args.model, wf, out=args.out)
    print(f"wrote {out}: {wf.n_spikes} spikes used, soma kernel peak {wf.soma_peak_mV:+.1f} mV "
          f"(K = {wf.kernel_ms} ms{', with currents' if wf.kernel_i_nA is not None else ''})")
    return 0
