"""Co-simulation benchmark: surrogate networks of N = 10, 100, 1000 cells vs detailed HayL5PCs.

    python benchmarks/network.py                         # N = 10 100 1000, paper MMoE, Hay N = 2
    python benchmarks/network.py --sizes 10 100 --tstop 100 --config fast --hay-n 2 --json out.json

For every N (each in a fresh process, so memory is measured cleanly) it reports

* wall seconds per simulated second of the recurrent network of ``examples/network.py`` (Poisson
  NetStim drive, ``pc.gid_connect`` recurrence, fixed step dt = 0.025 ms, ``pc.psolve``);
* the engine's split of that time: event intake (read + clear of the intake buffer), forward pass,
  spike emission, recording, other engine bookkeeping, and NEURON itself (everything outside the
  engine's callback: integration, NetStims, event delivery -- including the C intake of each event);
* the *bare* forward pass: the same streamer stepped alone on the same inputs, outside NEURON, and
  the engine overhead (callback time minus forward pass) as a fraction of it (target <= 5% at
  N = 1000);
* resident memory per surrogate instance (RSS growth for N instances after finitialize and a first
  step, divided by N: artificial cell, NetCon, intake row, streaming state, Python objects);
* and, for the detailed HayL5PC in the same network for a small N, wall seconds per simulated
  second, scaled per cell-second (N cells x simulated seconds), and the ratio Hay / surrogate.

``--model CKPT`` times that checkpoint (e.g. the bundled model); without it an untrained ``--arch`` /
``--config`` (timing does not depend on the weights). Either way the spike threshold is calibrated
so that cells fire at about ``--rate`` Hz, as a trained model would. Long runs are split: each size
simulates ``--tstop`` ms (a few steps are enough: the cost per step is constant).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def load_example():
    """``examples/network.py`` as a module (its network builder is what we measure)."""
    import importlib.util

    name = "lfdeep_example_network"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "network.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _model(arch: str, config: str, path: str | None = None):
    """The surrogate to time: the checkpoint ``path`` when given, else an untrained ``arch``/``config``."""
    import torch

    from lfdeep_neuron.surrogate import mtl

    if path:
        from lfdeep_neuron.surrogate.checkpoint import load_surrogate

        return load_surrogate(path)

    _hay_tables = load_example()._hay_tables
    torch.manual_seed(0)
    model = mtl.build_model(arch, config, n_segments=642, n_channels=1278)   # the Hay cell
    segments, synapses = _hay_tables()
    model.meta = dict(segments=segments, synapses=synapses, dt_ms=1.0)
    return model


def _drive(args):
    return dict(n_stims=args.n_stims, stim_rate_hz=args.stim_rate, k_rec=args.k_rec)


def bench_surrogate(args) -> dict:
    """One N in this process: memory, bare forward pass, network run."""
    import torch

    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC
    from lfdeep_neuron.parallel import parallel_context

    example = load_example()

    torch.set_num_threads(1)
    pc = parallel_context()
    n = args.single
    model = _model(args.arch, args.config, args.model)
    h.load_file("stdrun.hoc")
    h.dt = 0.025

    # -- resident memory per instance --------------------------------------------------------
    eng = SurrogateEngine(model, device=args.device, spike_threshold=args.threshold)
    h.finitialize(-76.0)                      # warm NEURON / the intake with zero instances
    rss0 = rss_bytes()
    cells = [SurrogateL5PC(engine=eng) for _ in range(n)]
    h.finitialize(-76.0)
    h.continuerun(2.0)                        # step 1 (the first forward pass) allocates the workspace
    rss1 = rss_bytes()
    stream_state = eng._stream.state_bytes_per_cell() if hasattr(eng._stream, "state_bytes_per_cell") else None
    del cells
    SurrogateEngine.close_all()

    # -- bare forward pass on the network's input statistics ----------------------------------
    cpu = time.process_time                   # CPU time: robust to other jobs sharing the cores
    rates = example.input_rates_per_ms(args.n_stims, args.stim_rate, 0.25)
    rng = np.random.default_rng(0)
    xs = [torch.as_tensor(rng.poisson(rates, size=(n, len(rates))), dtype=torch.float32, device=eng.device)
          for _ in range(4)]
    st = model.streamer(n, device=eng.device, feedback=True, output="mV")
    with torch.inference_mode():
        for k in range(3):
            st.step(xs[k % 4])
        n_bare = max(3, min(50, int(args.tstop)))
        w0, c0 = time.perf_counter(), cpu()
        for k in range(n_bare):
            v, lg = st.step(xs[k % 4])
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        bare_wall, bare_cpu = (time.perf_counter() - w0) / n_bare, (cpu() - c0) / n_bare
    del st

    # -- the network ----------------------------------------------------------------------------
    eng = SurrogateEngine(model, device=args.device, spike_threshold=args.threshold, intake=args.intake)
    eng.clock = cpu
    t0 = time.perf_counter()
    net = example.build_network(eng, n, seed=1, pc=pc, **_drive(args))
    t_build = time.perf_counter() - t0
    cb = {"total": 0.0}
    step = eng._step

    def timed_step():                          # whole-callback CPU time, to find "other" engine work
        c = cpu()
        try:
            step()
        finally:
            cb["total"] += cpu() - c

    eng._step = timed_step
    h.dt = 0.025
    pc.set_maxstep(10)
    h.finitialize(-76.0)
    w0, c0 = time.perf_counter(), cpu()
    pc.psolve(args.tstop)
    wall, total = time.perf_counter() - w0, cpu() - c0
    timers = dict(eng.timers)
    steps = eng.n_steps
    n_spikes = len(net.spike_t)
    n_events = args.n_stims * args.stim_rate * 1e-3 * n + n_spikes * args.k_rec / max(args.tstop, 1)
    engine_total = cb["total"]
    other = engine_total - sum(timers.values())
    sim_s = args.tstop * 1e-3
    return dict(
        kind="surrogate", n=n, arch=args.arch, config=args.config, device=str(eng.device), intake=args.intake,
        dense_reads=eng.n_dense_reads,
        tstop_ms=args.tstop, steps=steps, n_forward=eng.n_forward, build_s=t_build,
        wall_s=wall, cpu_s=total, wall_per_sim_s=wall / sim_s, cpu_per_sim_s=total / sim_s,
        cpu_per_cell_sim_s=total / sim_s / n,
        cpu_per_step_ms={k: 1e3 * v / steps for k, v in timers.items()} | {
            "other_engine": 1e3 * other / steps, "neuron": 1e3 * (total - engine_total) / steps,
            "total": 1e3 * total / steps},
        bare_forward_cpu_ms=1e3 * bare_cpu, bare_forward_wall_ms=1e3 * bare_wall,
        engine_overhead_vs_bare=(engine_total - timers["forward"]) / (bare_cpu * steps),
        rss_per_instance_bytes=(rss1 - rss0) / n, stream_state_bytes_per_cell=stream_state,
        spikes=n_spikes, rate_hz=n_spikes / n / sim_s, events_per_ms=n_events)


def bench_hay(args) -> dict:
    """The same network with detailed HayL5PC cells only (fixed step, like the surrogate run)."""
    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine
    from lfdeep_neuron.parallel import parallel_context

    example = load_example()

    pc = parallel_context()
    n = args.single
    eng = SurrogateEngine(_model("mmoe", "tiny"), device="cpu")   # only for the segment tables: no instances
    morph = REPO.parent / "shared" / "hay" / "cell1.asc"
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    net = example.build_network(eng, n, seed=1, detailed=range(n), morphology=str(morph), pc=pc, **_drive(args))
    t_build = time.perf_counter() - t0
    rss1 = rss_bytes()
    h.dt = 0.025
    pc.set_maxstep(10)
    h.finitialize(-76.0)
    w0, c0 = time.perf_counter(), time.process_time()
    pc.psolve(args.hay_tstop)
    wall, total = time.perf_counter() - w0, time.process_time() - c0
    sim_s = args.hay_tstop * 1e-3
    return dict(kind="hay", n=n, tstop_ms=args.hay_tstop, build_s=t_build, wall_s=wall, cpu_s=total,
                wall_per_sim_s=wall / sim_s, cpu_per_sim_s=total / sim_s, cpu_per_cell_sim_s=total / sim_s / n,
                rss_per_cell_bytes=(rss1 - rss0) / n, spikes=len(net.spike_t))


def _child(args, n: int, kind: str, threshold: float) -> dict:
    cmd = [sys.executable, __file__, "--single", str(n), "--kind", kind, "--threshold", repr(threshold),
           "--arch", args.arch, "--config", args.config, "--tstop", str(args.tstop),
           "--hay-tstop", str(args.hay_tstop), "--n-stims", str(args.n_stims),
           "--stim-rate", str(args.stim_rate), "--k-rec", str(args.k_rec), "--intake", args.intake]
    if args.model:
        cmd += ["--model", args.model]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--arch", default="mmoe", choices=["mh", "mmoe", "mmoeex"])
    p.add_argument("--config", default="paper")
    p.add_argument("--model", default=None, help="time this checkpoint (e.g. the bundled model) instead of an "
                                                 "untrained --arch/--config")
    p.add_argument("--tstop", type=float, default=30.0, help="simulated ms per surrogate network")
    p.add_argument("--hay-n", type=int, default=2, help="detailed cells in the comparison (0: skip)")
    p.add_argument("--hay-tstop", type=float, default=100.0, help="simulated ms of the Hay network")
    p.add_argument("--n-stims", type=int, default=64)
    p.add_argument("--stim-rate", type=float, default=100.0)
    p.add_argument("--k-rec", type=int, default=10)
    p.add_argument("--rate", type=float, default=10.0, help="target firing rate (Hz) for the threshold")
    p.add_argument("--device", default=None)
    p.add_argument("--intake", default="sparse", choices=["sparse", "dense"], help="engine intake mode")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="surrogate", help=argparse.SUPPRESS)
    p.add_argument("--threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.single is not None:                     # child process: one measurement, JSON on stdout
        res = bench_hay(args) if args.kind == "hay" else bench_surrogate(args)
        print(json.dumps(res))
        return 0

    example = load_example()

    model = _model(args.arch, args.config, args.model)
    rates = example.input_rates_per_ms(args.n_stims, args.stim_rate, 0.25)
    threshold = example.calibrate_threshold(model, rates, args.rate, duration_ms=max(int(args.tstop), 30),
                                            warmup_ms=0)
    name = args.model or f"{args.arch}/{args.config} (untrained)"
    print(f"model {name} (threshold {threshold:.6g} for ~{args.rate:g} Hz); "
          f"drive: {args.n_stims} NetStims x {args.stim_rate:g} Hz + {args.k_rec} recurrent inputs per cell; "
          f"fixed step dt = 0.025 ms; torch threads 1; {args.intake} intake")
    results = []
    from tqdm.auto import tqdm

    for n in tqdm(args.sizes, desc="surrogate sizes", unit="N"):
        results.append(_child(args, n, "surrogate", threshold))
    hay = _child(args, args.hay_n, "hay", threshold) if args.hay_n > 0 else None

    print("\nCPU time of this process (robust to other jobs on the cores); wall time in the last column")
    print(f"{'N':>6} {'CPU s/sim s':>11} {'per cell-s':>10} {'intake':>7} {'forward':>8} {'emit':>6} "
          f"{'record':>6} {'other':>6} {'NEURON':>7} {'bare fwd':>8} {'overhead':>8} {'MB/inst':>7} {'Hz':>5} "
          f"{'wall s/sim s':>12}")
    print(f"{'':>6} {'':>11} {'':>10} {'ms/step':>7} {'ms/step':>8} {'ms/st':>6} {'ms/st':>6} "
          f"{'ms/st':>6} {'ms/step':>7} {'ms/step':>8} {'vs bare':>8}")
    for r in results:
        s = r["cpu_per_step_ms"]
        print(f"{r['n']:>6} {r['cpu_per_sim_s']:>11.2f} {r['cpu_per_cell_sim_s']:>10.4f} {s['intake']:>7.3f} "
              f"{s['forward']:>8.2f} {s['emit']:>6.3f} {s['record']:>6.3f} {s['other_engine']:>6.3f} "
              f"{s['neuron']:>7.2f} {r['bare_forward_cpu_ms']:>8.2f} {100 * r['engine_overhead_vs_bare']:>7.1f}% "
              f"{r['rss_per_instance_bytes'] / 2**20:>7.3f} {r['rate_hz']:>5.1f} {r['wall_per_sim_s']:>12.2f}")
    if hay:
        print(f"\nHayL5PC x {hay['n']} (same network and drive, fixed step, {hay['tstop_ms']:g} ms): "
              f"{hay['cpu_per_sim_s']:.1f} CPU s per simulated s = {hay['cpu_per_cell_sim_s']:.2f} s per "
              f"cell-second (scaled per cell-second; wall {hay['wall_per_sim_s']:.1f} s/sim s); "
              f"{hay['rss_per_cell_bytes'] / 2**20:.1f} MB per cell")
        for r in results:
            print(f"  N = {r['n']:>5}: surrogate {r['cpu_per_cell_sim_s']:.4f} s per cell-second -> "
                  f"HayL5PC / surrogate = {hay['cpu_per_cell_sim_s'] / r['cpu_per_cell_sim_s']:.1f}")
    if len(results) >= 2:
        a, b = sorted(results, key=lambda r: r["n"])[-2:]
        grow = (b["rss_per_instance_bytes"] * b["n"] - a["rss_per_instance_bytes"] * a["n"]) / (b["n"] - a["n"])
        fixed = a["rss_per_instance_bytes"] * a["n"] - grow * a["n"]
        print(f"\nresident memory: {grow / 2**20:.3f} MB per additional instance (N = {a['n']} -> {b['n']}; "
              f"target <= 1 MB), plus ~{fixed / 2**20:.0f} MB fixed (model copy, workspace)")
    big = [r for r in results if r["n"] == max(args.sizes)]
    if big:
        r = big[0]
        verdict = "OK" if r["engine_overhead_vs_bare"] <= 0.05 else "ABOVE TARGET"
        print(f"\nengine overhead at N = {r['n']}: {100 * r['engine_overhead_vs_bare']:.1f}% of the bare forward "
              f"pass (target <= 5%): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(surrogate=results, hay=hay, threshold=threshold), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
