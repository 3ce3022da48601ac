"""``lfdeep-neuron demo``: a recurrent network of surrogate L5PCs inside NEURON.

Runs the network of :mod:`lfdeep_neuron.recurrent_network` (N SurrogateL5PC cells driven by Poisson
NetStims with recurrent connections, one batched forward pass per 1 ms step) with the bundled
checkpoint (or ``--model``), then writes the spikes and soma voltages to ``<out>/network.npz`` and a
raster with somatic voltage traces to ``<out>/demo.png``. Package code only: runs from any directory.
``--quick`` is a few cells for 50 ms (seconds).
"""
from __future__ import annotations

from pathlib import Path

from lfdeep_neuron import recurrent_network

QUICK = {"n_cells": 6, "tstop": 50.0}


def configure_parser(p):
    recurrent_network.configure_parser(p, n_cells=50, tstop_ms=500.0)
    p.add_argument("--quick", action="store_true", help=f"a tiny run: {QUICK['n_cells']} cells, "
                   f"{QUICK['tstop']:g} ms (overrides --n-cells and --tstop)")
    p.add_argument("--out", default="out/demo", help="output folder for network.npz and demo.png")


def plot(result: dict, png_path: Path, n_traces: int = 3) -> None:
    """Raster and the first ``n_traces`` soma voltages of a :func:`run_network` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax0.plot(result["spike_t_ms"], result["spike_gid"], "|k", ms=4)
    ax0.set_ylabel("cell (gid)")
    ax0.set_title("SurrogateL5PC network: somatic spikes")
    for i in range(min(n_traces, len(result["soma_gid"]))):
        ax1.plot(result["t_ms"], result["soma_v_mV"][i], lw=0.8, label=f"gid {result['soma_gid'][i]}")
    ax1.set_xlabel("time (ms)")
    ax1.set_ylabel("soma v (mV)")
    ax1.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from lfdeep_neuron.parallel import parallel_context

    if args.quick:
        args.n_cells, args.tstop = QUICK["n_cells"], QUICK["tstop"]
    out = Path(args.out)
    pc = parallel_context()
    result = recurrent_network.run_network(args, out_npz=out / "network.npz")
    if int(pc.id()) == 0:
        plot(result, out / "demo.png")
        print(f"figure: {out / 'demo.png'}")
    pc.barrier()
    return 0
