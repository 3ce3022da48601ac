"""The surrogate's LFP of one Hay L5PC against NEURON's, on the reference synaptic inputs.

    python examples/lfp_single_cell.py                          # first 500 ms of synaptic_seed1.h5
    python examples/lfp_single_cell.py --model models/X.pt --duration 1000

NEURON: ``HayL5PC`` replays ``input_effective`` of ``../shared/hay/reference/synaptic_seed1.h5``
(CVODE, as the references) with ``run_cell(record_imem=True)``; its LFP is ``M i`` from the exact
1-ms bin means of ``i_membrane_`` (column k = mean over (k-1, k] ms).
Surrogate: the same events binned per ms (an event at t goes to step ceil(t)), stepped closed loop;
its LFP is ``M (-L v)`` from the predicted point samples v (and ``M i`` from predicted currents if
the model has current tasks). ``M``: LFPykit line sources to a 16-contact laminar probe along the
apical axis (y = -300 .. 1200 µm, 50 µm beside the soma); ``L``: the axial Laplacian.

With ``--true-spikes`` the surrogate is scored a second time with NEURON's somatic spikes in place of its own:
a spike-history model reads them as its history (teacher-forced) and the action potential is added at them;
everything else (subthreshold voltages, currents) is still predicted. That is the LFP a perfect spike output
would give this model: the part of the LFP error that spike timing causes.

As a ceiling for any voltage-predicting surrogate, the LFP of NEURON's own point samples
``M (-L v_1ms)`` is scored too: point samples miss what happens inside each 1-ms bin (spikes), so
even perfect voltages do not give the bin-mean LFP.

Prints, per electrode, the correlation and the relative error ||phi_s - phi_N|| / ||phi_N|| of each
surrogate LFP against NEURON's, and writes ``lfp_single_cell.png`` to ``--out-dir``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "hay"


def load_model(path, config="paper", seed=0):
    """(model, trained?): --model, the bundled models/DEFAULT, or an untrained MMoE (with a warning)."""
    sys.path.insert(0, str(REPO / "examples"))
    from netpyne_l5pc_network import load_model as _load

    return _load(path, config, seed)


def run_surrogate(model, x_syn):
    """Closed-loop predictions as a co-simulation records them: v_mV [S, T] and, if the model has current
    tasks, imem_nA [S, T], with the checkpoint's action-potential waveform added at every predicted spike
    (its calibrated threshold), and the predicted spike times (ms)."""
    from lfdeep_neuron.surrogate.rollout import rollout

    out = rollout(model, x_syn)                       # x_syn [C, T]: column k = inputs of (k-1, k]
    v, imem = out["v_1ms"], out["imem_mean_1ms"]      # column 0: the initial state (v_rest), no current
    return v.astype(np.float64), (None if imem is None else imem.astype(np.float64)), out["soma_spike_times_ms"]


def run_with_true_spikes(model, x_syn, spike_times_ms):
    """Like :func:`run_surrogate` but with the given somatic spikes instead of the model's own: one full
    (teacher-forced) pass whose spike-history input, if the model has one, holds these spikes, then the
    checkpoint's action potential added at them. Returns ``imem_nA`` [S, T] (column 0 = 0), or None when the
    model has no current tasks or no waveform."""
    import torch

    from lfdeep_neuron.data.dataset import spike_indicator
    from lfdeep_neuron.surrogate.waveform import model_waveform

    wf = model_waveform(model)
    if wf is None or not model.config.imem_tasks:
        return None
    T = x_syn.shape[1]
    spiked = spike_indicator(spike_times_ms, 0, T) > 0                 # step k = ceil(t): spike in (k-1, k]
    x = torch.as_tensor(x_syn[None, :, 1:], dtype=torch.float32)
    history = torch.as_tensor(spiked[None, :-1], dtype=torch.float32)  # column of step k holds step k-1
    with torch.no_grad():
        pred = model.eval()(model.make_inputs(x, None, history if model.config.spike_history else None))
    imem = np.zeros((model.n_segments, T))
    imem[:, 1:] = model.imem_to_nA(pred.imem)[0].double().numpy()
    v = np.zeros((1, model.n_segments, T))                              # only the currents are used
    _, imem = wf.apply(v, spiked[None], imem[None])
    return imem[0]


def scores(phi, ref):
    """Per electrode of [T, E] LFPs: Pearson correlation and relative error ||phi - ref|| / ||ref|| (over time)."""
    a = phi - phi.mean(0, keepdims=True)
    b = ref - ref.mean(0, keepdims=True)
    corr = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    rel = np.linalg.norm(phi - ref, axis=0) / np.linalg.norm(ref, axis=0)
    return corr, rel


def figure(path, t, phis, electrodes, table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"NEURON (bin-mean i_membrane_)": "k", "NEURON point samples: -L v_1ms": "tab:green",
              "surrogate: -L v": "tab:red", "surrogate: predicted currents": "tab:purple",
              "surrogate: predicted currents, NEURON's spikes": "tab:orange"}
    ref = phis["NEURON (bin-mean i_membrane_)"] * 1e3
    spacing = 1.1 * np.abs(ref - ref.mean(0, keepdims=True)).max()
    fig, axes = plt.subplots(1, 2, figsize=(13, 7), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    for label, phi in phis.items():
        p = phi * 1e3
        neuron = label.startswith("NEURON (")
        for e in range(p.shape[1]):                          # LFPs are [T, E]
            ax.plot(t, p[:, e] - p[:, e].mean() + e * spacing, lw=1.3 if neuron else 0.7, zorder=1 if neuron else 2,
                    color=colors[label], alpha=1.0 if neuron else 0.85, label=label if e == 0 else None)
    ax.set_yticks(np.arange(len(electrodes)) * spacing, [f"{y:.0f}" for y in electrodes[:, 1]])
    ax.set_xlabel("time (ms)")
    ax.set_ylabel(f"contact y (µm); each trace minus its mean, offset by {spacing:.2g} µV")
    ax.set_title("LFP of one Hay L5PC on the reference inputs")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    for label, (corr, rel) in table.items():
        ax.plot(corr, electrodes[:, 1], "o-", color=colors[label], label=f"{label} (corr)", ms=3)
        ax.plot(np.minimum(rel, 2.0), electrodes[:, 1], "s--", color=colors[label], ms=3,
                label=f"{label} (rel. err, clipped at 2)")
    ax.axvline(0, color="0.7", lw=0.5)
    ax.axvline(1, color="0.7", lw=0.5)
    ax.set_xlabel("correlation / relative error vs NEURON")
    ax.set_ylabel("contact y (µm)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--morphology", default=str(SHARED / "cell1.asc"))
    p.add_argument("--reference", default=str(SHARED / "reference" / "synaptic_seed1.h5"))
    p.add_argument("--duration", type=float, default=500.0, help="ms of the reference to replay")
    p.add_argument("--true-spikes", action="store_true",
                   help="also score the surrogate with NEURON's somatic spikes in place of its own (teacher-forced "
                        "spike history, action potential at them): the LFP a perfect spike output would give")
    p.add_argument("--out-dir", default="out/lfp_single_cell")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.hay import HayL5PC
    from lfdeep_neuron.hay.simulate import run_cell
    from lfdeep_neuron.lfp import AxialLaplacian, PopulationLFP, SegmentGeometry, laminar_probe

    for f in (args.morphology, args.reference):
        if not Path(f).is_file():
            raise SystemExit(f"not found: {f}")
    T = int(round(args.duration))
    rec = read_record(args.reference, require=("input_effective",))
    syn, t_ev = np.asarray(rec["input_effective"]["syn_idx"]), np.asarray(rec["input_effective"]["t_ms"])
    keep = t_ev < T - 1e-9
    syn, t_ev = syn[keep], t_ev[keep]

    t0 = time.perf_counter()
    cell = HayL5PC(args.morphology)
    cell.set_input_events(syn, t_ev)
    out = run_cell(cell, T, record_imem=True, progress=True)
    t_neuron = time.perf_counter() - t0
    lap = AxialLaplacian.from_cell(cell)
    probe = laminar_probe()
    pop = PopulationLFP.from_geometries([SegmentGeometry.from_cell(cell)], probe, lap)
    phis = {"NEURON (bin-mean i_membrane_)": pop.from_currents(out["imem_mean_1ms"][None].astype(np.float64)),
            "NEURON point samples: -L v_1ms": pop.from_voltages(out["v_1ms"][None].astype(np.float64))}

    model, trained = load_model(args.model)
    if not trained:
        print("WARNING: no trained surrogate (models/ or --model): scoring an UNTRAINED paper MMoE; "
              "its LFP is meaningless")
    t0 = time.perf_counter()
    v_s, i_s, spikes_s = run_surrogate(model, bin_events(syn, t_ev, model.n_channels, 0, T))
    t_surr = time.perf_counter() - t0
    phis["surrogate: -L v"] = pop.from_voltages(v_s[None])
    if i_s is not None:
        phis["surrogate: predicted currents"] = pop.from_currents(i_s[None])
    if args.true_spikes:
        i_o = run_with_true_spikes(model, bin_events(syn, t_ev, model.n_channels, 0, T), out["soma_spike_times_ms"])
        if i_o is None:
            print("--true-spikes: this model has no current tasks or no spike waveform; skipped")
        else:
            phis["surrogate: predicted currents, NEURON's spikes"] = pop.from_currents(i_o[None])

    ref = phis["NEURON (bin-mean i_membrane_)"]
    skip = 1                                    # row 0 is the t = 0 value, not a bin mean
    table = {k: scores(v[skip:], ref[skip:]) for k, v in phis.items() if k != "NEURON (bin-mean i_membrane_)"}
    print(f"{T} ms of {Path(args.reference).name}: {keep.sum()} events; NEURON {t_neuron:.1f} s, "
          f"surrogate {t_surr:.1f} s; soma spikes NEURON {len(out['soma_spike_times_ms'])}, surrogate "
          f"{len(spikes_s)}")
    print(f"model: {model.meta.get('path', 'untrained')}; soma voltage RMSE (point samples) "
          f"{np.sqrt(np.mean((v_s[0] - out['v_1ms'][0]) ** 2)):.2f} mV")
    rms = np.sqrt(np.mean((ref - ref.mean(0, keepdims=True)) ** 2, axis=0)) * 1e3
    header = "contact y (µm) | NEURON RMS (µV) | " + " | ".join(f"{k}: corr, rel.err" for k in table)
    print(header)
    for e in range(probe.n_electrodes):
        cols = " | ".join(f"{table[k][0][e]:+.3f}, {table[k][1][e]:.3f}" for k in table)
        print(f"{probe.xyz_um[e, 1]:14.0f} | {rms[e]:15.3f} | {cols}")
    for k, (c, r) in table.items():
        print(f"{k}: median corr {np.median(c):+.3f}, median rel. err {np.median(r):.3f}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure(out_dir / "lfp_single_cell.png", np.arange(T), phis, probe.xyz_um, table)
    np.savez(out_dir / "lfp_single_cell.npz", electrodes_um=probe.xyz_um,
             **{k.split(":")[0].replace(" ", "_") + str(i): v for i, (k, v) in enumerate(phis.items())})
    print(f"wrote {out_dir / 'lfp_single_cell.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
