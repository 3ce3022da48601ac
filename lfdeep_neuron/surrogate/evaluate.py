"""Score a surrogate on held-out simulations: ``lfdeep-neuron evaluate``.

    lfdeep-neuron evaluate --model models/mmoe.pt --data /data/hay_v1 [--split test] [--out eval/] [--max-sims 8]

For every simulation of the split (whole simulations, not windows), with v[:, 0] (t = 0) as the initial state:

* **teacher-forced** (the paper's metric): one full pass with the true voltages of step k-1 as feedback
  -> voltages at k = 1 .. T-1;
* **closed loop** (what co-simulation does): the streamer fed its own predictions
  (:func:`lfdeep_neuron.surrogate.stream.closed_loop`), from the true state at t = 0.

Reported (``OUT/summary.json``; ``OUT/per_segment.csv``; figures ``OUT/*.png``):

* voltage RMSE (mV, point samples ``v_1ms``) per segment, per anatomical group
  (:func:`~.metrics.segment_groups`: soma, basal, apical trunk, oblique, tuft, axon) and over all segments,
  pooled over simulations (segments weighted equally), teacher-forced and closed loop; per simulation; and the
  somatic RMSE with both traces clipped at -55 mV (:data:`SOMA_CLIP_MV`, the NeuronIO convention), each next to
  a constant (train-mean) baseline;
* somatic spikes: AUC of the per-step spike logit against the per-bin spike indicator, and its true positive
  rate at a false positive rate of 1e-3 per bin (:func:`~.metrics.spike_tpr_at_fpr`); with a threshold
  calibrated on the validation split (maximum pooled Γ, :func:`~.metrics.calibrate_threshold`; for models
  with spike history, whose logits depend on the threshold, :func:`calibrate_streamed_threshold`; or
  ``--spike-threshold``): spike counts, count error, coincidence factor Γ (±2 ms, Kistler et al. 1997);
  a predicted spike of step k is placed at k - 0.5 ms (:data:`~.metrics.SPIKE_OFFSET_MS`);
* MMoE / MMoEEx: the experts' pairwise distance matrix on the first test simulation (teacher-forced inputs),
  its mean, determinant and permanent (:func:`~.metrics.diversity_metrics`);
* ``metrics_for_checkpoint``: flat numbers (``spike_threshold_logit`` included) that ``--update-checkpoint``
  merges into the checkpoint's ``metrics`` (the co-simulation and ``rollout`` read the threshold there).

Figures: ``heatmaps.png`` (segments x time: NEURON, closed-loop surrogate, error; the paper's Fig. 1B/C),
``group_errors.png`` (per-segment RMSE by group, box + points, teacher-forced and closed loop),
``soma_trace.png`` (somatic voltage, NEURON vs surrogate, with spikes; spike logit and threshold), ``raster.png``
(somatic spikes of every scored simulation, NEURON's above the closed-loop surrogate's).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lfdeep_neuron.surrogate.metrics import (CALIBRATION_CRITERIA, GROUPS, SOMA_CLIP_MV, SPIKE_OFFSET_MS,
                                             calibrate_threshold, calibration_key, check_calibration_criterion,
                                             diversity_metrics, group_labels, pooled_spike_metrics, rmse_by_group,
                                             segment_groups, spike_auc, spike_tpr_at_fpr, spikes_from_logits,
                                             sq_err_per_segment)

__all__ = ["configure_parser", "run", "evaluate", "simulate_split", "calibrate_streamed_threshold",
           "streamed_spike_trains", "expert_outputs", "write_figures", "update_checkpoint_metrics", "sims_in_batches"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    from lfdeep_neuron.surrogate.checkpoint import checkpoint_argument

    p.add_argument("--model", required=True, type=checkpoint_argument, metavar="CKPT",
                   help="surrogate checkpoint (.pt, or a pointer file such as models/DEFAULT)")
    p.add_argument("--data", required=True, help="dataset directory (records + meta.json)")
    p.add_argument("--split", default="test", help="split to score (train, val, test)")
    p.add_argument("--val-split", default="val", help="split used to calibrate the spike threshold ('none': skip)")
    p.add_argument("--out", default=None, help="output directory (default: CKPT stem + '_eval' next to the model)")
    p.add_argument("--max-sims", type=int, default=None, help="score at most N simulations of the split (default: all)")
    p.add_argument("--max-val-sims", type=int, default=None,
                   help="calibrate on at most N validation simulations (default: all)")
    p.add_argument("--spike-threshold", type=float, default=None,
                   help="use this spike-logit threshold, no calibration (default: calibrate on --val-split)")
    p.add_argument("--calibrate", choices=tuple(CALIBRATION_CRITERIA), default="gamma",
                   help="threshold criterion on the validation split: 'gamma' maximises Γ, 'count' matches the "
                        "true spike count")
    p.add_argument("--window-ms", type=float, default=2.0, help="coincidence window ±Δ for Γ (ms)")
    p.add_argument("--batch", type=int, default=2, help="simulations per batch")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-figures", action="store_true", help="write no figures, only the numbers")
    p.add_argument("--update-checkpoint", action="store_true",
                   help="merge metrics_for_checkpoint (incl. spike_threshold_logit) into the checkpoint's metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    model = load_surrogate(args.model, map_location=args.device)
    fields = ("x_syn", "v", "spike")
    test_ds = SimulationDataset(args.data, split=args.split, window_ms=None, fields=fields)
    val_ds = None
    if args.spike_threshold is None and args.val_split.lower() != "none":
        try:
            val_ds = SimulationDataset(args.data, split=args.val_split, window_ms=None, fields=fields)
        except ValueError as err:   # an empty split: no calibration
            print(f"no spike-threshold calibration: {err}")
    out = Path(args.out) if args.out else Path(args.model).with_name(Path(args.model).stem + "_eval")
    summary, arrays = evaluate(model, test_ds, val_ds, max_sims=args.max_sims, max_val_sims=args.max_val_sims,
                               device=args.device, batch=args.batch, spike_threshold=args.spike_threshold,
                               window_ms=args.window_ms, progress=not args.no_progress, criterion=args.calibrate)
    write_outputs(out, summary, arrays, figures=not args.no_figures)
    if args.update_checkpoint:
        update_checkpoint_metrics(args.model, summary["metrics_for_checkpoint"])
    _print_summary(summary, out)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Running the model over whole simulations
# ---------------------------------------------------------------------------------------------------------
def sims_in_batches(ds, n_sims: int, batch: int):
    """The first ``n_sims`` whole simulations of ``ds`` (``window_ms=None``), consecutive ones of equal length
    up to ``batch`` at a time: yields (positions, dict of stacked ``x_syn``, ``v``, ``spike`` tensors)."""
    pos = list(range(n_sims))
    i = 0
    while i < len(pos):
        T = ds.records[pos[i]].n_steps
        group = [pos[i]]
        while len(group) < batch and i + len(group) < len(pos) and ds.records[pos[i + len(group)]].n_steps == T:
            group.append(pos[i + len(group)])
        items = [ds[p] for p in group]
        yield group, {k: torch.stack([it[k] for it in items]) for k in ("x_syn", "v", "spike")}
        i += len(group)


def clipped_soma_sse(pred_mV: np.ndarray, true_mV: np.ndarray, clip_mV: float = SOMA_CLIP_MV) -> float:
    """Sum of squared differences of two somatic traces, both clipped from above at ``clip_mV`` (mV²)."""
    d = np.minimum(np.asarray(pred_mV, np.float64), clip_mV) - np.minimum(np.asarray(true_mV, np.float64), clip_mV)
    return float(np.sum(d * d))


@torch.no_grad()
def simulate_split(model, ds, max_sims=None, device="cpu", batch: int = 2, teacher_forced: bool = True,
                   progress: bool = False, on_batch=None, spike_threshold: float | None = None) -> list[dict]:
    """Run the model over whole simulations of a :class:`SimulationDataset` (``window_ms=None``).

    Returns one dict per simulation: ``index`` (simulation index), ``T``, ``spike_times_ms`` (NEURON),
    ``spike`` [T-1] indicator of steps 1..T-1, ``logit_cl`` [T-1], ``sse_cl`` [S] (squared error sums, mV²),
    and with ``teacher_forced`` ``logit_tf``, ``sse_tf``. ``on_batch(positions, batch, v_tf, v_cl, logits)``
    is called for every batch (e.g. to keep traces for figures).

    With ``spike_threshold`` and a model whose checkpoint carries a spike waveform
    (``model.meta['spike_waveform']``, :mod:`~lfdeep_neuron.surrogate.waveform`), the closed-loop voltages get
    the action potential added at every predicted spike (upward crossing of the threshold), as the engine
    and ``rollout`` do: what a co-simulation records.
    """
    from lfdeep_neuron.surrogate.stream import closed_loop

    if ds.window_ms is not None:
        raise ValueError("simulate_split needs whole simulations: a SimulationDataset with window_ms=None")
    model = model.eval().to(device)
    waveform = (getattr(model, "meta", None) or {}).get("spike_waveform")
    v_mean = model.v_mean.detach().cpu().numpy().astype(np.float64)[:, None]
    n = len(ds.records) if max_sims is None else min(int(max_sims), len(ds.records))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"evaluate {ds.split}", unit="sim")
    out = []
    for positions, b in sims_in_batches(ds, n, batch):
        x = b["x_syn"].to(device)
        v = b["v"].to(device)
        v_true = v[..., 1:]
        cl = closed_loop(model, x[..., 1:], v0_mV=v[..., 0], output="mV", device=device,
                         spike_threshold=spike_threshold)
        v_cl = cl.v.float()
        if waveform is not None and spike_threshold is not None:
            v_cl, _ = waveform.apply(v_cl, cl.spiked)
        sse_cl = [sq_err_per_segment(v_cl[i].cpu().numpy(), v_true[i].cpu().numpy())[0] for i in range(len(positions))]
        v_tf = logit_tf = None
        if teacher_forced:
            tf = model(model.make_inputs(x[..., 1:], v[..., :-1], b["spike"][..., :-1].to(device)))
            v_tf, logit_tf = model.to_mV(tf.v).float(), tf.spike_logit.float()
        for i, p in enumerate(positions):
            r = ds.records[p]
            soma_true = v_true[i, 0].cpu().numpy()
            d = {"index": int(r.index), "T": int(r.n_steps), "spike_times_ms": np.asarray(r.spike_times_ms),
                 "spike": b["spike"][i, 1:].numpy(), "logit_cl": cl.spike_logit[i].float().cpu().numpy(),
                 "sse_cl": sse_cl[i],
                 "sse_base": ((v_true[i].cpu().numpy().astype(np.float64) - v_mean) ** 2).sum(axis=1),
                 "soma_clip_sse_cl": clipped_soma_sse(v_cl[i, 0].cpu().numpy(), soma_true),
                 "soma_clip_sse_base": clipped_soma_sse(np.full_like(soma_true, v_mean[0, 0]), soma_true)}
            if teacher_forced:
                d["logit_tf"] = logit_tf[i].cpu().numpy()
                d["sse_tf"] = sq_err_per_segment(v_tf[i].cpu().numpy(), v_true[i].cpu().numpy())[0]
                d["soma_clip_sse_tf"] = clipped_soma_sse(v_tf[i, 0].cpu().numpy(), soma_true)
            out.append(d)
        if on_batch is not None:
            on_batch(positions, b, v_tf, v_cl, (logit_tf, cl.spike_logit))
        if bar is not None:
            bar.update(len(positions))
    if bar is not None:
        bar.close()
    return out


@torch.no_grad()
def streamed_spike_trains(model, ds, n_sims: int, thresholds, device="cpu", cells: int = 48,
                          bar=None) -> tuple[list, list, list]:
    """Closed-loop spike trains of the first ``n_sims`` simulations of ``ds`` at each of ``thresholds``: one
    run per threshold (a model with spike history reads the spikes it emits). Simulations are replicated over
    thresholds and streamed ``cells`` at a time.

    Returns ``(pred, true, durations_ms)``: ``pred[k][i]`` the spike times (ms) of simulation i at threshold
    k, ``true[i]`` NEURON's, ``durations_ms[i]``."""
    from lfdeep_neuron.surrogate.stream import Streamer

    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    K = len(thresholds)
    pred = [[None] * n_sims for _ in range(K)]
    true, durations = [None] * n_sims, [None] * n_sims
    for positions, b in sims_in_batches(ds, n_sims, max(1, cells // K)):
        B = len(positions)
        x = b["x_syn"].to(device)
        thr = torch.as_tensor(np.repeat(thresholds, B), dtype=torch.float32)     # cells threshold-major
        st = Streamer(model, K * B, device=device, v0_mV=b["v"][..., 0].repeat(K, 1), spike_threshold=thr)
        spiked = torch.empty(K * B, x.shape[-1] - 1, dtype=torch.bool, device=st.device)
        for t in range(1, x.shape[-1]):                                # one step of all copies at a time
            spiked[:, t - 1] = st.step(x[..., t].repeat(K, 1)).spiked
        spiked = spiked.cpu().numpy()                                  # one transfer per batch, not per step
        for j, p in enumerate(positions):
            r = ds.records[p]
            true[p], durations[p] = np.asarray(r.spike_times_ms), int(r.n_steps)
            for k in range(K):
                pred[k][p] = np.flatnonzero(spiked[k * B + j]) + 1 - SPIKE_OFFSET_MS   # column i = step i + 1
        if bar is not None:
            bar.update(B * K)
    return pred, true, durations


@torch.no_grad()
def calibrate_streamed_threshold(model, ds, max_sims=None, device="cpu", window_ms: float = 2.0,
                                 n_candidates: int = 12, rounds: int = 2, cells: int = 48,
                                 progress: bool = False, criterion: str = "gamma") -> dict:
    """Spike threshold of maximum pooled Γ for a model that reads its own spikes (``config.spike_history``);
    ``criterion='count'``: the one whose spike count is closest to the true count (:func:`~.metrics.calibration_key`).

    Its logits depend on the threshold (emitted spikes are inputs), so every candidate needs its own
    closed-loop run: round 1 takes ``n_candidates`` thresholds whose spike counts, in a run that emits
    none, span 1/4 to 4 times the true count; each further round tries ``n_candidates`` thresholds evenly
    between the best one's neighbours. Ties in Γ go to the spike count closest to the true one.

    Returns dict ``threshold``, ``gamma``, ``n_pred``, ``n_true``, ``n_candidates``, ``tried`` (list of
    [threshold, Γ, predicted spikes]), ``sim_indices``.
    """
    from lfdeep_neuron.surrogate.stream import closed_loop

    check_calibration_criterion(criterion)                 # an unknown criterion fails before any work
    model = model.eval().to(device)
    n = len(ds.records) if max_sims is None else min(int(max_sims), len(ds.records))
    if n == 0:
        raise ValueError(f"calibrate_streamed_threshold: split {ds.split!r} has no simulations")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * (1 + n_candidates * rounds), desc=f"calibrate {ds.split} (streamed)", unit="run")
    # round 0: one run without spikes (logits only) -> candidate thresholds by the spike counts they would give
    logits = []
    for positions, b in sims_in_batches(ds, n, 4):
        cl = closed_loop(model, b["x_syn"][..., 1:], v0_mV=b["v"][..., 0], device=device,
                         spike_threshold=float("inf"), voltages=False)
        logits += list(cl.spike_logit.float().cpu().numpy())
        if bar is not None:
            bar.update(len(positions))
    n_true = int(sum(r.spike_times_ms.size for r in ds.records[:n]))
    top = np.unique(np.concatenate(logits))[::-1][:max(8, 8 * n_true + 8)]
    grid = (top[:-1] + top[1:]) / 2 if top.size > 1 else top + 1.0
    counts = np.array([sum(spikes_from_logits(l, t).size for l in logits) for t in grid])
    targets = max(n_true, 1) * np.geomspace(0.25, 4.0, n_candidates)
    cands = np.unique(grid[[int(np.argmin(np.abs(counts - c))) for c in targets]])
    tried: dict[float, dict] = {}
    for _ in range(rounds):
        new = np.array([c for c in cands if float(c) not in tried])
        if new.size:
            pred, true, dur = streamed_spike_trains(model, ds, n, new, device, cells, bar)
            for c, trains in zip(new, pred):
                tried[float(c)] = pooled_spike_metrics(trains, true, dur, window_ms)
        order = sorted(tried)
        key = lambda t: calibration_key(tried[t]["gamma"], tried[t]["n_pred"], n_true, criterion)  # noqa: E731
        best = max(order, key=key)
        i = order.index(best)
        lo = order[i - 1] if i > 0 else best - 1.0
        hi = order[i + 1] if i + 1 < len(order) else best + 1.0
        cands = np.linspace(lo, hi, n_candidates + 2)[1:-1]
    if bar is not None:
        bar.close()
    m = tried[best]
    return {"threshold": float(best), "gamma": m["gamma"], "n_pred": m["n_pred"], "n_true": n_true,
            "n_candidates": len(tried), "tried": [[t, tried[t]["gamma"], tried[t]["n_pred"]] for t in sorted(tried)],
            "method": "streamed: one closed-loop run per candidate (spike history)", "criterion": criterion,
            "sim_indices": [int(r.index) for r in ds.records[:n]]}


@torch.no_grad()
def expert_outputs(model, x: torch.Tensor) -> torch.Tensor | None:
    """Outputs of the experts of an MMoE / MMoEEx on a model input ``x [B, n_inputs, T]``: ``[E, B, C, T]``.

    None for models without experts (MH)."""
    if not hasattr(model, "experts") or not hasattr(model, "n_experts"):
        return None
    f = model.experts(model.backbone_inputs(x))                    # [B, E*C, T], expert-major channels
    B, _, T = f.shape
    return f.view(B, model.n_experts, model.expert_width, T).transpose(0, 1)


def evaluate(model, test_ds, val_ds=None, max_sims=None, max_val_sims=None, device="cpu", batch: int = 2,
             spike_threshold: float | None = None, window_ms: float = 2.0, progress: bool = False,
             figure_sim: int | None = None, criterion: str = "gamma") -> tuple[dict, dict]:
    """Score ``model`` on whole simulations of ``test_ds``; calibrate the spike threshold on ``val_ds``.

    Parameters
    ----------
    model : Surrogate
        With normalisation (e.g. from :func:`~lfdeep_neuron.surrogate.checkpoint.load_surrogate`).
    test_ds, val_ds : SimulationDataset
        ``window_ms=None``, fields ``x_syn``, ``v``, ``spike``. ``val_ds`` None: threshold = ``spike_threshold``,
        else the checkpoint's ``metrics['spike_threshold_logit']``, else 0.
    spike_threshold : float, optional
        Fixed logit threshold (skips calibration).
    criterion : {'gamma', 'count'}
        Calibration criterion (:func:`~lfdeep_neuron.surrogate.metrics.calibration_key`): maximum Γ, or the
        spike count closest to the true one.
    figure_sim : int, optional
        Position (within the scored simulations) of the one whose traces are kept for the figures; default:
        the one with the most somatic spikes in NEURON (the first on ties), so the soma figure shows spikes.

    Returns
    -------
    (summary, arrays)
        ``summary``: JSON-ready dict (see the module docstring). ``arrays``: per-segment RMSE, group labels and
        the traces of simulation ``figure_sim`` for :func:`write_figures`.
    """
    t0 = time.time()
    segs = test_ds.segments
    names = [str(n) for n in segs["name"]]
    groups = segment_groups(segs)
    labels = group_labels(segs)

    # -- spike threshold ------------------------------------------------------------------------------
    calibration = None
    rule = check_calibration_criterion(criterion)          # an unknown criterion fails before any work
    if spike_threshold is not None:
        thr, thr_source = float(spike_threshold), "given"
    elif val_ds is not None and model.config.spike_history:     # emitted spikes feed back: a run per candidate
        calibration = calibrate_streamed_threshold(model, val_ds, max_val_sims, device, window_ms,
                                                   progress=progress, criterion=criterion)
        thr, thr_source = calibration["threshold"], f"calibrated on split {val_ds.split!r} (closed loop, {rule})"
    elif val_ds is not None:
        val = simulate_split(model, val_ds, max_val_sims, device, batch, teacher_forced=False, progress=progress)
        calibration = calibrate_threshold([r["logit_cl"] for r in val], [r["spike_times_ms"] for r in val],
                                          [r["T"] for r in val], window_ms, first_step=1, criterion=criterion)
        calibration["sim_indices"] = [r["index"] for r in val]
        thr, thr_source = calibration["threshold"], f"calibrated on split {val_ds.split!r} (closed loop, {rule})"
    else:
        from lfdeep_neuron.surrogate.rollout import default_threshold
        thr, thr_source = default_threshold(model), "checkpoint metrics (or 0)"

    # -- test simulations -----------------------------------------------------------------------------
    if figure_sim is None:
        n_scored = len(test_ds.records) if max_sims is None else min(int(max_sims), len(test_ds.records))
        counts = [r.spike_times_ms.size for r in test_ds.records[:n_scored]]
        figure_sim = int(np.argmax(counts)) if counts else 0
    keep = {}

    def on_batch(positions, b, v_tf, v_cl, logits):
        if figure_sim in positions and not keep:
            i = positions.index(figure_sim)
            keep.update(v_true=b["v"][i].numpy(), v_cl=v_cl[i].cpu().numpy(), v_tf=v_tf[i].cpu().numpy(),
                        logit_cl=logits[1][i].float().cpu().numpy(), logit_tf=logits[0][i].cpu().numpy())
            x_tf = model.make_inputs(b["x_syn"][i:i + 1, :, 1:].to(device), b["v"][i:i + 1, :, :-1].to(device),
                                     b["spike"][i:i + 1, :-1].to(device))
            f = expert_outputs(model, x_tf)
            keep["experts"] = None if f is None else f.cpu().numpy()

    sims = simulate_split(model, test_ds, max_sims, device, batch, teacher_forced=True, progress=progress,
                          on_batch=on_batch, spike_threshold=thr)
    n_per_seg = sum(r["T"] - 1 for r in sims)
    mse_tf = sum(r["sse_tf"] for r in sims) / n_per_seg
    mse_cl = sum(r["sse_cl"] for r in sims) / n_per_seg
    rmse_tf = rmse_by_group(mse_tf, groups)
    rmse_cl = rmse_by_group(mse_cl, groups)
    rmse_base = rmse_by_group(sum(r["sse_base"] for r in sims) / n_per_seg, groups)
    soma_clip = {key: float(np.sqrt(sum(r[f"soma_clip_sse_{key}"] for r in sims) / n_per_seg))
                 for key in ("cl", "tf", "base")}

    true_trains = [r["spike_times_ms"] for r in sims]
    durations = [r["T"] for r in sims]
    spikes = {"threshold_logit": thr, "threshold_source": thr_source, "calibration": calibration,
              "time_rule": "upward threshold crossing at step k -> spike at k - 0.5 ms", "window_ms": window_ms}
    for mode in ("tf", "cl"):
        lg = [r[f"logit_{mode}"] for r in sims]
        pooled, spike_bins = np.concatenate(lg), np.concatenate([r["spike"] for r in sims])
        spikes[f"auc_{mode}"] = spike_auc(pooled, spike_bins)
        spikes[f"tpr_at_fpr1e-3_{mode}"] = spike_tpr_at_fpr(pooled, spike_bins, 1e-3)
        pred = [spikes_from_logits(l, thr, first_step=1) for l in lg]
        spikes["closed_loop" if mode == "cl" else "teacher_forced"] = pooled_spike_metrics(
            pred, true_trains, durations, window_ms)

    experts = diversity_metrics(keep["experts"]) if keep.get("experts") is not None else None
    cfg = model.config.to_dict()
    meta = getattr(model, "meta", {}) or {}
    cl_sp = spikes["closed_loop"]
    flat = {
        "test_rmse_mV_tf": rmse_tf["all"], "test_rmse_mV_cl": rmse_cl["all"],
        "test_rmse_mV_baseline": rmse_base["all"],
        "test_soma_clipped_rmse_mV_cl": soma_clip["cl"], "test_soma_clipped_rmse_mV_tf": soma_clip["tf"],
        "test_soma_clipped_rmse_mV_baseline": soma_clip["base"],
        **{f"test_{g}_rmse_mV_tf": rmse_tf[g] for g in GROUPS if g in rmse_tf},
        **{f"test_{g}_rmse_mV_cl": rmse_cl[g] for g in GROUPS if g in rmse_cl},
        "spike_threshold_logit": thr, "spike_auc_tf": spikes["auc_tf"], "spike_auc_cl": spikes["auc_cl"],
        "spike_tpr_at_fpr1e-3_cl": spikes["tpr_at_fpr1e-3_cl"],
        "spike_gamma_cl": cl_sp["gamma"], "spike_count_error_rel_cl": cl_sp["count_error_rel"],
        "spike_gamma_tf": spikes["teacher_forced"]["gamma"],
        "test_sims": [r["index"] for r in sims], "test_simulated_ms": int(sum(durations)),
    }
    if experts is not None:
        flat.update({"expert_diversity_mean": experts["mean"], "expert_diversity_det": experts["determinant"],
                     "expert_diversity_perm": experts["permanent"]})
    summary = {   # receptive_field_ms -1: unbounded (recurrent)
        "model": {"path": meta.get("path"), "arch": getattr(model, "arch", None), "config": cfg,
                  "parameters": int(model.num_parameters()), "receptive_field_ms": int(model.receptive_field)},
        "data": {"root": str(getattr(test_ds, "root", "")), "split": test_ds.split, "n_sims": len(sims),
                 "sim_indices": [r["index"] for r in sims], "durations_ms": durations,
                 "n_segments": len(names), "group_sizes": {g: int(len(i)) for g, i in groups.items()}},
        "voltage": {
            "unit": "mV (RMSE of point samples v_1ms, steps 1..T-1, segments weighted equally)",
            "teacher_forced": rmse_tf, "closed_loop": rmse_cl,
            "baseline_train_mean": rmse_base,
            "baseline_note": "a constant prediction: each segment's mean voltage over the train split",
            "soma_clipped_rmse_mV": {"closed_loop": soma_clip["cl"], "teacher_forced": soma_clip["tf"],
                                     "baseline_train_mean": soma_clip["base"], "clip_mV": SOMA_CLIP_MV},
            "per_sim_rmse_mV_tf": [float(np.sqrt(r["sse_tf"].mean() / (r["T"] - 1))) for r in sims],
            "per_sim_rmse_mV_cl": [float(np.sqrt(r["sse_cl"].mean() / (r["T"] - 1))) for r in sims],
        },
        "spikes": spikes,
        "spike_waveform": "added to the closed-loop voltages at predicted spikes"
                          if (getattr(model, "meta", None) or {}).get("spike_waveform") is not None else "none",
        "experts": experts,
        "metrics_for_checkpoint": flat,
        "wall_s": time.time() - t0,
    }
    arrays = {"names": np.array(names), "groups": labels, "rmse_tf": np.sqrt(mse_tf), "rmse_cl": np.sqrt(mse_cl),
              "threshold": thr, "figure_sim": sims[figure_sim]["index"] if figure_sim < len(sims) else None,
              "spike_times_ms": true_trains[figure_sim] if figure_sim < len(sims) else None,
              "raster_true_ms": true_trains,
              "raster_pred_ms": [spikes_from_logits(r["logit_cl"], thr, first_step=1) for r in sims],
              "raster_sims": [r["index"] for r in sims], **keep}
    return summary, arrays


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def _json_ready(obj):
    """NaN/inf -> None, numpy -> Python (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(out, summary: dict, arrays: dict, figures: bool = True) -> Path:
    """``summary.json``, ``per_segment.csv`` and (``figures``) the PNGs into directory ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_json_ready(summary), indent=1) + "\n")
    with open(out / "per_segment.csv", "w") as fh:
        fh.write("segment,name,group,rmse_mV_tf,rmse_mV_cl\n")
        for i, (n, g, a, b) in enumerate(zip(arrays["names"], arrays["groups"], arrays["rmse_tf"], arrays["rmse_cl"])):
            fh.write(f"{i},{n},{g},{a:.6g},{b:.6g}\n")
    if figures:
        write_figures(out, summary, arrays)
    return out


