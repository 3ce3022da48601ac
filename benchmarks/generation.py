"""Ground-truth generation: the previous default against the new one, on this machine, in one run.

    python benchmarks/generation.py [--duration-ms 2000] [--sims-per-worker 1] [--paths] [--json out.json]

1. **Throughput on 2 cores with every training field** (``v_1ms``, bin-mean ``imem_mean_1ms``, the soma's
   0.1-ms trace, spikes, inputs): simulated seconds per wall hour of ``lfdeep-neuron generate``'s own
   workers (2 processes, cells built before the clock starts), for

   * the previous default: CVODE atol 1e-3 on NEURON (the published integrator), ``i_membrane_``
     recorded at every step, float32 records;
   * the new default: Crank-Nicolson dt 0.05 ms on CoreNEURON, v recorded, currents ``-L v_mean``,
     compact float16 records;

   and their ratio, plus bytes per simulated second of each.
2. **Accuracy of the new default** against the recordings of the published implementation
   (``shared/hay/reference``): all-segment RMSE of ``v_1ms`` and every somatic spike's time difference on
   ``synaptic_seed1``; spike counts on both current steps.
3. ``--paths``: the same accuracy figures and the CPU seconds per simulated second per cell of every
   candidate solve (CVODE, backward Euler, Crank-Nicolson at dt 0.025 / 0.05 / 0.1 ms, NEURON or
   CoreNEURON, 1 or 4 cells in one process), each in its own process.

The load average is printed: other processes on the same cores slow every figure (ratios measured in the
same run are the robust ones).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from lfdeep_neuron.data import simulate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "hay"
REFERENCES = ("synaptic_seed1", "step_0p619", "step_0p793")

PREVIOUS = dict(integrator="cvode", engine="neuron", storage="float32", imem_source="recorded")
NEW = dict(integrator="fixed_cn", dt_ms=0.05, engine="coreneuron", storage="compact", imem_source="laplacian")

# ----------------------------------------------------------------------------------------------------
# 1. throughput of generate's own workers
# ----------------------------------------------------------------------------------------------------

_SIM = None
_BARRIER = None


def _init(cfg_dict, barrier):
    global _SIM, _BARRIER
    os.environ["OMP_NUM_THREADS"] = "1"
    _BARRIER = barrier
    _SIM = simulate.Simulator(simulate.GenerationConfig(**cfg_dict))


def _ready(_):
    _BARRIER.wait()  # returns once every worker holds one of these tasks: all cells are built
    return os.getpid()


def _run(index):
    return _SIM.run_and_write(index)


def throughput(cfg: simulate.GenerationConfig, workers: int) -> tuple[float, list[dict]]:
    """Simulated seconds per wall hour of ``workers`` processes running ``cfg.n_sims`` simulations."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    with ctx.Pool(workers, initializer=_init, initargs=(asdict(cfg), barrier)) as pool:
        pids = set(pool.map(_ready, range(workers), chunksize=1))
        assert len(pids) == workers, "a worker did not start"
        t0 = time.perf_counter()
        timings = list(pool.imap_unordered(_run, range(cfg.n_sims), chunksize=1))
        wall = time.perf_counter() - t0
    return cfg.n_sims * cfg.duration_ms / 1000.0 / wall * 3600.0, timings


def record_bytes(path: Path) -> dict:
    """Bytes of a record per simulated second: all of it, and without the cell's fixed tables."""
    with h5py.File(path) as f:
        sim_s = float(f.attrs["duration_ms"]) / 1000.0
        static = []
        for g in ("segments", "sections", "synapses"):
            f[g].visititems(lambda _, o: static.append(o.id.get_storage_size()) if isinstance(o, h5py.Dataset) else None)
        parts = {k: f[k].id.get_storage_size() / sim_s for k in ("v_1ms", "imem_mean_1ms", "v_soma_0p1ms")}
        parts["inputs"] = sum(f[g][k].id.get_storage_size() for g in ("input", "input_effective")
                              for k in ("syn_idx", "t_ms")) / sim_s
    total = path.stat().st_size
    return {"per_s": total / sim_s, "stream_per_s": (total - sum(static)) / sim_s, "parts_per_s": parts}


# ----------------------------------------------------------------------------------------------------
# 2./3. accuracy and CPU cost of one solve path (run in a fresh process: one mechanism build each)
# ----------------------------------------------------------------------------------------------------

