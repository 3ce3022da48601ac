"""Ground-truth generation throughput: simulated seconds per wall hour with 1 and 2 worker processes,
and bytes per simulated second of the records (float32 voltages; float16 for comparison).

    python benchmarks/generation.py [--duration-ms 300] [--sims-per-worker 2] [--integrator fixed]

Workers are started and their Hay cells built before the clock starts (steady-state throughput: a long
generation pays the start-up once). Each simulation runs the published input generator, the detailed
cell and writes its compressed record, exactly as ``lfdeep-neuron generate`` does. The machine's load
average and the share of a core each worker actually got (CPU time / wall time) are printed too: other
processes on the same cores lower both figures and the speed-up.
"""
from __future__ import annotations

import argparse
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
from lfdeep_neuron.data.records import read_record, write_record


_BARRIER = None


def _init(cfg_dict, barrier):
    global _BARRIER
    _BARRIER = barrier
    simulate._worker_init(cfg_dict)


def _ready(_):
    _BARRIER.wait()  # returns once every worker holds one of these tasks: all cells are built
    return os.getpid()


def throughput(cfg: simulate.GenerationConfig, workers: int, n_sims: int) -> tuple[float, list[dict]]:
    """Simulated seconds per wall hour of ``workers`` processes running ``n_sims`` simulations."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    with ctx.Pool(workers, initializer=_init, initargs=(asdict(cfg), barrier)) as pool:
        pids = set(pool.map(_ready, range(workers), chunksize=1))
        assert len(pids) == workers, "a worker did not start"
        t0 = time.perf_counter()
        timings = list(pool.imap_unordered(simulate._worker_run, range(n_sims), chunksize=1))
        wall = time.perf_counter() - t0
    return n_sims * cfg.duration_ms / 1000.0 / wall * 3600.0, timings


def cpu_share_of(timings) -> float:
    """CPU time / wall time of the simulations: the share of a core each worker obtained."""
    return float(np.sum([t["cpu_s"] for t in timings]) / np.sum([t["total_s"] for t in timings]))


def _kernel(n_iter: int) -> float:
    """A CPU-bound, cache-resident workload without NEURON: a pure-Python loop plus small numpy updates
    (the shape of a cable solver's per-step work on ~640 compartments)."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(n_iter * 2000):
        acc += i * i % 7
    v = np.zeros(642)
    a = np.linspace(0.1, 0.9, 642)
    for _ in range(n_iter * 20):
        v = a * v + (1 - a) * np.tanh(v + 0.1)
    return time.perf_counter() - t0


def machine_speedup(n_iter: int = 1000) -> float:
    """2-vs-1-process throughput of :func:`_kernel` on this machine: the ceiling any 2-worker CPU job sees."""
    ctx = mp.get_context("spawn")
    walls = {}
    for w in (1, 2):
        with ctx.Pool(w) as pool:
            pool.map(_kernel, [1] * w)                       # warm up the processes
            t0 = time.perf_counter()
            pool.map(_kernel, [n_iter] * (2 * w), chunksize=1)
            walls[w] = time.perf_counter() - t0
    return 2 * walls[1] / walls[2]


def storage(record: Path, tmp: Path) -> dict:
    """Bytes of a record, of its per-simulation-time part, and with float16 voltages."""
    rec = read_record(record, require=("imem_mean_1ms",))
    sim_s = rec.attrs["duration_ms"] / 1000.0
    with h5py.File(record) as f:
        static = 0
        for g in ("segments", "sections", "synapses"):
            sizes = []
            f[g].visititems(lambda _, o: sizes.append(o.id.get_storage_size()) if isinstance(o, h5py.Dataset) else None)
            static += sum(sizes)
        parts = {k: f[k].id.get_storage_size() for k in ("v_1ms", "imem_mean_1ms", "v_soma_0p1ms")}
    kw = rec.write_kwargs()
    kw["traces"] = dict(kw["traces"], v_1ms=rec["v_1ms"].astype(np.float16))
    f16 = write_record(tmp / "float16.h5", **kw)
    err = rec["v_1ms"].astype(np.float16).astype(np.float64) - rec["v_1ms"]
    total = record.stat().st_size
    return {"bytes": total, "static_bytes": static, "sim_s": sim_s, "parts": parts,
            "bytes_float16_v": f16.stat().st_size,
            "f16_rmse_mV": float(np.sqrt(np.mean(err**2))), "f16_max_mV": float(np.abs(err).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--morphology", default=os.environ.get("LFDEEP_HAY_MORPHOLOGY",
                                                          str(Path(__file__).resolve().parents[2] / "shared/hay/cell1.asc")))
    p.add_argument("--duration-ms", type=int, default=300)
    p.add_argument("--sims-per-worker", type=int, default=2)
    p.add_argument("--integrator", choices=("cvode", "fixed"), default="fixed")
    p.add_argument("--no-machine-baseline", action="store_true",
                   help="skip the NEURON-free 2-vs-1-process speed-up of this machine")
    args = p.parse_args(argv)
    if not Path(args.morphology).is_file():
        print(f"morphology not found: {args.morphology} (set --morphology or $LFDEEP_HAY_MORPHOLOGY)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.duration_ms}-ms simulations, integrator {args.integrator}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rates, shares = {}, {}
        for workers in (1, 2):
            cfg = simulate.GenerationConfig(morphology=args.morphology, out_dir=str(tmp / f"w{workers}"),
                                            n_sims=workers * args.sims_per_worker, duration_ms=args.duration_ms,
                                            integrator=args.integrator)
            Path(cfg.out_dir).mkdir(parents=True)
            rate, timings = throughput(cfg, workers, cfg.n_sims)
            rates[workers] = rate
            shares[workers] = workers * cpu_share_of(timings)
            per_sim = np.mean([t["total_s"] for t in timings])
            cpu_share = cpu_share_of(timings)
            print(f"{workers} worker{'s' if workers > 1 else ''}: {rate:8.1f} simulated s per wall hour "
                  f"({per_sim:.1f} s wall per {args.duration_ms}-ms simulation; each worker got "
                  f"{cpu_share:.0%} of a core; load {os.getloadavg()[0]:.2f})")
        print(f"speed-up 2 vs 1 worker: {rates[2] / rates[1]:.2f}x")
        per_core = {w: rates[w] / shares[w] for w in rates}
        print(f"per core actually obtained: {per_core[1]:.1f} (1 worker) and {per_core[2]:.1f} (2 workers) simulated s "
              f"per core-hour; parallel efficiency {per_core[2] / per_core[1]:.2f} (estimated speed-up on {os.cpu_count()} "
              f"otherwise idle cores would be ~{2 * per_core[2] / per_core[1]:.2f}x)")
        if not args.no_machine_baseline:
            m = machine_speedup()
            print(f"this machine's own 2-vs-1-process speed-up on a NEURON-free CPU-bound kernel: {m:.2f}x "
                  f"(the ceiling for any 2-worker job here); generation reaches "
                  f"{rates[2] / rates[1] / m:.0%} of it")
        st = storage(simulate.record_path(tmp / "w1", 0), tmp)
        per_s = st["bytes"] / st["sim_s"]
        stream = (st["bytes"] - st["static_bytes"]) / st["sim_s"]
        print(f"bytes per simulated second: {per_s / 1e6:.2f} MB as measured ({st['bytes'] / 1e6:.2f} MB per "
              f"{args.duration_ms}-ms record, {st['static_bytes'] / 1e3:.0f} kB of it the cell's tables); "
              f"{stream / 1e6:.2f} MB per simulated s without the tables (the rate for long records)")
        parts = ", ".join(f"{k} {v / st['sim_s'] / 1e6:.2f}" for k, v in st["parts"].items())
        print(f"  per simulated s (MB): {parts}")
        saved = (st["bytes"] - st["bytes_float16_v"]) / st["sim_s"]
        print(f"float16 v_1ms: RMSE {st['f16_rmse_mV']:.4f} mV, max {st['f16_max_mV']:.4f} mV, "
              f"saves {saved / 1e6:.2f} MB per simulated s ({saved * st['sim_s'] / st['bytes']:.0%} of the record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
