"""Score one simulation record against another: ``lfdeep-neuron compare``.

    lfdeep-neuron compare --pred sur.h5 --true ../shared/hay/reference/synaptic_seed1.h5 [--json out.json]

Both files are records in the reference layout (``lfdeep-neuron replay`` writes NEURON's,
``lfdeep-neuron rollout`` the surrogate's), so the same numbers score the detailed cell against the
published implementation and the surrogate against NEURON:

* ``v_1ms`` RMSE (mV) over all segments and per anatomical group (:func:`~.metrics.segment_groups`),
  and the RMSE of a constant prediction (the ``--true`` record's own per-segment time mean: the trivial
  baseline a useful prediction must beat);
* somatic spikes (``soma_spike_times_ms``): counts, coincidences and Γ within ±``--window-ms``.

The two records must describe the same cell (segment names in the same order) and duration.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lfdeep_neuron.data.records import RecordFormatError, read_record
from lfdeep_neuron.surrogate.metrics import (coincidence_factor, match_spikes, rmse_by_group, segment_groups,
                                             sq_err_per_segment)

__all__ = ["configure_parser", "run", "compare_records"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="record to score (.h5), e.g. a rollout")
    p.add_argument("--true", required=True, help="ground-truth record (.h5), e.g. NEURON's")
    p.add_argument("--window-ms", type=float, default=2.0, help="coincidence window ±Δ for Γ (ms)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file (default: print only)")


def compare_records(pred_path, true_path, window_ms: float = 2.0) -> dict:
    """Voltage and spike agreement of record ``pred_path`` with record ``true_path`` (see module doc)."""
    need = ("segments", "v_1ms", "soma_spike_times_ms")
    pred, true = read_record(pred_path, require=need), read_record(true_path, require=need)
    names_p = [str(n) for n in pred["segments"]["name"]]
    names_t = [str(n) for n in true["segments"]["name"]]
    if names_p != names_t:
        raise RecordFormatError(f"{pred_path} and {true_path} describe different cells "
                                f"({len(names_p)} vs {len(names_t)} segments, or another order)")
    vp, vt = np.asarray(pred["v_1ms"], np.float64), np.asarray(true["v_1ms"], np.float64)
    if vp.shape != vt.shape:
        raise RecordFormatError(f"v_1ms shapes differ: {vp.shape} ({pred_path}) vs {vt.shape} ({true_path})")
    if not np.isfinite(vp).all():
        raise ValueError(f"{pred_path}: v_1ms holds {int((~np.isfinite(vp)).sum())} non-finite values")
    groups = segment_groups(true["segments"])
    sse, n = sq_err_per_segment(vp, vt)
    const = np.broadcast_to(vt.mean(axis=1, keepdims=True), vt.shape)
    sse0, _ = sq_err_per_segment(const, vt)
    duration = vt.shape[1] * 1.0
    sp = np.asarray(pred["soma_spike_times_ms"], np.float64).reshape(-1)
    st = np.asarray(true["soma_spike_times_ms"], np.float64).reshape(-1)
    return {
        "pred": str(pred_path), "true": str(true_path), "n_segments": vt.shape[0], "duration_ms": duration,
        "rmse_mV": rmse_by_group(sse / n, groups),
        "rmse_mV_constant_baseline": rmse_by_group(sse0 / n, groups),
        "spikes": {"n_pred": int(sp.size), "n_true": int(st.size),
                   "n_coinc": match_spikes(sp, st, window_ms),
                   "gamma": coincidence_factor(sp, st, duration, window_ms), "window_ms": float(window_ms),
                   "pred_ms": sp.round(3).tolist(), "true_ms": st.round(3).tolist()},
    }


def run(args: argparse.Namespace) -> int:
    for path in (args.pred, args.true):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such record")
    out = compare_records(args.pred, args.true, args.window_ms)
    r, r0, s = out["rmse_mV"], out["rmse_mV_constant_baseline"], out["spikes"]
    print(f"{out['pred']} vs {out['true']}: {out['n_segments']} segments, {out['duration_ms']:.0f} ms")
    print("v_1ms RMSE (mV)      " + "  ".join(f"{g} {v:.3g}" for g, v in r.items()))
    print("constant baseline    " + "  ".join(f"{g} {v:.3g}" for g, v in r0.items()))
    print(f"somatic spikes: {s['n_pred']} predicted, {s['n_true']} true, {s['n_coinc']} within "
          f"±{s['window_ms']:g} ms, Γ = {s['gamma']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0
