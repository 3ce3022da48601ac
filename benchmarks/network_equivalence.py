"""Do networks of surrogates behave like networks of Hay cells? Detailed vs surrogate on identical inputs.

    python benchmarks/network_equivalence.py --morphology ../shared/hay/cell1.asc --out runs/network_equivalence

N cells get each its own background from a ground-truth generator (``--generator``, seeds from
``--dataset-seed``, which no corpus uses) and are simulated twice: as detailed ``HayL5PC`` cells in NEURON with
the ground-truth solve (Crank–Nicolson, dt 0.05 ms) and as ``SurrogateL5PC`` cells (``--model``), on the
same events and connections (:mod:`lfdeep_neuron.equivalence`). Two parts:

* **volleys** (``--duration-ms``, default 6000): volleys of M excitatory events within 1 ms on all / basal /
  apical dendrites (M in 10, 25, 50, 100, 200) and inhibitory volleys (50, 200 on all dendrites), one every
  ~150 ms per cell in a random order; the same cells without volleys are the control. Reported per
  condition: evoked spikes per volley (paired: volley run minus control, spikes in the 20 ms after onset),
  the surrogate/cell ratio, the latency of the evoked peak (1-ms peri-volley histogram), and the peak
  somatic depolarisation (both runs clipped at -55 mV).
* **recurrent** (``--rec-duration-ms``, default 2000): the same kind of backgrounds plus random recurrent
  connections (``--k-in`` presynaptic cells, each a bundle of ``--syn-per-connection`` synapses of weight 1,
  delay 1–3 ms). Reported: rate ratio, per-cell rate correlation, population-rate correlation at 5 and 20 ms,
  Γ ±2 / ±5 ms, ISI CV, burst fraction; the detailed network with 1 % of its background events deleted
  against itself is the noise ceiling; the rate change from the same network without recurrence (detailed
  and surrogate) says whether the surrogates carry the recurrence.

Resumable: every detailed run (split over ``--workers`` processes where cells are independent) and every
surrogate run is one ``.npz`` in ``--out`` named by a hash of what determines it, skipped when present; a
second model reuses the detailed runs. Figures: ``volleys.png`` (peri-volley histograms overlaid),
``recurrent.png`` (rasters and population rates). ``--json`` writes every number.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lfdeep_neuron.recurrent_network import save_npz
from lfdeep_neuron.equivalence import (Connectivity, NetworkSpec, VolleyProtocol, background_events, delete_events,
                                       network_scores, run_detailed, run_surrogates, volley_responses)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--morphology", default=os.environ.get("LFDEEP_HAY_MORPHOLOGY"),
                   help="morphology of the detailed cell (default: $LFDEEP_HAY_MORPHOLOGY)")
    p.add_argument("--model", default=None, help="surrogate checkpoint (default: the bundled one)")
    p.add_argument("--out", default="runs/network_equivalence", help="folder of runs, figures and JSON")
    p.add_argument("--parts", nargs="+", choices=["volleys", "recurrent"], default=["volleys", "recurrent"])
    p.add_argument("--n-cells", type=int, default=16, help="cells per network")
    p.add_argument("--duration-ms", type=int, default=6000, help="volley runs (ms)")
    p.add_argument("--rec-duration-ms", type=int, default=2000, help="recurrent runs (ms)")
    p.add_argument("--skip-ms", type=float, default=200.0, help="ignored start of every run (ms)")
    p.add_argument("--generator", default="published", help="background generator (a key of GENERATORS)")
    p.add_argument("--dataset-seed", type=int, default=9001, help="backgrounds: sim_seed(this, gid)")
    p.add_argument("--k-in", type=int, default=8, help="recurrent: presynaptic cells per cell")
    p.add_argument("--syn-per-connection", type=int, default=40, help="recurrent: synapses per connection")
    p.add_argument("--weight", type=float, default=1.0, help="recurrent: weight per synapse (reference units)")
    p.add_argument("--workers", type=int, default=2, help="processes for the detailed runs")
    p.add_argument("--threshold", type=float, default=None,
                   help="surrogate spike-logit threshold (default: the checkpoint's)")
    p.add_argument("--json", default=None, help="write every number here (default: OUT/results.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# What each run is (rebuilt identically in the workers)
# ---------------------------------------------------------------------------------------------------------

def tables(model_path):
    """Segment and synapse tables of the model's cell (the inputs are drawn on them)."""
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    m = load_surrogate(model_path)
    return m, m.meta["segments"], m.meta["synapses"]


