"""``lfdeep-neuron demo``: a recurrent network of surrogate L5PCs on the input they were trained on.

Every cell gets its own background from a ground-truth generator (``--generator``, default ``excited``: the
published generator with less inhibition, part of the training corpus; one seed per gid), delivered as
NetCon events (``SurrogateL5PC.set_input_events``), plus recurrent connections (each a bundle of
``--syn-per-connection`` unit-weight synapses, delay 1–3 ms, :class:`~lfdeep_neuron.equivalence.Connectivity`).
All cells advance by one batched forward pass per millisecond. Writes ``<out>/network.npz`` (spikes and soma
voltages) and ``<out>/demo.png``: the raster of every gid, the population rate, and the soma traces of the
cells that fired most (their action potentials are the fitted waveform added at emitted spikes).

``--compare-detailed K`` also runs the first K gids as detailed ``HayL5PC`` cells (ground-truth solve) on
exactly the inputs their surrogates received — background plus the recurrent events of the surrogate
network — and overlays them (one rank only). ``--quick``: 8 cells, 400 ms. Runs under ``mpiexec`` (cells
spread over ranks by gid; identical spikes).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

QUICK = {"n_cells": 8, "tstop": 400.0}


def configure_parser(p):
    from lfdeep_neuron.data.inputs import GENERATORS

    d = " (default: %(default)s)"
    p.add_argument("--n-cells", type=int, default=50, help="cells (gids 0..N-1)" + d)
    p.add_argument("--tstop", type=float, default=1000.0, help="simulated time, ms" + d)
    p.add_argument("--model", default=None, help="surrogate checkpoint (default: the bundled one)")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="excited",
                   help="background input of every cell (a ground-truth generator)" + d)
    p.add_argument("--seed", type=int, default=1, help="backgrounds (sim_seed(seed, gid)) and connections" + d)
    p.add_argument("--k-in", type=int, default=8, help="presynaptic cells per cell" + d)
    p.add_argument("--syn-per-connection", type=int, default=5,
                   help="unit-weight synapses per connection" + d)
    p.add_argument("--compare-detailed", type=int, default=0, metavar="K",
                   help="also run the first K gids as detailed HayL5PCs on the same inputs (needs --morphology)" + d)
    p.add_argument("--morphology", default=None, help="Hay cell1.asc for --compare-detailed "
                   "(default: $LFDEEP_HAY_MORPHOLOGY)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run: {QUICK['n_cells']} cells, {QUICK['tstop']:g} ms (overrides --n-cells, --tstop)")
    p.add_argument("--out", default="out/demo", help="output folder for network.npz and demo.png" + d)


def simulate_network(model, n_cells: int, tstop_ms: float, generator: str, seed: int, conn, pc,
                     dt_ms: float = 0.05) -> dict:
    """Build this rank's share of the network, simulate, gather on every rank.

    Returns ``spike_gid``, ``spike_emit_ms`` (the engine's emission times), ``spike_t_ms`` (metric convention),
    ``soma_gid``, ``soma_v_mV`` [n, T], ``t_ms``, ``plan`` (the connections), ``n_forward``, ``run_s``.
    """
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC, connect
    from lfdeep_neuron.equivalence import GROUND_TRUTH_SOLVER, background_events
    from lfdeep_neuron.surrogate.metrics import emitted_to_metric_times

    rank, nhost = int(pc.id()), int(pc.nhost())
    engine = SurrogateEngine.get(model)
    T = int(np.ceil(tstop_ms))
    plan = conn.plan(n_cells, engine.synapses, seed=seed)
    cells = {}
    for gid in range(rank, n_cells, nhost):
        cell = SurrogateL5PC(engine=engine, gid=gid, position_um=(gid * 50.0, 0.0, 0.0))
        cell.set_input_events(*background_events(gid, engine.segments, engine.synapses, T, generator, seed))
        cells[gid] = cell
    netcons = [connect(int(s), cells[int(t)].channel_target(int(c)), weight=float(w), delay=float(d), pc=pc)
               for s, t, c, w, d in zip(plan["src"], plan["tgt"], plan["channel"], plan["weight"], plan["delay"])
               if int(t) in cells]
    rec = engine.record(segments="soma")
    spike_t, spike_gid = h.Vector(), h.Vector()
    pc.spike_record(-1, spike_t, spike_gid)
    h.load_file("stdrun.hoc")
    h.dt = dt_ms
    pc.set_maxstep(10.0)
    t0 = time.perf_counter()
    h.finitialize(GROUND_TRUTH_SOLVER["v_init_mV"])
    pc.psolve(float(tstop_ms))
    run_s = time.perf_counter() - t0
    parts = pc.py_allgather((np.asarray(spike_gid, np.int64), np.asarray(spike_t)))
    gid = np.concatenate([p[0] for p in parts])
    t = np.concatenate([p[1] for p in parts])
    order = np.lexsort((gid, t))
    vparts = pc.py_allgather((rec.gid, np.asarray(rec.v_mV)[:, 0, :]))
    sg = np.concatenate([p[0] for p in vparts])
    sv = np.concatenate([p[1] for p in vparts])
    so = np.argsort(sg)
    del netcons
    return {"spike_gid": gid[order], "spike_emit_ms": t[order],
            "spike_t_ms": emitted_to_metric_times(t[order], dt_ms, step_ms=engine.step_ms),
            "soma_gid": sg[so], "soma_v_mV": sv[so], "t_ms": np.asarray(rec.t_ms), "plan": plan,
            "n_forward": engine.n_forward, "run_s": run_s}


def replay_detailed(result: dict, gids, tstop_ms: float, generator: str, seed: int, model, morphology) -> dict:
    """The first gids as detailed cells on exactly their surrogates' inputs (background + recurrent events)."""
    from lfdeep_neuron.equivalence import NetworkSpec, background_events, run_detailed

    T = int(np.ceil(tstop_ms))
    seg, syn = model.meta["segments"], model.meta["synapses"]
    plan, events = result["plan"], {}
    for g in gids:
        s, t = background_events(g, seg, syn, T, generator, seed)
        rows = np.flatnonzero(plan["tgt"] == g)
        extra_s, extra_t = [s], [t]
        for r in rows:                             # a few hundred synapse bundles: setup, not a hot path
            fired = result["spike_emit_ms"][result["spike_gid"] == plan["src"][r]] + plan["delay"][r]
            fired = fired[fired < T]
            extra_s.append(np.full(fired.size, plan["channel"][r], np.int64))
            extra_t.append(fired)
        s, t = np.concatenate(extra_s), np.concatenate(extra_t)
        o = np.lexsort((s, t))
        events[g] = (s[o], t[o])
    return run_detailed(NetworkSpec(len(gids), T, events), morphology, progress=True)


def plot(result: dict, png_path: Path, detailed: dict | None = None, n_traces: int = 3) -> None:
    """Raster of every gid, population rate (5 ms), soma traces of the most active cells (or the compared ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lfdeep_neuron.equivalence import population_rate

    n = len(result["soma_gid"])
    T = result["soma_v_mV"].shape[1]
    fig, axes = plt.subplots(2 + n_traces, 1, figsize=(10, 3 + 1.6 * (2 + n_traces)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.2] + [1] * n_traces})
    ax = axes[0]
    ax.plot(result["spike_t_ms"], result["spike_gid"], "|", color="tab:red", ms=4, label="SurrogateL5PC")
    if detailed is not None:
        ax.plot(detailed["spike_t_ms"], detailed["gids"][np.searchsorted(detailed["gids"], detailed["spike_gid"])]
                + 0.35, "|", color="k", ms=4, label="HayL5PC, same inputs")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(-1, n)
    ax.set_ylabel("cell (gid)")
    rate = float(len(result["spike_t_ms"]) / n / (T * 1e-3))
    ax.set_title(f"{n} surrogate L5PCs, recurrent, trained-on input: {len(result['spike_t_ms'])} spikes "
                 f"({rate:.1f} Hz per cell)")
    edges = np.arange(0, T + 1e-9, 5.0)
    axes[1].plot(edges[:-1] + 2.5, population_rate(result["spike_t_ms"], n, 0, T, 5.0), color="tab:red")
    if detailed is not None:
        nd = len(detailed["gids"])
        axes[1].plot(edges[:-1] + 2.5, population_rate(detailed["spike_t_ms"], nd, 0, T, 5.0), color="k", lw=0.8)
    axes[1].set_ylabel("rate (Hz, 5 ms)")
    if detailed is not None:
        show = list(detailed["gids"][:n_traces])
    else:
        counts = np.bincount(result["spike_gid"], minlength=n)
        show = list(np.argsort(-counts, kind="stable")[:n_traces])
    t = result["t_ms"][:T]
    for ax, g in zip(axes[2:], show):
        row = int(np.searchsorted(result["soma_gid"], g))
        ax.plot(t, result["soma_v_mV"][row], color="tab:red", lw=0.8, label=f"surrogate gid {g}")
        if detailed is not None:
            drow = int(np.searchsorted(detailed["gids"], g))
            ax.plot(np.arange(detailed["soma_v_mV"].shape[1]), detailed["soma_v_mV"][drow], color="k", lw=0.6,
                    label="HayL5PC (1-ms samples)")
        ax.set_ylabel("soma mV")
        ax.legend(loc="upper right", fontsize=7)
    for ax in axes[2 + len(show):]:
        ax.axis("off")
    axes[-1].set_xlabel("time (ms)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from lfdeep_neuron.equivalence import Connectivity
    from lfdeep_neuron.errors import InputError
    from lfdeep_neuron.parallel import parallel_context
    from lfdeep_neuron.recurrent_network import save_npz
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate

    if args.quick:
        args.n_cells, args.tstop = QUICK["n_cells"], QUICK["tstop"]
    if args.n_cells < 2:
        raise InputError(f"--n-cells must be >= 2, got {args.n_cells}")
    if not (np.isfinite(args.tstop) and args.tstop > 0):
        raise InputError(f"--tstop must be > 0 ms, got {args.tstop}")
    if not 0 <= args.compare_detailed <= args.n_cells:
        raise InputError(f"--compare-detailed must lie in 0..{args.n_cells}, got {args.compare_detailed}")
    pc = parallel_context()
    if args.compare_detailed and int(pc.nhost()) > 1:
        raise InputError("--compare-detailed runs on one rank only (drop mpiexec or the option)")
    if args.compare_detailed:
        from lfdeep_neuron.hay.morphology import resolve_morphology_path

        args.morphology = resolve_morphology_path(args.morphology)    # one clear error before any work
    out = Path(args.out)
    model = load_surrogate(args.model or bundled_checkpoint(required=True))
    conn = Connectivity(k_in=args.k_in, synapses_per_connection=args.syn_per_connection)
    res = simulate_network(model, args.n_cells, args.tstop, args.generator, args.seed, conn, pc)
    if int(pc.id()) == 0:
        rate = len(res["spike_t_ms"]) / args.n_cells / (args.tstop * 1e-3)
        print(f"{args.n_cells} cells on {int(pc.nhost())} rank(s), background '{args.generator}', "
              f"{args.k_in} x {args.syn_per_connection} recurrent synapses per cell; ran {args.tstop:g} ms in "
              f"{res['run_s']:.1f} s ({res['n_forward']} forward passes on rank 0)")
        print(f"{len(res['spike_t_ms'])} spikes, {rate:.1f} Hz per cell")
    detailed = None
    if args.compare_detailed:
        from lfdeep_neuron.cosim import SurrogateEngine

        SurrogateEngine.close_all()
        detailed = replay_detailed(res, list(range(args.compare_detailed)), args.tstop, args.generator,
                                   args.seed, model, args.morphology)
        n_s = int(np.isin(res["spike_gid"], detailed["gids"]).sum())
        print(f"detailed HayL5PC replay of gids 0..{args.compare_detailed - 1}: {len(detailed['spike_t_ms'])} "
              f"spikes (their surrogates: {n_s})")
    if int(pc.id()) == 0:
        arrays = {k: v for k, v in res.items() if k != "plan"}
        if detailed is not None:
            arrays.update({f"detailed_{k}": v for k, v in detailed.items()})
        save_npz(out / "network.npz", arrays)
        plot(res, out / "demo.png", detailed)
        print(f"wrote {out / 'network.npz'}; figure: {out / 'demo.png'}")
    pc.barrier()
    return 0