def write_figures(out, summary: dict, arrays: dict) -> list[Path]:
    """heatmaps.png, group_errors.png, soma_trace.png (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    sim = arrays.get("figure_sim")
    arch = summary["model"]["arch"]

    # per-group errors: box + jittered points per group, teacher-forced and closed loop side by side
    present = [g for g in GROUPS if np.any(arrays["groups"] == g)]
    fig, ax = plt.subplots(figsize=(8, 4))
    rng = np.random.default_rng(0)
    for j, (key, color, label) in enumerate((("rmse_tf", "tab:blue", "teacher-forced"),
                                             ("rmse_cl", "tab:red", "closed loop"))):
        data = [arrays[key][arrays["groups"] == g] for g in present]
        pos = np.arange(len(present)) * 3 + j
        ax.boxplot(data, positions=pos, widths=0.8, showfliers=False,
                   medianprops=dict(color=color), boxprops=dict(color=color), whiskerprops=dict(color=color),
                   capprops=dict(color=color))
        for p, d in zip(pos, data):
            ax.scatter(p + rng.uniform(-0.3, 0.3, d.size), d, s=4, color=color, alpha=0.4,
                       label=label if p == pos[0] else None)
    ax.set_xticks(np.arange(len(present)) * 3 + 0.5)
    ax.set_xticklabels([f"{g}\n(n={int(np.sum(arrays['groups'] == g))})" for g in present])
    ax.set_ylabel("RMSE per segment (mV)")
    ax.set_title(f"{arch}: voltage error by group ({summary['data']['n_sims']} {summary['data']['split']} sims)")
    ax.legend(loc="upper left", markerscale=3)
    fig.tight_layout()
    paths.append(out / "group_errors.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if arrays.get("raster_true_ms") is not None:
        paths.append(_raster_figure(out / "raster.png", arrays, arch, summary))
    if "v_true" not in arrays:
        return paths
    v_true = arrays["v_true"][:, 1:]
    v_cl = arrays["v_cl"]
    t = np.arange(1, v_true.shape[1] + 1)

    # heatmaps: segments x time
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    lo, hi = np.percentile(v_true, [0.5, 99.5])
    extent = (t[0] - 0.5, t[-1] + 0.5, v_true.shape[0] - 0.5, -0.5)
    for ax, data, title in ((axes[0], v_true, "NEURON (ground truth)"), (axes[1], v_cl, "surrogate, closed loop")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        ax.set_title(f"{title}: simulation {sim}")
        ax.set_ylabel("segment")
        fig.colorbar(im, ax=ax, label="mV")
    err = np.abs(v_cl - v_true)
    im = axes[2].imshow(err, aspect="auto", cmap="magma", vmin=0, vmax=max(np.percentile(err, 99.5), 1e-6),
                        extent=extent, interpolation="nearest")
    axes[2].set_title("|error| (mV)")
    axes[2].set_ylabel("segment")
    axes[2].set_xlabel("time (ms)")
    fig.colorbar(im, ax=axes[2], label="mV")
    # section-type boundaries (soma | basal | apical | axon), labelled on the left
    kind = np.array([str(n).split("[")[0] for n in arrays["names"]])
    kind = np.where(kind == "dend", "basal", kind)
    edges = np.r_[0, np.flatnonzero(kind[1:] != kind[:-1]) + 1, kind.size]
    for ax in axes:
        for b in edges[1:-1]:
            ax.axhline(b - 0.5, color="w", lw=0.6, alpha=0.8)
        for a, b in zip(edges[:-1], edges[1:]):
            if b - a > 20:
                ax.text(t[0] + 0.01 * (t[-1] - t[0]), (a + b) / 2, kind[a], color="w", fontsize=7, va="center")
    fig.tight_layout()
    paths.append(out / "heatmaps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # soma trace with spikes + spike logit
    thr = arrays["threshold"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw=dict(height_ratios=(3, 1.3)))
    a1.plot(t, v_true[0], color="k", lw=1.0, label="NEURON")
    a1.plot(t, arrays["v_tf"][0], color="tab:blue", lw=0.8, alpha=0.8, label="surrogate, teacher-forced")
    a1.plot(t, v_cl[0], color="tab:red", lw=0.8, alpha=0.9, label="surrogate, closed loop")
    top = max(np.max(v_true[0]), np.max(v_cl[0])) + 5
    st = np.asarray(arrays.get("spike_times_ms", []))
    a1.plot(st, np.full(st.size, top + 4), "|", color="k", ms=10, mew=1.5, label="NEURON spikes")
    sp = spikes_from_logits(arrays["logit_cl"], thr, first_step=1)
    a1.plot(sp, np.full(sp.size, top), "|", color="tab:red", ms=10, mew=1.5, label="predicted spikes (closed loop)")
    a1.set_ylabel("soma v (mV)")
    a1.set_title(f"{arch}: soma, simulation {sim}")
    a1.legend(loc="upper left", fontsize=7, ncol=3)
    a2.plot(t, arrays["logit_tf"], color="tab:blue", lw=0.7, label="teacher-forced")
    a2.plot(t, arrays["logit_cl"], color="tab:red", lw=0.7, label="closed loop")
    a2.axhline(thr, color="gray", ls="--", lw=0.8, label=f"threshold {thr:.2f}")
    a2.set_ylabel("spike logit")
    a2.set_xlabel("time (ms)")
    a2.legend(loc="upper left", fontsize=7, ncol=3)
    fig.tight_layout()
    paths.append(out / "soma_trace.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _raster_figure(path: Path, arrays: dict, arch, summary: dict) -> Path:
    """Somatic spikes of every scored simulation: NEURON's (black) above the surrogate's closed-loop ones (red)."""
    import matplotlib.pyplot as plt

    trains_true, trains_pred = arrays["raster_true_ms"], arrays["raster_pred_ms"]
    n = len(trains_true)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * n))
    for k, (st, sp) in enumerate(zip(trains_true, trains_pred)):
        ax.plot(st, np.full(len(st), k + 0.18), "|", color="k", ms=6, mew=1.2, label="NEURON" if k == 0 else None)
        ax.plot(sp, np.full(len(sp), k - 0.18), "|", color="tab:red", ms=6, mew=1.2,
                label="surrogate (closed loop)" if k == 0 else None)
    ax.set_yticks(range(n))
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_yticklabels([str(i) for i in arrays["raster_sims"]], fontsize=7)
    ax.set_ylabel("simulation")
    ax.set_xlabel("time (ms)")
    g = summary["spikes"]["closed_loop"]
    ax.set_title(f"{arch}: somatic spikes, {summary['data']['split']} split (Γ = {g['gamma']:.2f}, "
                 f"{g.get('n_pred', '?')} predicted / {g.get('n_true', '?')} true)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def update_checkpoint_metrics(path, metrics: dict) -> None:
    """Merge ``metrics`` into the checkpoint's ``metrics`` dict (atomic rewrite; NaN stored as None)."""
    from lfdeep_neuron.surrogate.checkpoint import atomic_torch_save, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(path)                 # a pointer file: update the checkpoint it names
    ckpt = load_checkpoint(path)
    ckpt["metrics"] = {**(ckpt.get("metrics") or {}), **_json_ready(metrics)}
    atomic_torch_save(ckpt, path)