def volley_specs(args, seg, syn):
    """(spec with volleys, control spec, onsets, conditions, protocol)."""
    vp = VolleyProtocol()
    with_v, ctrl, onsets, cond = {}, {}, {}, {}
    for g in range(args.n_cells):
        bg = background_events(g, seg, syn, args.duration_ms, args.generator, args.dataset_seed)
        onsets[g], cond[g] = vp.schedule(g, args.duration_ms, seed=args.dataset_seed)
        vs, vt = vp.events(g, onsets[g], cond[g], seg, syn, seed=args.dataset_seed)
        s, t = np.concatenate([bg[0], vs]), np.concatenate([bg[1], vt])
        o = np.lexsort((s, t))
        with_v[g], ctrl[g] = (s[o], t[o]), bg
    return (NetworkSpec(args.n_cells, args.duration_ms, with_v), NetworkSpec(args.n_cells, args.duration_ms, ctrl),
            onsets, cond, vp)


def recurrent_specs(args, seg, syn):
    """{'rec', 'rec_del1', 'norec'} -> NetworkSpec."""
    T = args.rec_duration_ms
    bg = {g: background_events(g, seg, syn, T, args.generator, args.dataset_seed + 1) for g in range(args.n_cells)}
    conn = Connectivity(k_in=args.k_in, synapses_per_connection=args.syn_per_connection,
                        weight=args.weight).plan(args.n_cells, syn, seed=args.dataset_seed)
    deleted = {g: delete_events(*bg[g], 0.01, seed=args.dataset_seed + g) for g in bg}
    return {"rec": NetworkSpec(args.n_cells, T, bg, conn), "rec_del1": NetworkSpec(args.n_cells, T, deleted, conn),
            "norec": NetworkSpec(args.n_cells, T, bg)}


def detailed_jobs(args) -> dict:
    """job name -> (part, run name, gids): the volley runs split over workers, each network whole."""
    jobs = {}
    if "volleys" in args.parts:
        chunks = np.array_split(np.arange(args.n_cells), max(1, min(args.workers, args.n_cells)))
        for run in ("volley", "control"):
            for i, gids in enumerate(chunks):
                jobs[f"det_{run}_{i}"] = ("volleys", run, [int(g) for g in gids])
    if "recurrent" in args.parts:
        for run in ("rec", "rec_del1", "norec"):
            jobs[f"det_{run}"] = ("recurrent", run, list(range(args.n_cells)))
    return jobs


def key(args, *extra) -> str:
    """Hash of what determines the detailed runs (+ extra, e.g. the model's digest)."""
    from lfdeep_neuron.data.simulate import file_sha256

    d = {k: getattr(args, k) for k in ("n_cells", "duration_ms", "rec_duration_ms", "generator", "dataset_seed",
                                       "k_in", "syn_per_connection", "weight")}
    d["morphology_sha256"] = file_sha256(args.morphology)
    return hashlib.sha256(json.dumps([d, *extra], sort_keys=True).encode()).hexdigest()[:12]


def load_npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_worker(args) -> None:
    """One detailed job (called in a subprocess)."""
    part, run, gids = detailed_jobs(args)[args.worker]
    _, seg, syn = tables(args.model)
    if part == "volleys":
        spec, ctrl, *_ = volley_specs(args, seg, syn)
        spec = (spec if run == "volley" else ctrl).local(gids)
    else:
        spec = recurrent_specs(args, seg, syn)[run]
    out = run_detailed(spec, args.morphology, progress=True)
    save_npz(Path(args.out) / f"{args.worker}_{key(args)}.npz", out)


def run_detailed_jobs(args, argv) -> dict:
    """Run the missing detailed jobs, ``--workers`` at a time; return job name -> result."""
    from tqdm import tqdm

    out = Path(args.out)
    k = key(args)
    jobs = detailed_jobs(args)
    path = {j: out / f"{j}_{k}.npz" for j in jobs}
    todo = [j for j in jobs if not path[j].exists()]
    running: list = []
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="detailed runs", unit="run") as bar:
        while todo or running:
            while todo and len(running) < max(1, args.workers):
                j = todo.pop(0)
                log = open(out / f"{j}.log", "w")
                running.append((j, log, subprocess.Popen([sys.executable, __file__, *argv, "--worker", j],
                                                         stdout=log, stderr=subprocess.STDOUT)))
            time.sleep(1.0)
            for item in list(running):
                j, log, proc = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    if proc.returncode != 0:
                        for _, lg, pr in running:
                            pr.terminate()
                        raise SystemExit(f"network_equivalence: detailed job {j} failed (exit {proc.returncode}); "
                                         f"see {out / (j + '.log')}")
                    bar.update(1)
    return {j: load_npz(path[j]) for j in jobs}


def merge(parts: list[dict]) -> dict:
    """Detailed results of several gid chunks as one."""
    gids = np.concatenate([p["gids"] for p in parts])
    o = np.argsort(gids)
    sg = np.concatenate([p["spike_gid"] for p in parts])
    st = np.concatenate([p["spike_t_ms"] for p in parts])
    so = np.lexsort((sg, st))
    return {"gids": gids[o], "spike_gid": sg[so], "spike_t_ms": st[so],
            "soma_v_mV": np.concatenate([p["soma_v_mV"] for p in parts])[o]}


