"""Accuracy metrics of a surrogate against NEURON: voltages, somatic spikes, expert diversity.

Pure numpy (and one torch helper for expert outputs); no I/O. Used by :mod:`.evaluate` and by anyone who
wants to score two records (NEURON's and the surrogate's ``rollout``) with the same code.

Voltages
    :func:`sq_err_per_segment` / :func:`rmse_per_segment` (mV), :func:`rmse_by_group` over the
    anatomical groups of :func:`segment_groups` (soma, basal, apical trunk, oblique, tuft, axon).
Spikes
    :func:`spikes_from_logits` (step k -> a spike at ``k - offset_ms``), :func:`spike_auc` (per-bin logit
    vs spike indicator, Mann-Whitney), :func:`coincidence_factor` (Kistler et al. 1997, +-2 ms),
    :func:`pooled_spike_metrics` over many simulations, :func:`calibrate_threshold`.
Experts (MMoE / MMoEEx)
    :func:`expert_distance_matrix`, :func:`diversity_metrics` (mean, determinant, permanent by Ryser's
    formula) of the pairwise distances between the experts' outputs.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["GROUPS", "segment_groups", "group_labels", "sq_err_per_segment", "rmse_per_segment", "rmse_by_group",
           "spikes_from_logits", "emitted_to_metric_times", "spike_onsets", "spike_auc", "spike_tpr_at_fpr", "match_spikes", "coincidence_factor",
           "pooled_spike_metrics",
           "calibrate_threshold", "calibration_key", "check_calibration_criterion", "CALIBRATION_CRITERIA",
           "default_spike_threshold", "permanent", "expert_distance_matrix", "diversity_metrics",
           "SPIKE_OFFSET_MS", "SOMA_CLIP_MV"]

#: Group names, in reporting order.
GROUPS = ("soma", "basal", "apical_trunk", "oblique", "tuft", "axon")
#: The somatic voltage is compared (and trained) clipped at this level; spikes are scored by the spike output,
#: as in the NeuronIO literature (Beniaguev et al. 2021; Spieler et al. 2024).
SOMA_CLIP_MV = -55.0
#: A spike predicted by step k (window (k-1, k] ms) is placed at k - SPIKE_OFFSET_MS (mid-window).
SPIKE_OFFSET_MS = 0.5


# ---------------------------------------------------------------------------------------------------------
# Segment groups
# ---------------------------------------------------------------------------------------------------------
def _str(a) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).tolist()])


def segment_groups(segments: dict, nexus_ratio: float = 0.3) -> dict[str, np.ndarray]:
    """Indices of the segments of each anatomical group.

    Groups: ``soma``, ``basal`` (``sec_type`` dend), ``axon``, and the apical tree split into
    ``apical_trunk``, ``oblique`` and ``tuft``. The trunk is found on the segment tree (``parent_seg``):
    start at the apical segment attached to the soma and follow, at every branch point, the child whose
    subtree has the largest membrane area; the walk stops at the first branch point (the *nexus*, the main
    bifurcation) where the second-largest child subtree has at least ``nexus_ratio`` of the largest one's
    area. ``tuft`` = every apical segment distal to the nexus, ``apical_trunk`` = the path walked,
    ``oblique`` = the other apical segments (side branches of the trunk). For the Hay cell (cell1) the nexus
    is the end of ``apic[36]`` at ~660 µm from the soma, the usual main bifurcation of that cell.

    Parameters
    ----------
    segments : dict
        Segment table with ``sec_type``, ``parent_seg`` and ``area_um2`` (``name`` is used for
        ``sec_type`` when that column is absent). Parents must precede children (canonical order).

    Returns
    -------
    dict name -> int64 index array (every group key of :data:`GROUPS` present, possibly empty).
    """
    if "sec_type" in segments:
        kind = _str(segments["sec_type"])
    else:
        kind = np.array([n.split("[")[0] for n in _str(segments["name"])])
    S = kind.size
    parent = np.asarray(segments.get("parent_seg", np.full(S, -1)), dtype=np.int64)
    area = np.asarray(segments.get("area_um2", np.ones(S)), dtype=np.float64)
    if parent.shape != (S,) or area.shape != (S,):
        raise ValueError("segment table columns parent_seg / area_um2 must have one entry per segment")
    if np.any(parent[1:] >= np.arange(1, S)):
        raise ValueError("segment table: parents must come before their children (canonical order)")
    kind = np.where(kind == "dend", "basal", kind)

    # subtree area (setup only: one pass in reverse topological order)
    sub = area.copy()
    for i in range(S - 1, 0, -1):
        if parent[i] >= 0:
            sub[parent[i]] += sub[i]
    children: list[list[int]] = [[] for _ in range(S)]
    for i in range(S):
        if parent[i] >= 0:
            children[parent[i]].append(i)

    is_apic = kind == "apic"
    label = kind.astype(object)
    label[is_apic] = "oblique"
    roots = [i for i in range(S) if is_apic[i] and (parent[i] < 0 or not is_apic[parent[i]])]
    if roots:
        root = max(roots, key=lambda i: sub[i])
        cur, path = root, [root]
        while children[cur]:
            ch = sorted(children[cur], key=lambda k: -sub[k])
            if len(ch) > 1 and sub[ch[1]] >= nexus_ratio * sub[ch[0]]:
                # nexus: everything below is tuft
                stack = list(ch)
                while stack:
                    k = stack.pop()
                    label[k] = "tuft"
                    stack.extend(children[k])
                break
            cur = ch[0]
            path.append(cur)
        label[path] = "apical_trunk"
    label = label.astype(str)
    out = {g: np.flatnonzero(label == g) for g in GROUPS}
    other = sorted(set(label) - set(GROUPS))
    for g in other:   # unknown section types keep their own group
        out[g] = np.flatnonzero(label == g)
    return out


def group_labels(segments: dict, **kw) -> np.ndarray:
    """Group name of every segment (``str [S]``); see :func:`segment_groups`."""
    groups = segment_groups(segments, **kw)
    S = sum(len(v) for v in groups.values())
    lab = np.empty(S, dtype=object)
    for g, idx in groups.items():
        lab[idx] = g
    return lab.astype(str)


# ---------------------------------------------------------------------------------------------------------
# Voltage errors
# ---------------------------------------------------------------------------------------------------------
def sq_err_per_segment(pred, true) -> tuple[np.ndarray, int]:
    """Sum of squared errors per segment and the number of samples per segment.

    ``pred``, ``true``: ``[S, T]`` or ``[B, S, T]`` (mV). Returns ``(sse [S] float64, n)``, for pooling
    over many simulations (RMSE = sqrt(sse / n)).
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and true {t.shape} differ in shape")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim != 3:
        raise ValueError(f"expected [S, T] or [B, S, T], got {p.shape}")
    d = p - t
    return np.einsum("bst,bst->s", d, d), p.shape[0] * p.shape[2]


