"""Streaming inference speed of the surrogates against NEURON, on this machine, in one run.

For every architecture (MH, MMoE, MMoEEx) and configuration (``paper``, ``fast``; Hay sizes: 1278
synaptic channels + 642 fed-back voltages in, 643 tasks out), every population size N (1, 10, 100, 1000)
and every device setting (CPU with 1 and 2 torch threads; CUDA when present), times
``Streamer.step`` in closed loop (the co-simulation regime: the streamer feeds its own voltages back)
on Poisson inputs at the data's event rate, and reports

* seconds per step and **cell-steps per second** (one cell-step = one cell advanced by 1 ms);
* the **speed-up over NEURON**: NEURON's cost of N cells for 1 ms on the same cores (the measured cost of
  one Hay cell per simulated ms under CVODE x N / cores; cells are independent, so perfect scaling over
  the cores is assumed for NEURON) divided by the surrogate's time per step;
* a table in the shape of the paper's Table 1: N neurons x simulated time {100, 1000} ms -> seconds;
* the streaming state per cell (causal convolution rings + fed-back voltages).

NEURON's cost is measured here by running one HayL5PC on the reference's effective synaptic inputs with
CVODE (atol 1e-3, as the data) for ``--neuron-ms`` ms (``shared/hay/reference/synaptic_seed1.h5``), or
given with ``--neuron-ms-per-ms``.

Usage::

    python benchmarks/inference.py                        # defaults: ~3-5 min on 2 cores
    python benchmarks/inference.py --archs mmoe --configs paper --n-cells 1000 --threads 1 --device cuda
    python benchmarks/inference.py --neuron-ms-per-ms 30 --json bench.json
    python benchmarks/inference.py --model models/l5pc_spike_lstm_mh_history_128_16k_own.pt --device cuda \
        --n-cells 1000 10000 --neuron-ms-per-ms 9        # a trained checkpoint; no NEURON needed

Timings on a shared machine are noisy; each cell of the table is the median over repeated steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = REPO.parent / "shared" / "hay" / "reference" / "synaptic_seed1.h5"
DEFAULT_MORPHOLOGY = REPO.parent / "shared" / "hay" / "cell1.asc"
EVENT_RATE_PER_CHANNEL_MS = 0.0105   # the reference: 40 287 events / 3000 ms / 1278 channels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["mh", "mmoe", "mmoeex"])
    p.add_argument("--configs", nargs="+", default=["paper", "fast"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override for every model timed, e.g. --set channels=64 (repeatable)")
    p.add_argument("--model", type=Path, default=None,
                   help="time this checkpoint (e.g. the bundled model, with its spike rule and threshold) instead "
                        "of the untrained --archs x --configs")
    p.add_argument("--n-cells", nargs="+", type=int, default=[1, 10, 100, 1000])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch CPU thread counts to time")
    p.add_argument("--device", nargs="+", default=["auto"], help="'auto' (cpu + cuda if present), cpu, cuda")
    p.add_argument("--budget-s", type=float, default=0.6, help="target timed seconds per measurement")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--neuron-ms", type=float, default=300.0, help="simulated ms of the NEURON timing run")
    p.add_argument("--neuron-ms-per-ms", type=float, default=None,
                   help="NEURON wall ms per cell per simulated ms (skip the NEURON run)")
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--morphology", type=Path,
                   default=Path(os.environ.get("LFDEEP_HAY_MORPHOLOGY", DEFAULT_MORPHOLOGY)))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="streamer dtype on CUDA (CPU always float32)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def neuron_cost_ms_per_ms(reference: Path, morphology: Path, duration_ms: float) -> dict:
    """Wall ms per simulated ms of one Hay L5PC (CVODE, atol 1e-3) on the reference's effective inputs."""
    import h5py

    from lfdeep_neuron.hay import HayL5PC, run_cell

    with h5py.File(reference, "r") as f:
        syn, t = f["input_effective/syn_idx"][()], f["input_effective/t_ms"][()]
    T = int(duration_ms)
    keep = t < T
    t_build = time.perf_counter()
    cell = HayL5PC(morphology)
    cell.set_input_events(syn[keep], t[keep])
    t_build = time.perf_counter() - t_build
    out = run_cell(cell, T, integrator="cvode")
    return {"ms_per_cell_per_ms": 1000.0 * out["wall_s"] / T, "duration_ms": T, "wall_s": out["wall_s"],
            "events": int(keep.sum()), "integrator_steps": int(out.get("integrator_steps", -1)),
            "build_s": t_build, "spikes": int(np.size(out["soma_spike_times_ms"]))}


