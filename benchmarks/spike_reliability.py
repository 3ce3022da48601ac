"""How reliable is the detailed cell's own spike timing? Γ of the Hay cell against itself under tiny changes.

    python benchmarks/spike_reliability.py --data data/corpus/published --split test --n-sims 12 \\
        --perturb none jitter:0.001 jitter:0.01 drop:0.001 dt:0.025 --json runs/spike_reliability.json

Reruns the detailed cell in NEURON on the recorded effective inputs of the first ``--n-sims`` simulations of a
split that have somatic spikes, with the corpus's solve (its integrator, dt and v_init), once per perturbation,
and scores each spike train against the recorded one with the pooled coincidence factor Γ (±2 ms, the
surrogate's metric):

* ``none``: no change (Γ = 1 when the rerun reproduces the record; NEURON and CoreNEURON give the same
  trajectories);
* ``jitter:F``: a fraction F of the input events moved by one millisecond, earlier or later at random (kept
  inside the run);
* ``drop:F``: a fraction F of the input events deleted;
* ``dt:DT``: the same inputs, integrator step DT ms (numerical error only).

A surrogate's errors are not input perturbations, but these numbers say how much of the cell's ±2-ms spike
timing hangs on single input events: the scale against which a surrogate's Γ can be read. With ``--model CKPT``
the surrogate runs closed loop (the engine's spike rule at the checkpoint's threshold) on the same perturbed
inputs, all simulations of a perturbation in one batch, and each perturbation also reports the surrogate's Γ
against its own run on the unchanged inputs (does it respond to the input details that move the cell's spikes?)
and against the cell's rerun (its accuracy there). Perturbations draw
from ``numpy.random.RandomState(1000 + simulation index)``, so every number is reproducible. Each finished
(perturbation, simulation) is appended to ``JSON.jsonl`` and skipped when the same command is rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KINDS = ("none", "jitter", "drop", "dt")


def parse_perturbation(text: str) -> tuple[str, float]:
    """``'jitter:0.01'`` -> ``('jitter', 0.01)``; ``'none'`` -> ``('none', 0.0)``."""
    kind, _, amount = text.partition(":")
    if kind not in KINDS or (kind != "none") != bool(amount):
        raise ValueError(f"perturbation {text!r}: expected none, jitter:F, drop:F or dt:DT")
    value = float(amount) if amount else 0.0
    if kind in ("jitter", "drop") and not 0.0 <= value <= 1.0:
        raise ValueError(f"perturbation {text!r}: the fraction must lie in [0, 1]")
    if kind == "dt" and value <= 0.0:
        raise ValueError(f"perturbation {text!r}: dt must be positive")
    return kind, value


def perturb_events(syn_idx, t_ms, kind: str, fraction: float, duration_ms: float, rng):
    """Input events after a ``jitter`` or ``drop`` perturbation (others: unchanged copies).

    Returns ``(syn_idx, t_ms, n_changed)``. Jittered events move by exactly ±1 ms and stay within
    ``[1, duration_ms - 1]`` ms."""
    syn_idx, t_ms = np.asarray(syn_idx).copy(), np.asarray(t_ms, dtype=np.float64).copy()
    if kind == "jitter":
        chosen = rng.rand(t_ms.size) < fraction
        shift_ms = rng.choice([-1.0, 1.0], int(chosen.sum()))
        t_ms[chosen] = np.clip(t_ms[chosen] + shift_ms, 1.0, duration_ms - 1.0)
        return syn_idx, t_ms, int(chosen.sum())
    if kind == "drop":
        keep = rng.rand(t_ms.size) >= fraction
        return syn_idx[keep], t_ms[keep], int((~keep).sum())
    return syn_idx, t_ms, 0


def nearest_shifts_ms(rows) -> np.ndarray:
    """|rerun spike time - nearest recorded spike time| (ms) of every rerun spike of ``rows`` (runs without
    recorded spikes contribute nothing)."""
    out = []
    for r in rows:
        rerun, recorded = np.asarray(r["rerun_ms"], dtype=np.float64), np.asarray(r["recorded_ms"], dtype=np.float64)
        if rerun.size and recorded.size:
            out.append(np.abs(rerun[:, None] - recorded[None, :]).min(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def read_inputs(path) -> dict:
    """Effective input events, recorded spikes, duration and initial voltages of one corpus record."""
    import h5py

    with h5py.File(path, "r") as f:
        return {"syn": f["input_effective/syn_idx"][()].astype(np.int64),
                "t_ms": f["input_effective/t_ms"][()].astype(np.float64),
                "recorded_ms": f["soma_spike_times_ms"][()].astype(np.float64),
                "duration_ms": float(f.attrs["duration_ms"]),
                "v0_mV": np.asarray(f["v_1ms"][:, 0], dtype=np.float32)}


def surrogate_trains(model, records: list[dict], kind: str, value: float, sims: list[int],
                     spike_threshold: float | None = None) -> list[np.ndarray]:
    """Closed-loop somatic spike times (ms) of ``model`` on the perturbed inputs of ``records`` (one batch;
    ``spike_threshold`` default: the checkpoint's)."""
    import torch

    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.surrogate.metrics import SPIKE_OFFSET_MS
    from lfdeep_neuron.surrogate.stream import closed_loop

    T = int(max(r["duration_ms"] for r in records))
    xs = []
    for r, index in zip(records, sims):
        syn, t_ms, _ = perturb_events(r["syn"], r["t_ms"], kind, value, r["duration_ms"],
                                      np.random.RandomState(1000 + index))
        xs.append(bin_events(syn, t_ms, model.n_channels, 0, T)[:, 1:])
    x = torch.as_tensor(np.stack(xs))
    v0 = torch.as_tensor(np.stack([r["v0_mV"] for r in records]))
    spiked = closed_loop(model, x, v0_mV=v0, voltages=False, spike_threshold=spike_threshold).spiked.cpu().numpy()
    return [np.flatnonzero(row) + 1 - SPIKE_OFFSET_MS for row in spiked]       # column i = step i + 1


def pick_simulations(data: Path, meta: dict, split: str, n_sims: int) -> list[int]:
    """The first ``n_sims`` simulations of ``split`` (``meta``: the folder's ``meta.json``) with at least one
    recorded somatic spike."""
    import h5py

    from lfdeep_neuron.data.simulate import record_path

    if split not in meta.get("splits", {}):
        raise SystemExit(f"spike_reliability: no split {split!r} in {data / 'meta.json'}")
    chosen = []
    for index in meta["splits"][split]:
        with h5py.File(record_path(data, index), "r") as f:
            if f["soma_spike_times_ms"].size:
                chosen.append(int(index))
        if len(chosen) == n_sims:
            break
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder written by lfdeep-neuron generate")
    p.add_argument("--split", default="test")
    p.add_argument("--n-sims", type=int, default=12, help="first N simulations of the split with spikes")
    p.add_argument("--perturb", nargs="+", default=["none", "jitter:0.001", "jitter:0.01", "drop:0.001",
                                                    "dt:0.025"])
    p.add_argument("--morphology", default="../shared/hay/cell1.asc")
    p.add_argument("--json", required=True, help="summary; per-run results go to JSON.jsonl (resume)")
    p.add_argument("--figure", default=None, help="PNG: Γ and spike-time shifts per perturbation")
    p.add_argument("--model", default=None, help="also run this surrogate checkpoint on the perturbed inputs")
    args = p.parse_args(argv)
    try:
        perturbations = [(text, *parse_perturbation(text)) for text in args.perturb]
    except ValueError as err:
        raise SystemExit(f"spike_reliability: {err}")

    from tqdm.auto import tqdm

    from lfdeep_neuron import mechanisms
    from lfdeep_neuron.data.simulate import read_meta, record_path
    from lfdeep_neuron.hay import HayL5PC
    from lfdeep_neuron.hay.morphology import check_morphology
    from lfdeep_neuron.hay.simulate import run_cell
    from lfdeep_neuron.surrogate.metrics import pooled_spike_metrics

    data = Path(args.data)
    meta = read_meta(data)
    if meta is None:
        raise SystemExit(f"spike_reliability: no dataset at {data} ({data / 'meta.json'} is missing)")
    gen = meta["generation"]
    model = None
    try:                                            # a missing or wrong file: one line, before any simulation
        check_morphology(args.morphology)
        if args.model:
            import torch

            from lfdeep_neuron.surrogate.checkpoint import load_surrogate

            torch.set_num_threads(1)
            model = load_surrogate(args.model).eval()
    except (OSError, ValueError) as err:
        raise SystemExit(f"spike_reliability: {err}")
    sims = pick_simulations(data, meta, args.split, args.n_sims)
    records = {i: read_inputs(record_path(data, i)) for i in sims}       # read once: every perturbation uses them
    log = Path(args.json + ".jsonl")
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("data", str(data)) == str(data):          # rows of another dataset are not reused
                done[(row["perturb"], row["sim"])] = row
    mechanisms.load()
    cell = HayL5PC(args.morphology)
    bar = tqdm(total=len(perturbations) * len(sims), desc="cell reruns", unit="sim")
    for text, kind, value in perturbations:
        for index in sims:
            if (text, index) in done:
                bar.update(1)
                continue
            rec = records[index]
            syn, t_ms, recorded, duration_ms = rec["syn"], rec["t_ms"], rec["recorded_ms"], rec["duration_ms"]
            rng = np.random.RandomState(1000 + index)
            syn, t_ms, n_changed = perturb_events(syn, t_ms, kind, value, duration_ms, rng)
            cell.set_input_events(syn, t_ms)
            out = run_cell(cell, duration_ms, integrator=gen["integrator"], v_init_mV=float(gen["v_init_mV"]),
                           dt_ms=value if kind == "dt" else float(gen["dt_ms"]))
            row = {"data": str(data), "perturb": text, "sim": index, "duration_ms": duration_ms,
                   "n_events": int(t_ms.size), "n_changed": n_changed, "recorded_ms": recorded.tolist(),
                   "rerun_ms": np.asarray(out["soma_spike_times_ms"], dtype=np.float64).tolist()}
            with open(log, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[(text, index)] = row
            bar.update(1)
    bar.close()

    summary = {"data": str(data), "split": args.split, "sims": sims, "perturbations": {}}
    shifts_ms = {}                                           # per perturbation, for the summary and the figure
    for text, kind, value in perturbations:
        rows = [done[(text, i)] for i in sims]
        m = pooled_spike_metrics([np.asarray(r["rerun_ms"]) for r in rows], [np.asarray(r["recorded_ms"])
                                                                            for r in rows],
                                 [r["duration_ms"] for r in rows], 2.0)
        changed = sum(r["n_changed"] for r in rows) / max(1, sum(r["n_events"] for r in rows))
        shifts_ms[text] = nearest_shifts_ms(rows)
        near = shifts_ms[text][shifts_ms[text] <= 2.0]
        summary["perturbations"][text] = {k: m[k] for k in ("gamma", "n_true", "n_pred", "n_coinc")}
        summary["perturbations"][text].update(
            events_changed_fraction=changed,
            shift_within_2ms_median_ms=float(np.median(near)) if near.size else None,
            shift_within_2ms_max_ms=float(near.max()) if near.size else None)
        shifts = f" (their |Δt| median {np.median(near):.3f}, max {near.max():.3f} ms)" if near.size else ""
        print(f"{text:>14}: Γ ±2 ms {m['gamma']:.3f} ({m['n_pred']} spikes for {m['n_true']} recorded, "
              f"{m['n_coinc']} within ±2 ms{shifts}; {100 * changed:.2f} % of input events changed)")
    if model is not None:
        summary["model"] = args.model
        batch = [records[i] for i in sims]
        durations = [r["duration_ms"] for r in batch]
        trains = {("none", 0.0): surrogate_trains(model, batch, "none", 0.0, sims)}
        for text, kind, value in perturbations:                 # the solver step does not change a surrogate's inputs
            key = ("none", 0.0) if kind in ("none", "dt") else (kind, value)
            if key not in trains:
                trains[key] = surrogate_trains(model, batch, key[0], key[1], sims)
            own = pooled_spike_metrics(trains[key], trains[("none", 0.0)], durations, 2.0)
            cell = pooled_spike_metrics(trains[key], [np.asarray(done[(text, i)]["rerun_ms"]) for i in sims],
                                        durations, 2.0)
            summary["perturbations"][text].update(surrogate_gamma_vs_own_unchanged=own["gamma"],
                                                  surrogate_gamma_vs_cell=cell["gamma"],
                                                  surrogate_n_spikes=own["n_pred"])
            print(f"{text:>14}: surrogate {own['n_pred']} spikes; Γ against its own run on the unchanged inputs "
                  f"{own['gamma']:.3f}, against the cell's rerun {cell['gamma']:.3f}")
    with open(args.json, "w") as fh:
        json.dump(summary, fh, indent=1)
    if args.figure:
        plot(summary, shifts_ms, args.figure)
    return 0


def plot(summary: dict, shifts_ms: dict, path) -> None:
    """Γ ±2 ms per perturbation (left) and the shift of each rerun spike from its nearest recorded one (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["perturbations"])
    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    bars = [("cell: rerun vs its record", "gamma", "tab:blue"),
            ("surrogate: run vs its run on unchanged inputs", "surrogate_gamma_vs_own_unchanged", "tab:orange")]
    bars = [b for b in bars if all(b[1] in summary["perturbations"][n] for n in names)]
    width = 0.8 / len(bars)
    for j, (label, key, color) in enumerate(bars):
        xs = np.arange(len(names)) + (j - (len(bars) - 1) / 2) * width
        gammas = [summary["perturbations"][n][key] for n in names]
        ax_g.bar(xs, gammas, width, color=color, label=label)
        for x, g in zip(xs, gammas):
            ax_g.text(x, g + 0.01, f"{g:.2f}", ha="center", fontsize=7)
    ax_g.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_g.set_ylim(0, 1.15)
    ax_g.set_ylabel("Γ ±2 ms against the unchanged run")
    ax_g.legend(fontsize=7, loc="lower left")
    n_true = summary["perturbations"][names[0]]["n_true"]
    ax_g.set_title(f"changed inputs: {len(summary['sims'])} simulations, {n_true} recorded spikes", fontsize=9)
    floor_ms = 1e-3                                    # exact reproductions drawn at 1 µs on the log axis
    data = [np.maximum(shifts_ms[n], floor_ms) if shifts_ms[n].size else np.array([floor_ms]) for n in names]
    ax_s.boxplot(data, whis=(0, 100))
    ax_s.axhline(2.0, color="tab:red", lw=1, ls="--", label="±2 ms (Γ window)")
    ax_s.set_yscale("log")
    ax_s.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax_s.set_ylabel("|rerun spike - nearest recorded spike| (ms)")
    ax_s.set_title(f"the cell's spike-time shifts (min-max whiskers; exact = {floor_ms:g} ms)", fontsize=9)
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
