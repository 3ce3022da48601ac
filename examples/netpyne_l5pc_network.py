"""A NetPyNE network of deep-surrogate Hay L5PCs: background NetStims, recurrent synapses, LFP.

    python examples/netpyne_l5pc_network.py                    # 20 surrogate L5PCs, 300 ms, figures in out/
    mpiexec -n 2 python examples/netpyne_l5pc_network.py       # the same network on 2 ranks: same spikes
    python examples/netpyne_l5pc_network.py --hay --n-cells 2 --tstop 100   # the same spec, detailed cells

The spec is plain NetPyNE: ``cellParams['L5PC']`` is the one line that picks the implementation
(``surrogate_cell_params(model)`` or ``hay_cell_params(morphology)``); ``popParams`` place the cells;
two NetStim populations (``bkgE``, ``bkgI``) and the L5 cells themselves connect through
``connParams`` with ``sec`` (secLists ``dendritic``, ``apical``, ``basal``), ``loc`` and ``synMech``
(``'exc'`` AMPA+NMDA, ``'inh'`` GABA_A; weights in units of the reference synapse). The background
has about the event rates of the Hay reference inputs (~8 k excitatory and ~5.5 k inhibitory events
per second per cell).

Outputs in ``--out-dir``: ``raster.png`` and ``traces.png`` (NetPyNE's own plots), ``heatmap.png``
(every segment's voltage of cell 0 vs time) and ``lfp.png`` (the surrogate population's LFP on a
16-contact laminar probe). ``--out FILE.npz`` saves spikes, cell 0's soma trace and the LFP.

Model: ``--model CKPT``, else the bundled checkpoint (``models/DEFAULT``), else an *untrained* paper-config
MMoE (a demonstration of the machinery only; a warning is printed) whose spike threshold is
calibrated so that cells fire at about ``--target-rate`` Hz.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "hay"
REFERENCE = SHARED / "reference" / "synaptic_seed1.h5"


def load_model(path=None, config="paper", seed: int = 0):
    """(model, trained?): a checkpoint, the bundled one (models/DEFAULT), or an untrained MMoE of ``config``."""
    import torch

    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate

    ckpt = Path(path) if path else bundled_checkpoint(required=False)
    if ckpt is not None:
        return load_surrogate(ckpt), True
    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.surrogate.mtl import MMoE

    if not REFERENCE.is_file():
        raise SystemExit(f"no model given, none in models/, and no reference record at {REFERENCE} "
                         "to build an untrained one: pass --model CKPT")
    torch.manual_seed(seed)
    rec = read_record(REFERENCE, require=("segments", "synapses", "v_1ms"))
    model = MMoE.from_config(config, n_segments=642, n_channels=1278)
    v = np.asarray(rec["v_1ms"], np.float64)
    model.set_normalization(v.mean(1), v.std(1))
    model.meta = dict(segments=rec["segments"], synapses=rec["synapses"], dt_ms=1.0)
    return model, False


def build_spec(args, cell_rule):
    """netParams, simConfig of the network (the same for surrogate and detailed cells)."""
    from netpyne import specs

    from lfdeep_neuron.cosim.netpyne import add_syn_mechs, record_surrogate_lfp

    net = specs.NetParams()
    net.sizeX, net.sizeY, net.sizeZ = 400.0, 100.0, 400.0
    net.cellParams["L5PC"] = cell_rule                                    # the one line to swap
    add_syn_mechs(net)                                                    # 'exc', 'inh'
    net.popParams["L5"] = {"cellType": "L5PC", "numCells": args.n_cells, "yRange": [0.0, 100.0]}
    net.popParams["bkgE"] = {"cellModel": "NetStim", "numCells": args.n_bkg_exc, "rate": args.bkg_rate,
                             "noise": 1.0, "start": 0.0}
    net.popParams["bkgI"] = {"cellModel": "NetStim", "numCells": args.n_bkg_inh, "rate": args.bkg_rate,
                             "noise": 1.0, "start": 0.0}
    net.connParams["bkgE->L5"] = {"preConds": {"pop": "bkgE"}, "postConds": {"pop": "L5"},
                                  "convergence": args.conv_exc, "sec": "dendritic", "loc": 0.5,
                                  "synMech": "exc", "weight": 1.0, "delay": 1.0}
    net.connParams["bkgI->L5"] = {"preConds": {"pop": "bkgI"}, "postConds": {"pop": "L5"},
                                  "convergence": args.conv_inh, "sec": "dendritic", "loc": 0.5,
                                  "synMech": "inh", "weight": 1.0, "delay": 1.0}
    net.connParams["L5->L5 apical"] = {"preConds": {"pop": "L5"}, "postConds": {"pop": "L5"},
                                       "probability": args.p_rec, "sec": "apical", "loc": 0.5,
                                       "synMech": "exc", "weight": args.w_rec, "delay": 2.0}
    net.connParams["L5->L5 basal"] = {"preConds": {"pop": "L5"}, "postConds": {"pop": "L5"},
                                      "probability": args.p_rec, "sec": "basal", "loc": 0.5,
                                      "synMech": "exc", "weight": args.w_rec, "delay": 1.5}

    cfg = specs.SimConfig()
    cfg.duration = args.tstop
    cfg.dt = 0.025
    cfg.hParams["v_init"] = -76.0
    cfg.recordStep = 0.5
    cfg.recordCells = [0]
    cfg.recordTraces = {"V_soma": {"sec": "soma", "loc": 0.5, "var": "v"},
                        "V_apic36": {"sec": "apic[36]", "loc": 0.5, "var": "v"}}
    cfg.seeds = {"conn": args.seed, "stim": args.seed, "loc": args.seed, "cell": args.seed}
    cfg.verbose = False
    cfg.printPopAvgRates = True
    cfg.saveJson = cfg.savePickle = False
    cfg.gatherOnlySimData = False
    if not args.hay:
        record_surrogate_lfp(cfg, pops=["L5"])
    if args.out_dir and not args.no_figures:
        out = Path(args.out_dir)
        cfg.analysis["plotRaster"] = {"saveFig": str(out / "raster.png"), "showFig": False,
                                      "orderInverse": True}
        cfg.analysis["plotTraces"] = {"include": [0], "saveFig": str(out / "traces.png"), "showFig": False,
                                      "overlay": True, "oneFigPer": "cell"}
    return net, cfg


def heatmap_figure(path, t_ms, v_mV, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = np.array([n.split("[")[0] for n in names])
    fig, ax = plt.subplots(figsize=(9, 5))
    im = ax.imshow(v_mV, aspect="auto", origin="lower", cmap="viridis",
                   extent=(t_ms[0], t_ms[-1], -0.5, len(names) - 0.5))
    for kind in ("dend", "apic", "axon"):
        first = np.flatnonzero(kinds == kind)
        if len(first):
            ax.axhline(first[0] - 0.5, color="w", lw=0.6)
            ax.text(t_ms[0], first[0] + 2, {"dend": "basal", "apic": "apical", "axon": "axon"}[kind],
                    color="w", fontsize=8, va="bottom")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("segment (canonical order: soma, basal, apical, axon)")
    ax.set_title("cell 0: surrogate voltage of every segment")
    fig.colorbar(im, ax=ax, label="v (mV)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lfp_figure(path, lfp):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = lfp["t_ms"] >= 5.0                                             # skip the start-up transient
    t, xyz = lfp["t_ms"][keep], lfp["electrodes_um"]
    raw = lfp["lfp_mV"][keep].T * 1e3                                     # [E, T] µV (lfp_mV is [T, E])
    dc = raw.mean(axis=1)
    phi = raw - dc[:, None]                                               # fluctuations around the time mean
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 5), gridspec_kw={"width_ratios": [1.3, 1, 0.45]})
    lim = np.nanmax(np.abs(phi)) or 1.0
    im = a.imshow(phi, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                  extent=(t[0], t[-1], xyz[0, 1] - 50, xyz[-1, 1] + 50))
    a.set_xlabel("time (ms)")
    a.set_ylabel("contact y (µm)")
    a.set_title("population LFP minus time mean (t >= 5 ms)")
    fig.colorbar(im, ax=a, label="µV")
    spacing = 1.2 * lim
    for e in range(phi.shape[0]):
        b.plot(t, phi[e] + e * spacing, lw=0.7, color="k")
    b.set_yticks(np.arange(phi.shape[0]) * spacing, [f"{y:.0f}" for y in xyz[:, 1]])
    b.set_xlabel("time (ms)")
    b.set_ylabel("contact y (µm), traces offset")
    b.set_title(f"per contact (offset {spacing:.2g} µV)")
    c.plot(dc, xyz[:, 1], "o-", color="tab:blue", ms=3)
    c.axvline(0, color="0.7", lw=0.5)
    c.set_xlabel("time mean (µV)")
    c.set_title("static part")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="surrogate checkpoint (default: the bundled models/DEFAULT, else untrained)")
    p.add_argument("--untrained-config", default="paper", help="config of the untrained fallback model")
    p.add_argument("--hay", action="store_true", help="detailed HayL5PCs instead of surrogates (same spec)")
    p.add_argument("--morphology", default=str(SHARED / "cell1.asc"), help="Hay cell1.asc (--hay, LFP)")
    p.add_argument("--n-cells", type=int, default=20)
    p.add_argument("--tstop", type=float, default=300.0, help="ms")
    p.add_argument("--n-bkg-exc", type=int, default=400, help="excitatory background NetStims")
    p.add_argument("--n-bkg-inh", type=int, default=300, help="inhibitory background NetStims")
    p.add_argument("--bkg-rate", type=float, default=40.0, help="rate of each background NetStim (Hz)")
    p.add_argument("--conv-exc", type=int, default=200, help="excitatory background inputs per cell")
    p.add_argument("--conv-inh", type=int, default=140, help="inhibitory background inputs per cell")
    p.add_argument("--p-rec", type=float, default=0.3, help="recurrent connection probability (apical, basal)")
    p.add_argument("--w-rec", type=float, default=3.0, help="recurrent weight (reference-synapse units)")
    p.add_argument("--threshold", type=float, default=None, help="spike-logit threshold (default: a trained "
                   "checkpoint's calibrated metrics['spike_threshold_logit'], else 0; calibrated for an untrained model)")
    p.add_argument("--target-rate", type=float, default=10.0, help="Hz, for the calibrated threshold")
    p.add_argument("--calibrate", action="store_true", help="calibrate the threshold for a given model too")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", default="out/netpyne_l5pc", help="where figures go")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--out", default=None, help="save spikes, cell 0's soma trace and the LFP (.npz)")
    args = p.parse_args(argv)

    import lfdeep_neuron  # noqa: F401  (MPI set-up before NetPyNE touches NEURON)
    from netpyne import sim

    from lfdeep_neuron.cosim.netpyne import hay_cell_params, surrogate_cell_params, surrogate_lfp
    from lfdeep_neuron.parallel import parallel_context

    pc = parallel_context()
    rank = int(pc.id())
    if args.out_dir and not args.no_figures and rank == 0:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.hay:
        rule, trained, threshold = hay_cell_params(args.morphology), None, None
    else:
        model, trained = load_model(args.model, args.untrained_config, args.seed)
        if args.threshold is not None:
            threshold = args.threshold
        elif trained and not args.calibrate:
            from lfdeep_neuron.cosim.engine import default_spike_threshold

            threshold = default_spike_threshold(model)     # the checkpoint's calibrated one, else 0
        else:
            import torch

            from lfdeep_neuron.recurrent_network import calibrate_threshold

            rates = np.zeros(1278)
            rates[:639] = args.conv_exc * args.bkg_rate * 1e-3 / 639
            rates[639:] = args.conv_inh * args.bkg_rate * 1e-3 / 639
            threshold = calibrate_threshold(model, rates, args.target_rate,
                                            dtype=torch.float64 if args.dtype == "float64" else None)
        rule = surrogate_cell_params(model, spike_threshold=threshold, dtype=args.dtype)
        if rank == 0 and not trained:
            print("WARNING: no trained surrogate (models/ or --model): using an UNTRAINED "
                  f"{args.untrained_config} MMoE; its voltages are meaningless (spike threshold calibrated "
                  f"to {threshold:.4g} for ~{args.target_rate:g} Hz)")
    net, cfg = build_spec(args, rule)

    t0 = time.perf_counter()
    sim.create(netParams=net, simConfig=cfg)
    heat = None
    if not args.hay:                                  # all segments of cell 0, wherever it lives
        cell0 = next((c for c in sim.net.cells if c.gid == 0), None)
        if cell0 is not None:
            heat = cell0.engine.record(cells=[cell0.surrogate])
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim.simulate()
    t_run = time.perf_counter() - t0
    sim.analyze()

    if heat is not None and args.out_dir and not args.no_figures:
        heatmap_figure(Path(args.out_dir) / "heatmap.png", heat.t_ms, heat.v_mV[0],
                       np.asarray(cell0.engine.segments["name"]).astype(str))
    if rank == 0:
        spkt = np.asarray(sim.allSimData["spkt"], np.float64)
        spkid = np.asarray(sim.allSimData["spkid"], np.int64)
        l5 = spkid < args.n_cells
        kind = "HayL5PC (detailed)" if args.hay else ("surrogate checkpoint" if trained else "UNTRAINED surrogate")
        print(f"{args.n_cells} L5PCs [{kind}] on {int(pc.nhost())} rank(s): build {t_build:.1f} s, "
              f"run {args.tstop:g} ms in {t_run:.1f} s; {int(l5.sum())} L5 spikes "
              f"({l5.sum() / args.n_cells / args.tstop * 1e3:.1f} Hz)")
        lfp = None if args.hay else surrogate_lfp(sim)
        if lfp is not None:
            rms = np.std(lfp["lfp_mV"], axis=0) * 1e3                    # per contact ([T, E])
            print("LFP RMS per contact (µV, y = -300 .. 1200 µm): " + " ".join(f"{r:.2f}" for r in rms))
            if args.out_dir and not args.no_figures:
                lfp_figure(Path(args.out_dir) / "lfp.png", lfp)
        if args.out:
            v0 = np.asarray(sim.allSimData["V_soma"]["cell_0"], np.float64)
            extra = {} if lfp is None else {"lfp_mV": lfp["lfp_mV"], "lfp_t_ms": lfp["t_ms"]}
            np.savez(args.out, spkt=spkt, spkid=spkid, v_soma_cell0=v0,
                     t_ms=np.asarray(sim.allSimData["t"], np.float64), threshold=np.float64(threshold or 0.0),
                     **extra)
            print(f"wrote {args.out}")
        if args.out_dir and not args.no_figures:
            print(f"figures in {args.out_dir}")
    pc.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    from lfdeep_neuron.parallel import parallel_context

    parallel_context().done()
    sys.exit(code)