def time_streamer(model, n_cells: int, device: str, dtype, budget_s: float, min_steps: int, max_steps: int):
    """Median seconds per closed-loop step of ``n_cells`` cells, and the state bytes per cell."""
    import torch

    from lfdeep_neuron.surrogate.metrics import default_spike_threshold

    st = model.streamer(n_cells, device=device, feedback=True, output="mV", dtype=dtype,
                        spike_threshold=default_spike_threshold(model))
    g = torch.Generator().manual_seed(0)
    n_in = 8   # a few distinct input columns, cycled
    x = torch.poisson(torch.full((n_in, n_cells, model.n_channels), EVENT_RATE_PER_CHANNEL_MS), generator=g)
    x = x.to(device=device, dtype=st.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for i in range(2):                    # warm-up (allocations, kernels)
            st.step(x[i % n_in])
        sync()
        t0 = time.perf_counter()
        st.step(x[2 % n_in])
        sync()
        first = time.perf_counter() - t0
        n = int(np.clip(budget_s / max(first, 1e-6), min_steps, max_steps))
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            st.step(x[i % n_in])
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), n, st.state_bytes_per_cell()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from lfdeep_neuron.surrogate.mtl import build_model
    from lfdeep_neuron.surrogate.train import parse_overrides

    overrides = parse_overrides(args.set, "--set")
    if args.model is not None:       # one trained checkpoint, named by its file; loaded before NEURON's timing
        from lfdeep_neuron.errors import InputError
        from lfdeep_neuron.surrogate.checkpoint import load_surrogate

        if args.set:
            raise InputError(f"{args.model}: --set changes an untrained model's config; a checkpoint is timed "
                             "as trained")
        model = load_surrogate(args.model).eval()
        models = [(model.arch, args.model.stem, model)]

    # -- NEURON -------------------------------------------------------------------------------------------
    torch.set_num_threads(1)
    if args.neuron_ms_per_ms is not None:
        neuron = {"ms_per_cell_per_ms": float(args.neuron_ms_per_ms), "source": "--neuron-ms-per-ms"}
    else:
        print(f"NEURON: one HayL5PC, CVODE, {args.neuron_ms:g} ms of the reference inputs ...", flush=True)
        neuron = neuron_cost_ms_per_ms(args.reference, args.morphology, args.neuron_ms)
        neuron["source"] = "measured in this run"
    c_nrn = neuron["ms_per_cell_per_ms"] / 1000.0     # s per cell per simulated ms, one core
    print(f"NEURON: {neuron['ms_per_cell_per_ms']:.2f} ms wall per cell per simulated ms ({neuron['source']})")

    # -- device settings ------------------------------------------------------------------------------------
    settings = []   # (label, device, threads, cores for the NEURON comparison)
    devices = args.device
    if "auto" in devices:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        if d == "cpu":
            settings += [(f"cpu {t} thr", "cpu", t, t) for t in args.threads]
        elif d.startswith("cuda"):
            if not torch.cuda.is_available():
                print("CUDA requested but not available: skipped")
                continue
            settings.append((f"{torch.cuda.get_device_name(0)} ({args.dtype})", d, 1, 1))
    dtype_gpu = getattr(torch, args.dtype)

    if args.model is None:
        models = []
        for config in args.configs:
            for arch in args.archs:
                torch.manual_seed(0)
                models.append((arch, config, build_model(arch, config, **overrides).eval()))

    rows = []
    for arch, config, model in models:
        n_par = model.num_parameters()
        for label, device, threads, cores in settings:
            torch.set_num_threads(threads)
            m = model.to(device)
            for N in args.n_cells:
                dt = dtype_gpu if device != "cpu" else None
                try:
                    s, n, state = time_streamer(m, N, device, dt, args.budget_s, args.min_steps, args.max_steps)
                except RuntimeError as err:     # e.g. out of memory
                    print(f"{arch} {config} {label} N={N}: {err}")
                    continue
                nrn_s = c_nrn * N / cores      # NEURON: N cells for 1 ms on the same cores
                row = dict(arch=arch, config=config, params=n_par, setting=label, device=device,
                           threads=threads, n_cells=N, s_per_step=s, steps_timed=n,
                           cell_steps_per_s=N / s, speedup_vs_neuron=nrn_s / s, state_bytes_per_cell=state)
                rows.append(row)
                print(f"{arch:>7} {config:>6} {label:>24} N={N:>5}: {1e3 * s:9.3f} ms/step  "
                      f"{N / s:12.0f} cell-steps/s  x{nrn_s / s:9.1f} vs NEURON  "
                      f"state {state / 1024:.1f} KiB/cell", flush=True)
            model.to("cpu")

    # -- tables -----------------------------------------------------------------------------------------
    print()
    print(f"NEURON (HayL5PC, CVODE atol 1e-3): {neuron['ms_per_cell_per_ms']:.2f} ms per cell per simulated ms "
          f"(one core; {neuron['source']}).")
    print()
    print("| arch | config | params | setting | N | ms / step | cell-steps / s | speed-up vs NEURON (same cores) "
          "| state / cell |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['config']} | {r['params'] / 1e6:.2f}M | {r['setting']} | {r['n_cells']} | "
              f"{1e3 * r['s_per_step']:.3f} | {r['cell_steps_per_s']:,.0f} | {r['speedup_vs_neuron']:,.1f}x | "
              f"{r['state_bytes_per_cell'] / 1024:.1f} KiB |")

    print()
    print("Table 1 shape: seconds to simulate N neurons for 100 / 1000 ms (surrogate: N x steps; "
          "NEURON: measured per-cell cost x N, one core)")
    settings_seen = list(dict.fromkeys(r["setting"] for r in rows))
    for setting in settings_seen:
        sub = [r for r in rows if r["setting"] == setting]
        combos = list(dict.fromkeys((r["arch"], r["config"]) for r in sub))
        print()
        print(f"{setting}:")
        print("| N neurons | sim ms | NEURON (1 core) s | " + " | ".join(f"{a} {c} s" for a, c in combos) + " |")
        print("|---:|---:|---:|" + "---:|" * len(combos))
        for N in args.n_cells:
            for T in (100, 1000):
                cells = []
                for a, c in combos:
                    hit = [r for r in sub if r["arch"] == a and r["config"] == c and r["n_cells"] == N]
                    cells.append(f"{hit[0]['s_per_step'] * T:.3g}" if hit else "-")
                print(f"| {N} | {T} | {c_nrn * N * T:.3g} | " + " | ".join(cells) + " |")

    if args.json:
        args.json.write_text(json.dumps({"neuron": neuron, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from lfdeep_neuron.cli import BAD_INPUT, EXIT_BAD_INPUT

    try:
        sys.exit(main())
    except BAD_INPUT as err:                        # a wrong checkpoint or --set: one line, as the CLI does
        print(f"inference.py: error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