def rmse_per_segment(pred, true) -> np.ndarray:
    """RMSE per segment (mV) over time (and batch): ``[S]``."""
    sse, n = sq_err_per_segment(pred, true)
    return np.sqrt(sse / n)


def rmse_by_group(mse_per_segment, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """RMSE of each group (and ``all``) from per-segment mean squared errors (mV²), segments weighted equally.

    Empty groups are left out.
    """
    mse = np.asarray(mse_per_segment, dtype=np.float64)
    out = {"all": float(np.sqrt(mse.mean()))}
    for g, idx in groups.items():
        if len(idx):
            out[g] = float(np.sqrt(mse[idx].mean()))
    return out


# ---------------------------------------------------------------------------------------------------------
# Spikes
# ---------------------------------------------------------------------------------------------------------
def default_spike_threshold(model) -> float:
    """A model's spike-logit threshold: the checkpoint's calibrated ``meta['metrics']['spike_threshold_logit']``
    (written by ``lfdeep-neuron evaluate --update-checkpoint``), else 0 (probability 1/2). The one default of the
    streamer, the co-simulation engine, ``rollout`` and ``evaluate``."""
    metrics = (getattr(model, "meta", None) or {}).get("metrics") or {}
    thr = metrics.get("spike_threshold_logit")
    return float(thr) if thr is not None else 0.0


def spike_onsets(above):
    """Upward crossings of a per-step boolean ``above [..., T]`` (numpy or torch, returned as the same): True
    where a run of True starts (the step before the first one counts as below)."""
    onset = above.clone() if hasattr(above, "clone") else above.copy()
    onset[..., 1:] &= ~above[..., :-1]
    return onset


def spikes_from_logits(logits, threshold: float, step_ms: float = 1.0, offset_ms: float = SPIKE_OFFSET_MS,
                       first_step: int = 0, rule: str = "crossing") -> np.ndarray:
    """Spike times (ms) from per-step spike logits.

    ``rule='crossing'`` (default): one spike per upward crossing of ``threshold`` -- a run of steps above it
    is one spike, at its first step (NetCon's rule for a voltage threshold; true spikes never fall in
    consecutive 1-ms bins). ``rule='level'``: a spike in every step above the threshold.
    Step k (``logits[i]`` with k = ``first_step + i``) covers ((k-1) dt, k dt]; its spike is placed at
    ``k * step_ms - offset_ms`` (default mid-window), so that ``ceil(time)`` gives k back (the binning of the
    dataset's spike indicator). The co-simulation engine applies the same rules.
    """
    lg = np.asarray(logits, dtype=np.float64).reshape(-1)
    above = lg > threshold
    if rule == "crossing":
        above = spike_onsets(above)
    elif rule != "level":
        raise ValueError(f"spike rule must be 'crossing' or 'level', got {rule!r}")
    k = np.flatnonzero(above) + int(first_step)
    return k * float(step_ms) - float(offset_ms)


def emitted_to_metric_times(t_emit_ms, dt_ms: float, step_ms: float = 1.0, t0_ms: float = 0.0,
                            offset_ms: float = SPIKE_OFFSET_MS) -> np.ndarray:
    """Spike times a co-simulation engine emitted -> the times ``rollout`` and the metrics use.

    The engine emits the spike of step k (window ((k-1)Δ, kΔ]) at ``t0 + kΔ + dt`` with NEURON's fixed step
    dt (``t0 + kΔ + dt/4`` under CVode: pass ``dt_ms/4``); ``rollout``, ``evaluate`` and
    :func:`spikes_from_logits` place it at ``kΔ - offset_ms``. Use this before comparing a network's
    surrogate spikes with a detailed cell's.

    Parameters
    ----------
    t_emit_ms : array
        Emission times (ms), e.g. from ``pc.spike_record`` or ``engine.spikes()``.
    dt_ms : float
        NEURON's time step of the run (the emission lag after the step boundary).
    """
    t = np.asarray(t_emit_ms, dtype=np.float64)
    k = np.rint((t - t0_ms - dt_ms) / step_ms)
    return k * step_ms - offset_ms


def spike_auc(logits, labels) -> float:
    """Area under the ROC curve of per-bin ``logits`` against 0/1 ``labels`` (ties count one half).

    Mann-Whitney statistic from average ranks; NaN when only one class is present.
    """
    from scipy.stats import rankdata

    s = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"logits {s.shape} and labels {y.shape} differ in size")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spike_tpr_at_fpr(logits, labels, fpr: float = 1e-3) -> float:
    """True positive rate of per-bin ``logits`` against 0/1 ``labels`` at the lowest threshold whose false
    positive rate is at most ``fpr`` (bins strictly above the threshold count as positive).

    The ROC point where Γ lives: at ~1 somatic spike per second and 1000 bins per second, a false positive rate
    of 1e-3 per bin is about as many false spikes as true ones, so two logits of very different AUC can have
    the same TPR there. NaN when only one class is present.
    """
    s = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"logits {s.shape} and labels {y.shape} differ in size")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    neg, pos = np.sort(s[~y])[::-1], s[y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    thr = neg[int(np.floor(fpr * neg.size))]     # at most floor(fpr * n_neg) negatives lie strictly above it
    return float((pos > thr).mean())


def match_spikes(pred_ms, true_ms, window_ms: float = 2.0) -> int:
    """Number of coincidences: pairs (predicted, true) within ``±window_ms``, each spike used at most once.

    Greedy in time order (optimal for one-dimensional interval matching).
    """
    p = np.sort(np.asarray(pred_ms, dtype=np.float64).reshape(-1))
    t = np.sort(np.asarray(true_ms, dtype=np.float64).reshape(-1))
    i = j = n = 0
    while i < p.size and j < t.size:   # spike trains: tens of spikes, not a hot path
        if p[i] < t[j] - window_ms:
            i += 1
        elif p[i] > t[j] + window_ms:
            j += 1
        else:
            n += 1
            i += 1
            j += 1
    return n


def coincidence_factor(pred_ms, true_ms, duration_ms: float, window_ms: float = 2.0) -> float:
    """Coincidence factor Γ of a predicted spike train against the true one (Kistler et al. 1997).

    Γ = (N_coinc - <N_coinc>) / (½ (N_true + N_pred)) / (1 - 2 ν Δ), with ν = N_pred / duration the
    predicted rate, Δ = ``window_ms`` and <N_coinc> = 2 ν Δ N_true the coincidences expected by chance
    from a Poisson train of rate ν. Γ = 1 for identical trains, ≈ 0 for chance agreement.
    NaN when both trains are empty.
    """
    n_p = int(np.size(pred_ms))
    n_t = int(np.size(true_ms))
    if n_p + n_t == 0:
        return float("nan")
    nu = n_p / float(duration_ms)
    expected = 2.0 * nu * window_ms * n_t
    norm = 1.0 - 2.0 * nu * window_ms
    n_c = match_spikes(pred_ms, true_ms, window_ms)
    return float((n_c - expected) / (0.5 * (n_t + n_p)) / norm)


def _concat_trains(trains, durations, gap_ms: float):
    """One long train from many simulations (each shifted after the previous one plus a gap)."""
    offs = np.concatenate([[0.0], np.cumsum(np.asarray(durations, dtype=np.float64) + gap_ms)[:-1]])
    parts = [np.asarray(t, dtype=np.float64).reshape(-1) + o for t, o in zip(trains, offs)]
    return (np.concatenate(parts) if parts else np.zeros(0)), float(np.sum(durations))


def pooled_spike_metrics(pred_trains, true_trains, durations_ms, window_ms: float = 2.0) -> dict:
    """Spike metrics pooled over simulations (trains in ms from each simulation's start).

    Returns ``gamma`` (Γ of the concatenated trains), ``gamma_mean`` (mean of the per-simulation Γ over
    simulations where it is defined), ``n_true``, ``n_pred``, ``n_coinc``, ``count_error`` (n_pred -
    n_true), ``count_error_rel`` ((n_pred - n_true) / n_true), ``count_abs_error_per_sim`` (mean |n_pred -
    n_true| per simulation), ``rate_true_hz``, ``rate_pred_hz``.
    """
    pred_all, dur = _concat_trains(pred_trains, durations_ms, gap_ms=10 * window_ms)
    true_all, _ = _concat_trains(true_trains, durations_ms, gap_ms=10 * window_ms)
    per_sim = [coincidence_factor(p, t, d, window_ms) for p, t, d in zip(pred_trains, true_trains, durations_ms)]
    n_p, n_t = pred_all.size, true_all.size
    counts = np.array([[np.size(p), np.size(t)] for p, t in zip(pred_trains, true_trains)]).reshape(-1, 2)
    defined = [g for g in per_sim if not math.isnan(g)]
    return {
        "gamma": coincidence_factor(pred_all, true_all, dur, window_ms),
        "gamma_mean": float(np.mean(defined)) if defined else float("nan"),
        "gamma_per_sim": per_sim,
        "n_true": int(n_t), "n_pred": int(n_p), "n_coinc": match_spikes(pred_all, true_all, window_ms),
        "count_error": int(n_p - n_t),
        "count_error_rel": float((n_p - n_t) / n_t) if n_t else float("nan"),
        "count_abs_error_per_sim": float(np.abs(counts[:, 0] - counts[:, 1]).mean()) if counts.size else 0.0,
        "rate_true_hz": 1000.0 * n_t / dur if dur else float("nan"),
        "rate_pred_hz": 1000.0 * n_p / dur if dur else float("nan"),
        "window_ms": float(window_ms),
    }


#: Criteria of the spike-threshold calibration, with how a report names them: ``gamma`` maximises the pooled Γ
#: (ties: the spike count closest to the true one); ``count`` matches the true spike count (ties: the higher Γ),
#: a smoother objective where Γ is flat over a wide range of thresholds.
CALIBRATION_CRITERIA = {"gamma": "max Γ", "count": "spike count matched"}


def check_calibration_criterion(criterion: str) -> str:
    """How a report names ``criterion``; ValueError when it is not one of :data:`CALIBRATION_CRITERIA`."""
    if criterion not in CALIBRATION_CRITERIA:
        raise ValueError(f"calibration criterion must be one of {tuple(CALIBRATION_CRITERIA)}, got {criterion!r}")
    return CALIBRATION_CRITERIA[criterion]


def calibration_key(gamma: float, n_pred: int, n_true: int, criterion: str = "gamma") -> tuple:
    """Sort key of a candidate threshold (larger is better) under ``criterion`` (:data:`CALIBRATION_CRITERIA`)."""
    check_calibration_criterion(criterion)
    g = gamma if not math.isnan(gamma) else -np.inf
    return (g, -abs(n_pred - n_true)) if criterion == "gamma" else (-abs(n_pred - n_true), g)


def calibrate_threshold(logits_list, true_trains, durations_ms, window_ms: float = 2.0, step_ms: float = 1.0,
                        offset_ms: float = SPIKE_OFFSET_MS, first_step: int = 0, max_candidates: int = 400,
                        criterion: str = "gamma") -> dict:
    """Spike-logit threshold that maximises the pooled Γ over simulations (validation split), or with
    ``criterion='count'`` the one whose spike count is closest to the true count (see :func:`calibration_key`).

    Candidates are midpoints between consecutive distinct values among the highest logits (enough of them
    to produce up to 4x the true spike count, capped at ``max_candidates``), plus one above the maximum
    (no spikes). Ties in Γ go to the threshold whose spike count is closest to the true count. Without any
    true spike, the threshold above every logit is returned (predicting no spikes).

    ``logits_list[i]`` holds steps ``first_step ..`` of simulation i (see :func:`spikes_from_logits`).

    Returns dict ``threshold``, ``gamma``, ``n_pred``, ``n_true``, ``n_candidates``.
    """
    lgs = [np.asarray(l, dtype=np.float64).reshape(-1) for l in logits_list]
    allv = np.concatenate(lgs) if lgs else np.zeros(0)
    n_true = int(sum(np.size(t) for t in true_trains))
    if allv.size == 0:
        raise ValueError("calibrate_threshold: no logits")
    check_calibration_criterion(criterion)                 # an unknown criterion fails before any work
    top = np.unique(allv)[::-1]
    top = top[:min(top.size, max(8, 4 * n_true + 8), max_candidates)]
    above = top[0] + 1.0
    cands = np.concatenate([[above], (top[:-1] + top[1:]) / 2]) if top.size > 1 else np.array([above])
    best = None
    if n_true == 0:
        return {"threshold": float(above), "gamma": float("nan"), "n_pred": 0, "n_true": 0,
                "n_candidates": int(cands.size)}
    for thr in cands:
        pred = [spikes_from_logits(l, thr, step_ms, offset_ms, first_step) for l in lgs]
        m = pooled_spike_metrics(pred, true_trains, durations_ms, window_ms)
        key = calibration_key(m["gamma"], m["n_pred"], n_true, criterion)
        if best is None or key > best[0]:
            best = (key, float(thr), m)
    _, thr, m = best
    return {"threshold": thr, "gamma": m["gamma"], "n_pred": m["n_pred"], "n_true": n_true,
            "n_candidates": int(cands.size), "criterion": criterion}


# ---------------------------------------------------------------------------------------------------------
# Expert diversity (MMoE / MMoEEx)
# ---------------------------------------------------------------------------------------------------------
def permanent(a) -> float:
    """Permanent of a square matrix by Ryser's formula, vectorised over all 2^n column subsets (n <= 20).

    perm(A) = (-1)^n Σ_{S ⊆ {1..n}} (-1)^{|S|} Π_i Σ_{j ∈ S} a_ij.
    """
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"permanent needs a square matrix, got {a.shape}")
    if n == 0:
        return 1.0
    if n > 20:
        raise ValueError(f"permanent: n = {n} too large for Ryser's formula (2^n subsets)")
    masks = ((np.arange(1, 2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.float64)  # [2^n - 1, n]
    row_sums = masks @ a.T                                                               # [subsets, n rows]
    sign = (-1.0) ** masks.sum(1)
    return float((-1) ** n * (sign * row_sums.prod(1)).sum())


def expert_distance_matrix(expert_out) -> np.ndarray:
    """Pairwise distance between experts' outputs: ``D[i, j]`` = RMS over samples and features of
    ``f_i - f_j``. ``expert_out``: ``[E, ...]`` (any trailing shape: samples, channels, time)."""
    f = np.asarray(expert_out, dtype=np.float64)
    E = f.shape[0]
    f = f.reshape(E, -1)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0) / f.shape[1]
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def diversity_metrics(expert_out) -> dict:
    """The paper's expert-diversity numbers from the experts' outputs ``[E, ...]``.

    ``distance`` (E x E, RMS distances), and of the distance matrix normalised to a maximum of 1
    (``distance_normalized``): ``mean`` (over off-diagonal pairs), ``determinant`` and ``permanent``
    (Ryser). Larger = more diverse experts. ``mean_raw`` is the off-diagonal mean before normalisation.
    """
    D = expert_distance_matrix(expert_out)
    E = D.shape[0]
    mx = D.max()
    Dn = D / mx if mx > 0 else D
    off = ~np.eye(E, dtype=bool)
    return {
        "n_experts": int(E),
        "distance": D.tolist(),
        "distance_normalized": Dn.tolist(),
        "mean_raw": float(D[off].mean()) if E > 1 else 0.0,
        "mean": float(Dn[off].mean()) if E > 1 else 0.0,
        "determinant": float(np.linalg.det(Dn)),
        "permanent": permanent(Dn),
    }
