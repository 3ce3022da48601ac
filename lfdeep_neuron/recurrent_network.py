"""A recurrent network of deep-surrogate L5PCs (optionally mixed with detailed HayL5PCs) in plain NEURON.

The network behind ``lfdeep-neuron demo`` and ``examples/network.py``. Each cell gets ``n_stims``
Poisson NetStims (Random123 streams keyed by gid: the inputs do not depend on how cells are spread
over ranks), each on one random dendritic synapse addressed by (section, x, kind) exactly as for a
HayL5PC, and ``k_rec`` recurrent inputs from random other cells through ``pc.gid_connect`` (delay
1-3 ms >= one surrogate step). All randomness is seeded per target gid, so 1 rank and N ranks build
the same network and give the same spikes.

Model: a checkpoint, the bundled one (``bundled_checkpoint()``), or, with ``untrained=True`` and a
Hay morphology for the segment tables, an *untrained* tiny MMoE (predictions meaningless: a demo of
the machinery) whose spike threshold is then calibrated so that cells fire at about the target rate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["N_DENDRITIC", "load_model", "calibrate_threshold", "Network", "input_plan", "recurrent_plan",
           "build_network", "input_rates_per_ms", "simulate", "configure_parser", "run_network", "save_npz"]

#: Dendritic segments of the Hay cell that carry one excitatory and one inhibitory synapse each.
N_DENDRITIC = 639


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def load_model(path=None, morphology=None, untrained: bool = False, seed: int = 0):
    """(model, trained?) -- a checkpoint, else the bundled one, else (``untrained``) a tiny MMoE.

    Parameters
    ----------
    path : str or Path, optional
        Surrogate checkpoint. Default: :func:`~lfdeep_neuron.surrogate.checkpoint.bundled_checkpoint`.
    morphology : str or Path, optional
        Hay ``cell1.asc``; only for the untrained fallback (its segment and channel tables).
    untrained : bool
        Without a checkpoint, build an untrained tiny MMoE instead of raising
        :class:`~lfdeep_neuron.surrogate.checkpoint.NoBundledModelError`.
    """
    import torch

    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate

    ckpt = Path(path) if path else bundled_checkpoint(required=not untrained)
    if ckpt is not None:
        return load_surrogate(ckpt), True
    from lfdeep_neuron.hay import HayL5PC
    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(seed)
    model = MMoE.from_config("tiny", n_segments=642, n_channels=2 * N_DENDRITIC)
    cell = HayL5PC(morphology, synapses=False)
    model.meta = dict(segments=cell.segment_table(), synapses=cell.synapse_table(), dt_ms=1.0)
    return model, False


def calibrate_threshold(model, rate_in_per_ms: np.ndarray, target_rate_hz: float, dtype=None,
                        n_cells: int = 8, duration_ms: int = 300, warmup_ms: int = 50, seed: int = 0) -> float:
    """Spike threshold giving about ``target_rate_hz`` under Poisson input of the given rates.

    ``rate_in_per_ms`` [1278]: expected events per ms on each channel. Deterministic (seeded,
    single process), so every rank computes the same value. The engine emits one spike per upward
    crossing; the candidate whose crossing count is closest to the target wins.
    """
    import torch

    from lfdeep_neuron.surrogate.metrics import spike_onsets

    rng = np.random.default_rng(seed)
    kw = {} if dtype is None else {"dtype": dtype}
    st = model.streamer(n_cells, device="cpu", feedback=True, output="mV", **kw)
    logits = []
    with torch.inference_mode():
        for t in range(duration_ms):          # causal stepping: one step per ms, all cells batched
            x = rng.poisson(rate_in_per_ms, size=(n_cells, len(rate_in_per_ms)))
            _, lg = st.step(torch.as_tensor(x, dtype=dtype or torch.float32))
            if t >= warmup_ms:
                logits.append(lg.double().numpy())
    lg = np.stack(logits, axis=1)                                           # [n_cells, T]
    target = target_rate_hz * 1e-3 * model.meta.get("dt_ms", 1.0) * lg.size
    cands = np.unique(np.quantile(lg, np.linspace(0.5, 1.0, 401)))
    counts = spike_onsets(lg[None] > cands[:, None, None]).sum(axis=(1, 2))  # crossings per candidate
    return float(cands[np.argmin(np.abs(counts - target))])


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

@dataclass
class Network:
    """What :func:`build_network` made on this rank (keep it alive while simulating)."""
    cells: dict = field(default_factory=dict)        # gid -> SurrogateL5PC / HayL5PC
    stims: list = field(default_factory=list)
    netcons: list = field(default_factory=list)
    spike_t: object = None
    spike_gid: object = None
    n_cells: int = 0


def input_plan(gid: int, n_stims: int, frac_inh: float, seed: int):
    """Per-cell input sites: dendritic segment (0..638) and kind of each NetStim (seeded by gid)."""
    rng = np.random.default_rng([seed, gid, 1])
    seg = rng.integers(0, N_DENDRITIC, n_stims)
    inh = rng.random(n_stims) < frac_inh
    return seg, inh


def recurrent_plan(gid: int, n_cells: int, k_rec: int, frac_inh: float, seed: int):
    """Per-cell recurrent inputs: source gids, dendritic segments, kinds, delays (ms, 1-3)."""
    rng = np.random.default_rng([seed, gid, 2])
    k = min(k_rec, n_cells - 1)
    others = np.delete(np.arange(n_cells), gid)
    src = rng.choice(others, size=k, replace=False) if k > 0 else np.zeros(0, int)
    seg = rng.integers(0, N_DENDRITIC, k)
    inh = rng.random(k) < frac_inh
    delay = np.round(rng.uniform(1.0, 3.0, k), 1)
    return src, seg, inh, delay


def build_network(engine, n_cells: int = 20, n_stims: int = 64, stim_rate_hz: float = 100.0,
                  k_rec: int = 10, w_rec: float = 3.0, frac_inh: float = 0.25, seed: int = 1,
                  detailed=(), morphology=None, pc=None) -> Network:
    """Build this rank's share (gid % nhost == rank) of the recurrent network.

    Parameters
    ----------
    engine : SurrogateEngine
    n_cells : int
        Total cells (gids 0..n_cells-1).
    n_stims, stim_rate_hz : Poisson NetStims per cell and their rate (Hz); one synapse each.
    k_rec, w_rec : recurrent inputs per cell and their weight (reference-synapse units).
    frac_inh : fraction of inhibitory synapses (inputs and recurrent).
    detailed : gids that are detailed HayL5PCs instead of surrogates.
    """
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateL5PC, connect

    pc = pc or engine.pc
    rank, nhost = int(pc.id()), int(pc.nhost())
    names = np.asarray(engine.segments["name"]).astype(str)
    xs = np.asarray(engine.segments["x"], np.float64)
    detailed = set(detailed)
    net = Network(n_cells=n_cells)
    for gid in range(rank, n_cells, nhost):
        if gid in detailed:
            from lfdeep_neuron.hay import HayL5PC

            cell = HayL5PC(morphology, position_um=(gid * 50.0, 0.0, 0.0))
            pc.set_gid2node(gid, rank)
            nc = cell.spike_netcon()
            pc.cell(gid, nc)
            net.netcons.append(nc)
        else:
            cell = SurrogateL5PC(engine=engine, gid=gid, position_um=(gid * 50.0, 0.0, 0.0))
        net.cells[gid] = cell
    for gid, cell in net.cells.items():
        seg, inh = input_plan(gid, n_stims, frac_inh, seed)
        for j in range(n_stims):
            ns = h.NetStim()
            ns.interval = 1000.0 / stim_rate_hz
            ns.number = 1e9
            ns.start = 0.0
            ns.noise = 1.0
            ns.noiseFromRandom123(gid, j, seed)
            s = 1 + int(seg[j])                      # canonical segment of dendritic segment seg[j]
            syn = cell.synapse(names[s], xs[s], "inh" if inh[j] else "exc")
            net.stims.append(ns)
            net.netcons.append(connect(ns, syn, weight=1.0, delay=1.0))
        src, seg, inh, delay = recurrent_plan(gid, n_cells, k_rec, frac_inh, seed)
        for j in range(len(src)):
            s = 1 + int(seg[j])
            syn = cell.synapse(names[s], xs[s], "inh" if inh[j] else "exc")
            net.netcons.append(connect(int(src[j]), syn, weight=w_rec, delay=float(delay[j]), pc=pc))
    net.spike_t, net.spike_gid = h.Vector(), h.Vector()
    pc.spike_record(-1, net.spike_t, net.spike_gid)
    return net


def input_rates_per_ms(n_stims: int, stim_rate_hz: float, frac_inh: float) -> np.ndarray:
    """Mean events per ms on each of the 1278 channels under the network's Poisson drive."""
    rate = np.zeros(2 * N_DENDRITIC)
    per_syn = n_stims * stim_rate_hz * 1e-3 / N_DENDRITIC
    rate[:N_DENDRITIC] = per_syn * (1 - frac_inh)
    rate[N_DENDRITIC:] = per_syn * frac_inh
    return rate