def _load_reference(name: str) -> dict:
    with h5py.File(SHARED / "reference" / f"{name}.h5") as f:
        ref = {"attrs": dict(f.attrs), "v": f["v_1ms"][()].astype(np.float64),
               "spikes": f["soma_spike_times_ms"][()]}
        if "input_effective" in f:
            ref["events"] = (f["input_effective/syn_idx"][()], f["input_effective/t_ms"][()])
    return ref


def _path_worker(spec: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    from lfdeep_neuron import mechanisms

    mechanisms.load(coreneuron=spec["engine"] == "coreneuron")
    from lfdeep_neuron.hay import HayL5PC, run_cell

    run = dict(integrator=spec["integrator"], dt_ms=spec.get("dt_ms", 0.025), engine=spec["engine"])
    out = {}
    if spec.get("accuracy", True):
        for name in REFERENCES:
            ref = _load_reference(name)
            cell = HayL5PC(spec["morphology"], synapses="events" in ref)
            if "events" in ref:
                cell.set_input_events(*ref["events"])
            else:
                a = ref["attrs"]
                cell.add_iclamp(float(a["step_amp_nA"]), float(a["step_delay_ms"]), float(a["step_dur_ms"]))
            res = run_cell(cell, ref["v"].shape[1], **run)
            got = res["soma_spike_times_ms"]
            out[name] = {"rmse_mV": float(np.sqrt(np.mean((res["v_1ms"] - ref["v"]) ** 2))),
                         "n_spikes": int(len(got)), "n_spikes_ref": int(len(ref["spikes"])),
                         "spike_dt_ms": [float(np.min(np.abs(got - s))) if len(got) else None for s in ref["spikes"]]}
            del cell
    # speed: n cells with the reference's synaptic inputs (shifted per cell), all simulated together
    ref = _load_reference("synaptic_seed1")
    syn, t = ref["events"]
    T = spec["speed_ms"]
    cells = []
    for k in range(spec["n_cells"]):
        c = HayL5PC(spec["morphology"])
        tk = t + 200.0 * k
        keep = tk < T
        c.set_input_events(syn[keep], tk[keep])
        cells.append(c)
    c0 = time.process_time()
    run_cell(cells[0], T, bin_means=True, **run)
    out["cpu_s_per_sim_s_per_cell"] = (time.process_time() - c0) / (T / 1000.0) / spec["n_cells"]
    if spec.get("overhead"):
        # the same solve with nothing recorded, in the same process (alternating, best of 2 each)
        bare, recorded = [], []
        for _ in range(2):
            bare.append(_bare_solve(T, run))
            c0 = time.process_time()
            run_cell(cells[0], T, bin_means=True, **run)
            recorded.append(time.process_time() - c0)
        out["bare_cpu_s"], out["recorded_cpu_s"] = min(bare), min(recorded)
    return out


def _bare_solve(T: int, run: dict) -> float:
    """CPU seconds of the solve alone (no Vector recorded, no harvest), with run_cell's integrator settings."""
    from neuron import coreneuron, h

    cvode = h.CVode()
    cvode.active(0)
    cvode.cache_efficient(1)
    h.dt, h.secondorder = run["dt_ms"], 2 if run["integrator"] == "fixed_cn" else 0
    pc = h.ParallelContext()
    core = run["engine"] == "coreneuron"
    coreneuron.enable = core
    if core:
        pc.set_maxstep(10)
    h.finitialize(-76.0)
    c0 = time.process_time()
    if core:
        for stop in np.arange(1000.0, T + 1.0, 1000.0):        # run_cell's chunks of 1 s
            pc.psolve(stop + 0.5 * run["dt_ms"])
    else:
        while h.t < T - 0.5 * run["dt_ms"]:
            h.fadvance()
    cpu = time.process_time() - c0
    coreneuron.enable = False
    return cpu


def solve_path(spec: dict) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_path_worker, (spec,))


