"""A recurrent network of deep-surrogate L5PCs (optionally mixed with detailed HayL5PCs) in NEURON.

    python examples/network.py                       # 20 surrogates, 200 ms
    mpiexec -n 2 python examples/network.py          # the same network on 2 ranks: same spikes
    python examples/network.py --n-cells 100 --tstop 500 --model models/<checkpoint>.pt
    python examples/network.py --n-detailed 2        # cells 0 and 1 are detailed HayL5PCs

The network lives in the package (:mod:`lfdeep_neuron.recurrent_network`, also behind
``lfdeep-neuron demo``): each cell gets ``--n-stims`` Poisson NetStims (Random123 streams keyed by
gid), each on one random dendritic synapse addressed by (section, x, kind) exactly as for a HayL5PC,
and ``--k-rec`` recurrent inputs from random other cells through ``pc.gid_connect`` (delay 1-3 ms >=
one surrogate step). All randomness is seeded per target gid, so 1 rank and N ranks build the same
network.

Model: ``--model CKPT`` or the bundled checkpoint (``models/DEFAULT``); without one, an *untrained* tiny
MMoE (predictions are meaningless: a demo of the machinery) whose spike threshold is calibrated
on a probe run so that cells fire at about ``--target-rate`` Hz.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lfdeep_neuron  # noqa: F401  (MPI set-up before NEURON is imported)
from lfdeep_neuron.recurrent_network import (N_DENDRITIC, Network, build_network,  # noqa: F401 (re-exported)
                                             calibrate_threshold, configure_parser, input_plan,
                                             input_rates_per_ms, load_model, recurrent_plan, run_network,
                                             simulate)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "hay" / "reference" / "synaptic_seed1.h5"
MORPHOLOGY = REPO.parent / "shared" / "hay" / "cell1.asc"


def _hay_tables(morphology=None):
    """Segment and channel tables: from the Hay reference record, else from a HayL5PC."""
    if REFERENCE.is_file():
        from lfdeep_neuron.data.records import read_record

        rec = read_record(REFERENCE, require=("segments", "synapses"))
        return rec["segments"], rec["synapses"]
    from lfdeep_neuron.hay import HayL5PC

    cell = HayL5PC(morphology, synapses=False)
    return cell.segment_table(), cell.synapse_table()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure_parser(p)
    p.add_argument("--out", default=None, help="write spikes (and soma voltages) to this .npz")
    p.set_defaults(untrained=True)
    args = p.parse_args(argv)
    if args.morphology is None and MORPHOLOGY.is_file():
        args.morphology = str(MORPHOLOGY)

    from lfdeep_neuron.parallel import parallel_context

    run_network(args, out_npz=args.out)
    parallel_context().done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