def simulate(net: Network, tstop_ms: float, pc, v_init_mV: float = -76.0, dt_ms: float = 0.05,
             integrator: str = "fixed_cn"):
    """Simulate with ``pc.psolve``; return all spikes (gid, t_ms) sorted, on every rank.

    The default solve is the ground truth's (Crank–Nicolson, dt 0.05 ms, v_init -76 mV:
    :data:`lfdeep_neuron.equivalence.GROUND_TRUTH_SOLVER`), so detailed cells in the network behave as the
    cells the surrogates learned from; ``integrator='fixed'`` is NEURON's backward Euler.
    """
    from neuron import h

    if integrator not in ("fixed", "fixed_cn"):
        raise ValueError(f"integrator must be 'fixed' or 'fixed_cn', got {integrator!r}")
    h.secondorder = 2 if integrator == "fixed_cn" else 0
    h.dt = dt_ms
    pc.set_maxstep(10.0)
    h.finitialize(v_init_mV)
    pc.psolve(tstop_ms)
    local = (np.asarray(net.spike_gid, np.int64), np.asarray(net.spike_t))
    parts = pc.py_allgather(local)
    gid = np.concatenate([p[0] for p in parts])
    t = np.concatenate([p[1] for p in parts])
    order = np.lexsort((gid, t))
    return gid[order], t[order]