def _fmt_accuracy(acc: dict) -> str:
    s = acc["synaptic_seed1"]
    dts = ", ".join(f"{d:.3f}" if d is not None else "missing" for d in s["spike_dt_ms"])
    steps = ", ".join(f"{acc[n]['n_spikes']}/{acc[n]['n_spikes_ref']}" for n in REFERENCES[1:])
    return (f"all-segment RMSE {s['rmse_mV']:.3f} mV, spikes {s['n_spikes']}/{s['n_spikes_ref']} "
            f"(|dt| {dts} ms); current steps {steps} spikes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--morphology", default=os.environ.get("LFDEEP_HAY_MORPHOLOGY", str(SHARED / "cell1.asc")))
    p.add_argument("--duration-ms", type=int, default=2000, help="length of each throughput simulation")
    p.add_argument("--sims-per-worker", type=int, default=1)
    p.add_argument("--paths", action="store_true", help="also the per-path table (accuracy and cost of each solve)")
    p.add_argument("--skip-throughput", action="store_true", help="only the accuracy / recording-cost parts")
    p.add_argument("--speed-ms", type=int, default=1000, help="simulated ms of each path's speed run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not Path(args.morphology).is_file():
        print(f"morphology not found: {args.morphology} (set --morphology or $LFDEEP_HAY_MORPHOLOGY)", file=sys.stderr)
        return 2
    if not (SHARED / "reference").is_dir():
        print(f"reference recordings not found in {SHARED / 'reference'}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {"load_before": os.getloadavg()[0]}
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}; 2 workers, "
          f"{args.sims_per_worker} x {args.duration_ms}-ms simulations each")
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        if args.skip_throughput:
            rates = None
        for name, settings in (() if rates is None else (("previous default", PREVIOUS), ("new default", NEW))):
            cfg = simulate.GenerationConfig(morphology=args.morphology, out_dir=str(Path(tmp) / name.split()[0]),
                                            n_sims=2 * args.sims_per_worker, duration_ms=args.duration_ms,
                                            seed=5, **settings)
            Path(cfg.out_dir).mkdir(parents=True)
            rate, timings = throughput(cfg, 2)
            rates[name] = rate
            cpu = np.sum([t["cpu_s"] for t in timings]) / (cfg.n_sims * cfg.duration_ms / 1000.0)
            size = record_bytes(simulate.record_path(cfg.out_dir, 0))
            results[name] = {"settings": settings, "sim_s_per_wall_hour": rate, "cpu_s_per_sim_s": cpu, **size}
            parts = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in size["parts_per_s"].items())
            print(f"{name:>16}: {rate:8.1f} simulated s per wall hour on 2 cores ({cpu:.2f} CPU s per simulated s; "
                  f"load {os.getloadavg()[0]:.2f}); {size['stream_per_s'] / 1e6:.2f} MB per simulated s "
                  f"({size['per_s'] / 1e6:.2f} with the cell's tables in a {args.duration_ms}-ms record; {parts})")
        if rates is not None:
            ratio = rates["new default"] / rates["previous default"]
            results["ratio"] = ratio
            print(f"new / previous default: {ratio:.2f}x simulated seconds per wall hour")
    spec = dict(morphology=args.morphology, speed_ms=args.speed_ms, n_cells=1, overhead=True, **NEW)
    spec = {k: v for k, v in spec.items() if k not in ("storage", "imem_source")}
    acc = solve_path(spec)
    results["new_default_accuracy"] = acc
    print(f"new default vs the published implementation: {_fmt_accuracy(acc)}")
    print(f"recording (v of every segment each step, bin means, 0.1-ms soma, spikes) on the new default's solve: "
          f"{acc['recorded_cpu_s']:.2f} against {acc['bare_cpu_s']:.2f} CPU s bare for {args.speed_ms} ms "
          f"(+{100 * (acc['recorded_cpu_s'] / acc['bare_cpu_s'] - 1):.0f} %)")
    if args.paths:
        print(f"\nper path ({args.speed_ms}-ms speed runs; accuracy against shared/hay/reference):")
        table = []
        paths = [dict(integrator="cvode", engine="neuron", n_cells=1),
                 dict(integrator="fixed", dt_ms=0.025, engine="neuron", n_cells=1)]
        paths += [dict(integrator="fixed_cn", dt_ms=dt, engine="neuron", n_cells=1) for dt in (0.025, 0.05, 0.1)]
        paths += [dict(integrator="fixed_cn", dt_ms=0.05, engine="coreneuron", n_cells=1),
                  dict(integrator="fixed_cn", dt_ms=0.05, engine="neuron", n_cells=4, accuracy=False),
                  dict(integrator="fixed_cn", dt_ms=0.05, engine="coreneuron", n_cells=4, accuracy=False)]
        for path in paths:
            res = solve_path(dict(morphology=args.morphology, speed_ms=args.speed_ms, **path))
            label = (f"{path['integrator']}" + (f" dt {path['dt_ms']}" if "dt_ms" in path else " atol 1e-3")
                     + f", {path['engine']}, {path['n_cells']} cell{'s' if path['n_cells'] > 1 else ''}/process")
            line = f"  {label:<42} {res['cpu_s_per_sim_s_per_cell']:6.2f} CPU s per simulated s per cell"
            if "synaptic_seed1" in res:
                line += f"; {_fmt_accuracy(res)}"
            print(line, flush=True)
            table.append({"path": path, **res})
        results["paths"] = table
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