def _print_summary(summary: dict, out: Path) -> None:
    v, s = summary["voltage"], summary["spikes"]
    print(f"{summary['model']['arch']} on {summary['data']['n_sims']} {summary['data']['split']} simulations "
          f"({sum(summary['data']['durations_ms'])} ms):")
    print(f"  {'group':<14}{'teacher-forced':>16}{'closed loop':>14}{'constant':>10}   (RMSE, mV; constant = "
          f"train-mean voltage of each segment)")
    base = v.get("baseline_train_mean", {})
    for g in ("all",) + GROUPS:
        if g in v["teacher_forced"]:
            print(f"  {g:<14}{v['teacher_forced'][g]:>16.3f}{v['closed_loop'][g]:>14.3f}{base.get(g, float('nan')):>10.3f}")
    sc = v["soma_clipped_rmse_mV"]
    print(f"  {'soma <=' + format(sc['clip_mV'], 'g'):<14}{sc['teacher_forced']:>16.3f}{sc['closed_loop']:>14.3f}"
          f"{sc['baseline_train_mean']:>10.3f}   (soma clipped at {sc['clip_mV']:g} mV)")
    cl = s["closed_loop"]
    print(f"  spikes: AUC tf {s['auc_tf']:.3f} cl {s['auc_cl']:.3f} (TPR at FPR 1e-3 tf {s['tpr_at_fpr1e-3_tf']:.3f} "
          f"cl {s['tpr_at_fpr1e-3_cl']:.3f}); threshold {s['threshold_logit']:.3g} "
          f"({s['threshold_source']}); closed loop Γ {cl['gamma']:.3f}, {cl['n_pred']} predicted vs "
          f"{cl['n_true']} true")
    e = summary.get("experts")
    if e:
        print(f"  experts: mean distance {e['mean']:.3f}, det {e['determinant']:.3g}, perm {e['permanent']:.3g}")
    print(f"  wrote {out}/summary.json, per_segment.csv, figures")
