"""Co-simulation event bookkeeping: every event in the right (instance, channel, step) bin, once;
one forward pass per step per rank whatever the number of instances.

The scenario runs in a fresh process (``python this_file.py intake OUT``), on 1 rank and under
``mpiexec -n 2``: driver artificial cells with gids on both ranks fire at random times; random
NetCons (``pc.gid_connect``: many cross ranks) with random weights, channels and delays carry the
spikes to surrogate instances, plus events sent straight to the instances (``NetCon.event``). Every
rank writes the channel sums each of its instances consumed per step; the test rebuilds the
expected sums from the plan (the timing rule: an event delivered at t lands in step ceil(t); step 0
holds the events at t <= 0, cleared at t0 and not fed to the model) and requires exact equality.
Weights are multiples of 0.5 so float sums are exact in any order.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
N_CH = 1278

# -------------------------------------------------------------------------------------------------
# The scenario (shared by the test and the worker process)
# -------------------------------------------------------------------------------------------------
N_TARGETS = 5
N_DRIVERS = 6
N_CONN = 240
N_DIRECT = 60          # events sent straight to instances
TSTOP_MS = 36.0
DRIVER_GID0 = 1000


def plan(seed: int = 7) -> dict:
    """Random but reproducible: the same on every rank and in the test."""
    rng = np.random.default_rng(seed)
    spikes = {d: np.unique(rng.integers(0, 301, rng.integers(2, 8))) * 0.1 for d in range(N_DRIVERS)}
    conn = dict(driver=rng.integers(0, N_DRIVERS, N_CONN), target=rng.integers(0, N_TARGETS, N_CONN),
                channel=rng.integers(0, N_CH, N_CONN), weight=rng.integers(1, 9, N_CONN) * 0.5,
                delay=rng.integers(10, 31, N_CONN) * 0.1)
    conn["channel"][:3] = [0, N_CH - 1, 639]                  # edges of the channel range
    direct = dict(target=rng.integers(0, N_TARGETS, N_DIRECT), channel=rng.integers(0, N_CH, N_DIRECT),
                  weight=rng.integers(1, 9, N_DIRECT) * 0.5,
                  t=np.concatenate([rng.integers(0, 34, N_DIRECT // 2).astype(float),   # exact integers
                                    rng.integers(0, 340, N_DIRECT - N_DIRECT // 2) * 0.1]))
    direct["t"][:2] = 0.0                                     # events at t = 0: bin 0, cleared, not fed
    return dict(spikes=spikes, conn=conn, direct=direct)


def expected_inputs(p: dict, n_steps: int) -> np.ndarray:
    """[N_TARGETS, 1278, n_steps]: an event delivered at time t goes to step ceil(t)."""
    x = np.zeros((N_TARGETS, N_CH, n_steps))

    def put(target, channel, weight, t):
        k = int(np.ceil(t - 1e-9))
        if k < n_steps:
            x[target, channel, k] += weight

    c = p["conn"]
    for i in range(N_CONN):
        for ts in p["spikes"][int(c["driver"][i])]:
            put(c["target"][i], c["channel"][i], c["weight"][i], ts + c["delay"][i])
    d = p["direct"]
    for i in range(N_DIRECT):
        put(d["target"][i], d["channel"][i], d["weight"][i], d["t"][i])
    return x


def counting(model, calls: list):
    """Wrap ``model.streamer`` so each ``step`` call logs its batch size."""
    make = model.streamer

    def streamer(*args, **kwargs):
        st = make(*args, **kwargs)
        inner = st.step

        def step(x):
            calls.append(int(x.shape[0]))
            return inner(x)

        st.step = step
        return st

    model.streamer = streamer
    return model


def tiny_model(seed: int = 0):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(seed)
    return MMoE.from_config("tiny", n_channels=N_CH)      # 6 output segments: fast


def worker_intake(out: Path, cvode: bool = False, intake: str = "sparse") -> None:
    """Build the scenario on this rank, run it with pc.psolve, save what each instance consumed."""
    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC, connect
    from lfdeep_neuron.parallel import parallel_context

    pc = parallel_context()
    rank, nhost = int(pc.id()), int(pc.nhost())
    calls: list = []
    engine = SurrogateEngine.get(counting(tiny_model(), calls), device="cpu", intake=intake)
    p = plan()
    keep = []
    targets = {g: SurrogateL5PC(engine=engine, gid=g) for g in range(N_TARGETS) if g % nhost == rank}
    for d in range(N_DRIVERS):
        gid = DRIVER_GID0 + d
        if gid % nhost != rank:
            continue
        drv = h.SurrogateCell()                      # a bare instance: fires on negative-channel events
        fire = h.NetCon(None, drv)
        fire.weight[1] = -1
        pc.set_gid2node(gid, rank)
        pc.cell(gid, h.NetCon(drv, None))
        keep += [drv, (fire, p["spikes"][d])]
    c = p["conn"]
    for i in range(N_CONN):
        g = int(c["target"][i])
        if g in targets:
            syn = targets[g].channel_target(int(c["channel"][i]))
            keep.append(connect(DRIVER_GID0 + int(c["driver"][i]), syn, weight=c["weight"][i],
                                delay=c["delay"][i], pc=pc))
    direct = []
    d = p["direct"]
    for i in range(N_DIRECT):
        g = int(d["target"][i])
        if g in targets:
            nc = connect(None, targets[g].channel_target(int(d["channel"][i])), weight=d["weight"][i])
            direct.append((nc, d["t"][i]))

    def queue():
        for item in keep:
            if isinstance(item, tuple):
                fire, times = item
                for t in times:
                    fire.event(float(t))
        for nc, t in direct:
            nc.event(float(t))

    fih = h.FInitializeHandler(1, queue)  # noqa: F841
    rec = engine.record(segments=[], inputs=True)
    h.dt = 0.025
    if cvode:
        h.cvode.active(1)
    pc.set_maxstep(10)
    h.finitialize(-65)
    pc.psolve(TSTOP_MS)
    np.savez(out / f"rank{rank}.npz", gid=rec.gid, inputs=rec.inputs, t_ms=rec.t_ms,
             n_forward=engine.n_forward, n_steps=engine.n_steps, calls=np.array(calls),
             n_local=engine.n_local)
    pc.barrier()
    pc.done()


# -------------------------------------------------------------------------------------------------
# Tests
# -------------------------------------------------------------------------------------------------

def _run_worker(tmp_path: Path, n_ranks: int, *extra) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(THIS), "intake", str(tmp_path), *extra]
    if n_ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n_ranks)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n_ranks)]


def _merge(parts: list[dict]) -> np.ndarray:
    n_steps = int(parts[0]["inputs"].shape[-1])
    got = np.full((N_TARGETS, N_CH, n_steps), np.nan)
    for part in parts:
        for row, gid in enumerate(part["gid"]):
            got[gid] = part["inputs"][row]
    return got


@pytest.mark.parametrize("n_ranks,option", [(1, None), (2, None), (1, "--cvode"), (1, "--dense")],
                         ids=["1rank", "2ranks-mpiexec", "1rank-cvode", "1rank-dense-intake"])
def test_every_event_counted_once_in_its_bin(tmp_path, n_ranks, option):
    parts = _run_worker(tmp_path, n_ranks, *([option] if option else []))
    got = _merge(parts)
    n_steps = got.shape[-1]
    assert n_steps == int(TSTOP_MS)                     # samples t = 0..35 before tstop = 36 ms
    want = expected_inputs(plan(), n_steps)
    assert want.sum() > 300                             # the scenario really sends events
    assert want[..., 0].sum() > 0                       # some events at t = 0 (bin 0, not fed)
    np.testing.assert_array_equal(got, want)
    # (b) on every rank: one forward pass per step k = 1..35 (none at t = 0), all local instances at once
    for part in parts:
        assert int(part["n_forward"]) == int(part["n_steps"]) == n_steps - 1
        np.testing.assert_array_equal(part["calls"], np.full(n_steps - 1, int(part["n_local"])))
    if n_ranks == 2:
        assert sorted(int(p["n_local"]) for p in parts) == [2, 3]


def test_one_forward_pass_per_step_regardless_of_n():
    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC

    try:
        for n in (1, 12, 60):
            calls: list = []
            engine = SurrogateEngine(counting(tiny_model(), calls), device="cpu")
            cells = [SurrogateL5PC(engine=engine) for _ in range(n)]
            stims = []
            for i, cell in enumerate(cells):                 # some input so the batch is not idle
                ns = h.NetStim()
                ns.interval, ns.number, ns.start = 2.0, 100, 0.5
                stims.append((ns, cell.channel_target(i % N_CH).connect(ns)))
            h.dt = 0.025
            h.finitialize(-65)
            h.continuerun(20.0)                             # t = 0 (no forward pass), steps 1..19
            h.continuerun(25.0)                             # continuing keeps stepping: 20..24
            assert calls == [n] * 24, (n, calls[:5], len(calls))
            assert engine.n_forward == engine.n_steps == 24
            engine.close()
    finally:
        SurrogateEngine.close_all()


if __name__ == "__main__":
    if sys.argv[1] == "intake":
        worker_intake(Path(sys.argv[2]), cvode="--cvode" in sys.argv,
                      intake="dense" if "--dense" in sys.argv else "sparse")
