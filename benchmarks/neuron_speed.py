"""NEURON speed of one detailed Hay L5PC under the synaptic protocol, CVODE vs fixed step.

Replays the reference's effective input events (``shared/hay/reference/synaptic_seed1.h5``) with
each integrator, ``--repeats`` times (median reported), and prints

* wall seconds per simulated second (= ms of wall time per cell per simulated ms: the same ratio,
  the unit later benchmarks compare surrogate steps against);
* integrator steps per simulated ms;
* accuracy against the reference traces over the same window: all-segment RMSE of ``v_1ms`` (mV),
  soma RMSE, and the somatic spikes.

Usage::

    python benchmarks/neuron_speed.py [--duration-ms 3000] [--repeats 3] [--dt-ms 0.025 0.05] [--cn] [--json out.json]

One core, nothing else running, for numbers worth quoting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = REPO.parent / "shared" / "hay" / "reference" / "synaptic_seed1.h5"
DEFAULT_MORPHOLOGY = REPO.parent / "shared" / "hay" / "cell1.asc"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--morphology", type=Path,
                   default=Path(os.environ.get("LFDEEP_HAY_MORPHOLOGY", DEFAULT_MORPHOLOGY)))
    p.add_argument("--duration-ms", type=float, default=3000.0, help="simulated time per run (ms)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dt-ms", type=float, nargs="*", default=[0.025], help="fixed steps to time (ms)")
    p.add_argument("--atol", type=float, default=1e-3, help="CVODE absolute tolerance")
    p.add_argument("--cn", action="store_true", help="also time fixed-step Crank-Nicolson at each --dt-ms")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from lfdeep_neuron.hay import HayL5PC, run_cell

    with h5py.File(args.reference, "r") as f:
        syn, t = f["input_effective/syn_idx"][()], f["input_effective/t_ms"][()]
        T = int(args.duration_ms)
        if T > f["v_1ms"].shape[1]:
            p.error(f"--duration-ms {T} exceeds the reference's {f['v_1ms'].shape[1]} ms")
        v_ref = f["v_1ms"][:, :T].astype(np.float64)
        spikes_ref = f["soma_spike_times_ms"][()]
    spikes_ref = spikes_ref[spikes_ref < T]
    keep = t < T
    cell = HayL5PC(args.morphology)
    cell.set_input_events(syn[keep], t[keep])
    print(f"one Hay L5PC, {keep.sum()} input events in {T} ms, median of {args.repeats} runs "
          f"(reference spikes: {np.round(spikes_ref, 2).tolist()})")

    configs = [("cvode", dict(integrator="cvode", atol=args.atol))]
    configs += [(f"fixed dt={dt:g}", dict(integrator="fixed", dt_ms=dt)) for dt in args.dt_ms]
    if args.cn:
        configs += [(f"CN dt={dt:g}", dict(integrator="fixed_cn", dt_ms=dt)) for dt in args.dt_ms]
    results = []
    header = (f"{'integrator':<16}{'wall s / sim s':>15}{'steps/ms':>10}{'RMSE all mV':>13}"
              f"{'RMSE soma mV':>14}  spikes (ms)")
    print(header)
    for label, kw in configs:
        walls, out = [], None
        for _ in range(args.repeats):
            out = run_cell(cell, T, **kw)
            walls.append(out["wall_s"])
        ratio = statistics.median(walls) / (T / 1000.0)
        dv = out["v_1ms"].astype(np.float64) - v_ref
        row = dict(integrator=label, wall_s_per_sim_s=ratio, ms_per_cell_per_sim_ms=ratio,
                   wall_s_runs=walls, steps_per_ms=out["integrator_steps"] / T,
                   rmse_all_mV=float(np.sqrt(np.mean(dv ** 2))), rmse_soma_mV=float(np.sqrt(np.mean(dv[0] ** 2))),
                   spikes_ms=out["soma_spike_times_ms"].tolist(), duration_ms=T)
        results.append(row)
        print(f"{label:<16}{ratio:>15.2f}{row['steps_per_ms']:>10.2f}{row['rmse_all_mV']:>13.4f}"
              f"{row['rmse_soma_mV']:>14.4f}  {np.round(row['spikes_ms'], 2).tolist()}")
    for row in results:
        print(f"{row['integrator']}: {row['ms_per_cell_per_sim_ms']:.3f} ms per cell per simulated ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