def surrogate_run(args, name: str, spec: NetworkSpec, model, model_digest: str) -> dict:
    path = Path(args.out) / f"sur_{name}_{key(args, model_digest, args.threshold)}.npz"
    if path.exists():
        return load_npz(path)
    res = run_surrogates(spec, model, spike_threshold=args.threshold)
    save_npz(path, res)
    return res


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def fmt(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def volley_table(vp, det: dict, sur: dict) -> tuple[str, list]:
    rows = ["| volley | n | cell: evoked spikes per volley | surrogate | ratio | peak latency cell / sur (ms) "
            "| peak soma Δv cell / sur (mV) |", "|---|---|---|---|---|---|---|"]
    out = []
    for c, (m, loc, sign) in enumerate(vp.conditions):
        e_d, e_s = det["evoked"][c], sur["evoked"][c]
        ratio = e_s / e_d if abs(e_d) > 1e-12 else float("nan")
        rows.append(f"| {m} {sign}, {loc} | {det['n_volleys'][c]} | {e_d:.3f} ± {det['evoked_se'][c]:.3f} | "
                    f"{e_s:.3f} ± {sur['evoked_se'][c]:.3f} | {fmt(ratio, 2)} | "
                    f"{fmt(det['peak_latency_ms'][c], 1)} / {fmt(sur['peak_latency_ms'][c], 1)} | "
                    f"{det['peak_depol_mV'][c]:.2f} / {sur['peak_depol_mV'][c]:.2f} |")
        out.append({"size": m, "location": loc, "sign": sign, "n_volleys": int(det["n_volleys"][c]),
                    "evoked_cell": float(e_d), "evoked_cell_se": float(det["evoked_se"][c]),
                    "evoked_surrogate": float(e_s), "evoked_surrogate_se": float(sur["evoked_se"][c]),
                    "ratio": float(ratio), "peak_latency_cell_ms": float(det["peak_latency_ms"][c]),
                    "peak_latency_surrogate_ms": float(sur["peak_latency_ms"][c]),
                    "peak_depol_cell_mV": float(det["peak_depol_mV"][c]),
                    "peak_depol_surrogate_mV": float(sur["peak_depol_mV"][c])})
    return "\n".join(rows), out


def recurrent_table(scores: dict, ceiling: dict, change: dict) -> str:
    keys = [("rate_ratio", "rate ratio (test / detailed)"), ("cell_rate_corr", "per-cell rate correlation"),
            ("pop_corr_5ms", "population-rate correlation, 5 ms"),
            ("pop_corr_20ms", "population-rate correlation, 20 ms"),
            ("gamma_2ms", "Γ ±2 ms"), ("gamma_5ms", "Γ ±5 ms"),
            ("isi_cv_test", "ISI CV (test; detailed {isi_cv_ref:.2f})"),
            ("burst_fraction_test", "burst fraction, ISI < 10 ms (test; detailed {burst_fraction_ref:.3f})")]
    rows = ["| | surrogates vs detailed | detailed, 1 % inputs deleted, vs detailed (ceiling) |", "|---|---|---|"]
    for k, label in keys:
        rows.append(f"| {label.format(**scores)} | {fmt(scores[k])} | {fmt(ceiling[k])} |")
    rows.append(f"| mean rate (Hz): detailed / surrogates | {scores['rate_ref_hz']:.2f} / {scores['rate_test_hz']:.2f} "
                f"| |")
    rows.append(f"| rate change from recurrence: detailed / surrogates | {change['detailed']:+.1%} / "
                f"{change['surrogate']:+.1%} | |")
    return "\n".join(rows)


def plot_volleys(path, vp, det, sur) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = vp.conditions
    ncol = len(vp.sizes)
    nrow = -(-len(conds) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.2 * nrow), sharex=True)
    centres = det["hist_edges"][:-1] + 0.5
    for c, ax in enumerate(np.ravel(axes)):
        if c >= len(conds):
            ax.axis("off")
            continue
        ax.step(centres, det["hist"][c], where="mid", color="k", label="Hay cell")
        ax.step(centres, sur["hist"][c], where="mid", color="tab:red", label="surrogate")
        ax.axvline(0, color="0.7", lw=0.8)
        m, loc, sign = conds[c]
        ax.set_title(f"{m} {sign}, {loc}: {det['evoked'][c]:.2f} / {sur['evoked'][c]:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    np.ravel(axes)[0].legend(fontsize=7)
    fig.supxlabel("ms after volley onset")
    fig.supylabel("extra spikes per volley per ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recurrent(path, det, sur, duration_ms, skip_ms) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lfdeep_neuron.equivalence import population_rate

    fig, (a0, a1) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    a0.plot(det["spike_t_ms"], det["spike_gid"] - 0.15, "|", color="k", ms=6, label="Hay cells")
    a0.plot(sur["spike_t_ms"], sur["spike_gid"] + 0.15, "|", color="tab:red", ms=6, label="surrogates")
    a0.set_ylabel("cell")
    a0.legend(loc="upper right", fontsize=8)
    n = len(det["gids"])
    edges = np.arange(skip_ms, duration_ms + 1e-9, 20.0)
    a1.plot(edges[:-1] + 10, population_rate(det["spike_t_ms"], n, skip_ms, duration_ms, 20), "k", label="Hay")
    a1.plot(edges[:-1] + 10, population_rate(sur["spike_t_ms"], n, skip_ms, duration_ms, 20), color="tab:red",
            label="surrogate")
    a1.set_ylabel("population rate (Hz, 20 ms)")
    a1.set_xlabel("ms")
    a0.axvspan(0, skip_ms, color="0.9")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint

    if args.model is None:
        args.model = str(bundled_checkpoint())
    if not args.morphology:
        print("network_equivalence: no morphology given: pass --morphology or set LFDEEP_HAY_MORPHOLOGY",
              file=sys.stderr)
        return 1
    for what, p in (("morphology", args.morphology), ("checkpoint", args.model)):
        if not Path(p).is_file():
            print(f"network_equivalence: {what} {p} does not exist", file=sys.stderr)
            return 1
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_worker(args)
        return 0
    from lfdeep_neuron.data.simulate import file_sha256

    det = run_detailed_jobs(args, argv)
    model, seg, syn = tables(args.model)
    digest = file_sha256(args.model)[:16]
    result = {"model": args.model, "model_sha256_16": digest, "args": {k: v for k, v in vars(args).items()
                                                                       if k != "worker"}}
    if "volleys" in args.parts:
        spec, ctrl, onsets, cond, vp = volley_specs(args, seg, syn)
        d_v = merge([v for j, v in det.items() if j.startswith("det_volley_")])
        d_c = merge([v for j, v in det.items() if j.startswith("det_control_")])
        s_v = surrogate_run(args, "volley", spec, model, digest)
        s_c = surrogate_run(args, "control", ctrl, model, digest)
        rd = volley_responses(d_v, d_c, onsets, cond, len(vp.conditions))
        rs = volley_responses(s_v, s_c, onsets, cond, len(vp.conditions))
        text, rows = volley_table(vp, rd, rs)
        print(f"\nVolleys ({args.n_cells} cells x {args.duration_ms} ms, background '{args.generator}', "
              f"model {Path(args.model).name}):\n{text}")
        plot_volleys(Path(args.out) / "volleys.png", vp, rd, rs)
        result["volleys"] = rows
        result["volley_background_rate_hz"] = {
            "cell": float(np.sum(d_c["spike_t_ms"] >= args.skip_ms) / args.n_cells
                          / ((args.duration_ms - args.skip_ms) * 1e-3)),
            "surrogate": float(np.sum(s_c["spike_t_ms"] >= args.skip_ms) / args.n_cells
                               / ((args.duration_ms - args.skip_ms) * 1e-3))}
        print("background rate without volleys (Hz): cell {cell:.2f}, surrogate {surrogate:.2f}".format(
            **result["volley_background_rate_hz"]))
    if "recurrent" in args.parts:
        specs = recurrent_specs(args, seg, syn)
        T = args.rec_duration_ms
        s_rec = surrogate_run(args, "rec", specs["rec"], model, digest)
        s_norec = surrogate_run(args, "norec", specs["norec"], model, digest)
        scores = network_scores(s_rec, det["det_rec"], T, args.skip_ms)
        ceiling = network_scores(det["det_rec_del1"], det["det_rec"], T, args.skip_ms)
        n_d = network_scores(det["det_norec"], det["det_rec"], T, args.skip_ms)
        n_s = network_scores(s_norec, s_rec, T, args.skip_ms)
        change = {"detailed": n_d["rate_ref_hz"] / max(n_d["rate_test_hz"], 1e-12) - 1,
                  "surrogate": n_s["rate_ref_hz"] / max(n_s["rate_test_hz"], 1e-12) - 1}
        print(f"\nRecurrent network ({args.n_cells} cells x {T} ms, {args.k_in} inputs x {args.syn_per_connection} "
              f"synapses of weight {args.weight}; first {args.skip_ms:g} ms skipped):\n"
              + recurrent_table(scores, ceiling, change))
        plot_recurrent(Path(args.out) / "recurrent.png", det["det_rec"], s_rec, T, args.skip_ms)
        result["recurrent"] = {"surrogate_vs_detailed": scores, "ceiling": ceiling, "rate_change": change}
    path = Path(args.json or Path(args.out) / "results.json")
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {path} and the figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