# ---------------------------------------------------------------------------------------------
# Command line (examples/network.py and lfdeep-neuron demo)
# ---------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    import argparse

    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def configure_parser(p, n_cells: int = 20, tstop_ms: float = 200.0) -> None:
    """The network's options (shared by ``examples/network.py`` and ``lfdeep-neuron demo``)."""
    p.add_argument("--n-cells", type=_positive_int, default=n_cells)
    p.add_argument("--tstop", type=_positive_float, default=tstop_ms, help="simulated time (ms)")
    p.add_argument("--model", default=None, help="surrogate checkpoint (default: the bundled one)")
    p.add_argument("--untrained", action="store_true",
                   help="without --model and bundled model, use an untrained tiny MMoE (needs --morphology)")
    p.add_argument("--n-stims", type=int, default=64, help="Poisson NetStims per cell")
    p.add_argument("--stim-rate", type=float, default=100.0, help="rate of each NetStim (Hz)")
    p.add_argument("--k-rec", type=int, default=10, help="recurrent inputs per cell")
    p.add_argument("--w-rec", type=float, default=3.0, help="recurrent weight (reference-synapse units)")
    p.add_argument("--threshold", type=float, default=None, help="spike-logit threshold (default: a trained "
                   "checkpoint's calibrated metrics['spike_threshold_logit'], else 0; calibrated for an untrained model)")
    p.add_argument("--target-rate", type=float, default=10.0, help="Hz, for the calibrated threshold")
    p.add_argument("--calibrate", action="store_true", help="calibrate the threshold for a trained model too")
    p.add_argument("--n-detailed", type=int, default=0, help="the first K gids are detailed HayL5PCs")
    p.add_argument("--morphology", default=None, help="Hay cell1.asc for detailed cells (or $LFDEEP_HAY_MORPHOLOGY)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=1)


def run_network(args, out_npz=None) -> dict:
    """Build and simulate the network described by ``args`` (see :func:`configure_parser`).

    Prints a summary on rank 0; with ``out_npz`` rank 0 writes spikes (``spike_gid``,
    ``spike_t_ms``), every cell's soma voltage (``soma_gid``, ``soma_v_mV``, ``t_ms``) and the
    threshold. Returns the same dict on rank 0 (spikes only on the other ranks).
    """
    import torch

    from lfdeep_neuron.cosim import SurrogateEngine
    from lfdeep_neuron.cosim.engine import default_spike_threshold
    from lfdeep_neuron.parallel import parallel_context

    pc = parallel_context()
    rank, nhost = int(pc.id()), int(pc.nhost())
    dtype = torch.float64 if args.dtype == "float64" else None
    model, trained = load_model(args.model, args.morphology, untrained=args.untrained)
    rates = input_rates_per_ms(args.n_stims, args.stim_rate, 0.25)
    if args.threshold is not None:
        threshold = float(args.threshold)
    elif trained and not args.calibrate:
        threshold = default_spike_threshold(model)     # the checkpoint's calibrated one, else 0
    else:
        threshold = calibrate_threshold(model, rates, args.target_rate, dtype=dtype)
    engine = SurrogateEngine.get(model, device=args.device, spike_threshold=threshold, dtype=dtype)
    t0 = time.perf_counter()
    net = build_network(engine, args.n_cells, n_stims=args.n_stims, stim_rate_hz=args.stim_rate,
                        k_rec=args.k_rec, w_rec=args.w_rec, seed=args.seed,
                        detailed=range(args.n_detailed), morphology=args.morphology, pc=pc)
    rec = engine.record(segments="soma")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    gid, t = simulate(net, args.tstop, pc)
    t_run = time.perf_counter() - t0
    result = {"spike_gid": gid, "spike_t_ms": t, "threshold": threshold}
    if rank == 0:
        kind = "trained" if trained else f"UNTRAINED tiny (threshold calibrated to {threshold:.6g})"
        print(f"{args.n_cells} cells ({args.n_detailed} detailed) on {nhost} rank(s), model: {kind}")
        print(f"build {t_build:.2f} s, run {args.tstop:g} ms in {t_run:.2f} s; "
              f"forward passes on rank 0: {engine.n_forward}")
        rate = len(t) / max(args.n_cells, 1) / (args.tstop * 1e-3)
        print(f"{len(t)} spikes, mean rate {rate:.1f} Hz; first spikes (gid, t ms): "
              + ", ".join(f"({g}, {tt:.3f})" for g, tt in list(zip(gid, t))[:8]))
    parts = pc.py_gather((rec.gid, rec.v_mV[:, 0, :] if rec.v_mV.size else rec.v_mV), 0)
    if rank == 0:
        result.update(soma_gid=np.concatenate([p[0] for p in parts]),
                      soma_v_mV=np.concatenate([p[1] for p in parts]), t_ms=rec.t_ms)
        if out_npz is not None:
            save_npz(out_npz, result)
            print(f"wrote {out_npz}")
    pc.barrier()
    return result


def save_npz(path, arrays: dict) -> None:
    """``np.savez`` to a temporary name next to ``path``, then rename (no half-written file)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
