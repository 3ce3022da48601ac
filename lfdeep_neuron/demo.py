"""``lfdeep-neuron demo``: a recurrent network of surrogate L5PCs inside NEURON.

Runs ``examples/network.py`` (N SurrogateL5PC cells driven by Poisson NetStims with recurrent
connections, one batched forward pass per 1 ms step) with the bundled checkpoint in ``models/``
(or, if none is bundled, an untrained model: the machinery without meaningful predictions), then
writes a raster and somatic voltage traces to ``<out>/demo.png``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def configure_parser(p):
    p.add_argument("--n-cells", type=int, default=50)
    p.add_argument("--tstop", type=float, default=500.0, help="simulated time (ms)")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled one in models/)")
    p.add_argument("--out", default="out/demo", help="output folder for the npz and the figure")


def _load_example():
    path = REPO / "examples" / "network.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the demo runs the repository's examples/network.py")
    spec = importlib.util.spec_from_file_location("lfdeep_example_network", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def plot(npz_path: Path, png_path: Path, n_traces: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = np.load(npz_path)
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax0.plot(d["spike_t_ms"], d["spike_gid"], "|k", ms=4)
    ax0.set_ylabel("cell (gid)")
    ax0.set_title("SurrogateL5PC network: somatic spikes")
    for i in range(min(n_traces, len(d["soma_gid"]))):
        ax1.plot(d["t_ms"], d["soma_v_mV"][i], lw=0.8, label=f"gid {d['soma_gid'][i]}")
    ax1.set_xlabel("time (ms)")
    ax1.set_ylabel("soma v (mV)")
    ax1.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = _load_example()
    argv = ["--n-cells", str(args.n_cells), "--tstop", str(args.tstop), "--out", str(out / "network.npz")]
    if args.model:
        argv += ["--model", args.model]
    rc = example.main(argv)
    plot(out / "network.npz", out / "demo.png")
    print(f"figure: {out / 'demo.png'}")
    return rc
