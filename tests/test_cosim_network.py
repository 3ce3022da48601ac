"""Networks: the recurrent example gives identical spike trains on 1 and 2 MPI ranks; a mixed
network of detailed HayL5PC and SurrogateL5PC cells runs, and both kinds send and receive spikes;
SurrogateL5PC addresses synapses exactly as HayL5PC.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "network.py"


def _example(tmp_path: Path, n_ranks: int, *args) -> dict:
    out = tmp_path / f"net{n_ranks}.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(EXAMPLE), "--out", str(out), *args]
    if n_ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n_ranks)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dict(np.load(out)), proc.stdout


def test_recurrent_network_same_spikes_on_1_and_2_ranks(tmp_path):
    args = ["--n-cells", "12", "--tstop", "150", "--dtype", "float64", "--calibrate", "--target-rate", "20"]
    one, log1 = _example(tmp_path, 1, *args)
    two, log2 = _example(tmp_path, 2, *args)
    assert "on 2 rank(s)" in log2 and "forward passes on rank 0: 149" in log2   # steps 1..149
    assert one["threshold"] == two["threshold"]
    np.testing.assert_array_equal(one["spike_gid"], two["spike_gid"])
    np.testing.assert_array_equal(one["spike_t_ms"], two["spike_t_ms"])
    # a real, spiking network: many cells fire, at the stepper's times k + dt (the ground-truth dt, 0.05 ms)
    assert len(one["spike_t_ms"]) >= 12
    assert len(np.unique(one["spike_gid"])) >= 6
    frac = one["spike_t_ms"] - np.floor(one["spike_t_ms"])
    np.testing.assert_allclose(frac, 0.05, atol=1e-9)
    # the recorded soma voltages agree as well (float64 model: to round-off)
    order1, order2 = np.argsort(one["soma_gid"]), np.argsort(two["soma_gid"])
    np.testing.assert_allclose(one["soma_v_mV"][order1], two["soma_v_mV"][order2], atol=1e-9)


# -------------------------------------------------------------------------------------------------
# Mixed network (needs the Hay morphology)
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hay(morphology):
    from lfdeep_neuron.hay import HayL5PC

    return HayL5PC(morphology)


def _tiny(hay_cell, seed=0):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(seed)
    model = MMoE.from_config("tiny", n_segments=642, n_channels=1278)
    model.meta = dict(segments=hay_cell.segment_table(), synapses=hay_cell.synapse_table(), dt_ms=1.0)
    return model


def test_same_synapse_addressing_as_hay(hay):
    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC

    try:
        cell = SurrogateL5PC(engine=SurrogateEngine(_tiny(hay), device="cpu"))
        rng = np.random.default_rng(0)
        names = [n for n in hay.section_names if n.startswith(("dend", "apic"))]
        xs = np.concatenate([[0.0, 1.0, 0.5], rng.random(200),
                             np.arange(1, 7) / 7.0, np.arange(1, 5) / 5.0])   # segment boundaries too
        for k in range(600):
            name = names[rng.integers(len(names))]
            x = float(xs[k % len(xs)])
            kind = ("exc", "inh")[k % 2]
            assert cell.synapse(name, x, kind).channel == hay.channel(name, x, kind), (name, x, kind)
            # a NEURON Section of the Hay cell is accepted too (names are prefixed 'HayL5PC[0].')
        sec = hay.section("apic[36]")
        assert cell.synapse(sec, 0.3, "inh").channel == hay.channel("apic[36]", 0.3, "inh")
        with pytest.raises(ValueError, match="no synaptic input channel on soma"):
            cell.synapse("soma[0]", 0.5, "exc")
        with pytest.raises(ValueError, match="no section 'apic\\[500\\]'"):
            cell.synapse("apic[500]", 0.5, "exc")
        with pytest.raises(ValueError, match="unknown synapse kind"):
            cell.synapse("apic[3]", 0.5, "nmda-only")
        with pytest.raises(ValueError, match="x must lie in"):
            cell.synapse("apic[3]", 1.5, "exc")
        # placement follows HayL5PC's convention
        moved = SurrogateL5PC(engine=cell.engine, position_um=(10.0, -5.0, 2.0), rotation=(0.1, 0.2, 0.3))
        hay.set_placement((10.0, -5.0, 2.0), (0.1, 0.2, 0.3))
        try:
            np.testing.assert_allclose(moved.segment_table()["xyz_mid"][:-2],
                                       hay.segment_table()["xyz_mid"][:-2], atol=1e-3)  # NEURON stores float32
        finally:
            hay.set_placement()
    finally:
        SurrogateEngine.close_all()


def test_mixed_network_hay_and_surrogates_exchange_spikes(hay):
    """gid 0 HayL5PC (current step) <-> gids 1, 2 SurrogateL5PC (Poisson drive), via pc.gid_connect."""
    import torch

    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC, connect
    from lfdeep_neuron.parallel import parallel_context

    torch.set_num_threads(1)
    example = _load_example()
    pc = parallel_context()
    pc.gid_clear()
    model = _tiny(hay)
    rates = example.input_rates_per_ms(64, 100.0, 0.25)
    threshold = example.calibrate_threshold(model, rates, target_rate_hz=40.0)
    tstop, d_ms = 120.0, 2.0
    CH_FROM_HAY = 5                                     # channel of the surrogates fed only by the Hay cell
    try:
        engine = SurrogateEngine(model, device="cpu", spike_threshold=threshold)
        pc.set_gid2node(0, pc.id())
        hay_src = hay.spike_netcon()
        pc.cell(0, hay_src)
        stim = hay.add_iclamp(1.0, 20.0, 80.0)          # soma step: the Hay cell fires
        surr = [SurrogateL5PC(engine=engine, gid=g) for g in (1, 2)]
        keep = []
        for i, cell in enumerate(surr):                 # Poisson drive of the surrogates
            seg, inh = example.input_plan(cell.gid, 64, 0.25, seed=3)
            for j in range(64):
                c = int(seg[j]) + (639 if inh[j] else 0)
                if c == CH_FROM_HAY:
                    continue
                ns = h.NetStim()
                ns.interval, ns.number, ns.start, ns.noise = 10.0, 1e9, 0.0, 1.0
                ns.noiseFromRandom123(cell.gid, j, 3)
                keep += [ns, connect(ns, cell.channel_target(c))]
            keep.append(cell.connect(0, *_site(engine, CH_FROM_HAY), weight=1.0, delay=d_ms))  # Hay -> surrogate
        hay_syn = hay.synapse("apic[36]", 0.5, "exc")   # surrogates -> Hay, on a synapse nothing else drives
        for cell in surr:
            keep.append(connect(cell.gid, hay_syn, weight=1.0, delay=d_ms, pc=pc))
        g_syn = h.Vector().record(hay_syn._ref_g)
        t_vec = h.Vector().record(h._ref_t)
        spk_t, spk_gid = h.Vector(), h.Vector()
        pc.spike_record(-1, spk_t, spk_gid)
        rec = engine.record(segments=[], inputs=True)
        h.dt = 0.025
        pc.set_maxstep(10)
        h.finitialize(-76.0)
        pc.psolve(tstop)

        gid, t = np.asarray(spk_gid), np.asarray(spk_t)
        t_hay, t_surr = t[gid == 0], t[gid > 0]
        assert len(t_hay) >= 2, "the detailed cell should fire under its current step"
        assert len(t_surr) >= 2, "the surrogates should fire"
        # the surrogates received the Hay spikes: weight 1 at step ceil(t + delay) of CH_FROM_HAY
        x = rec.inputs[:, CH_FROM_HAY, :]               # [2, T]
        want = np.zeros(x.shape[1])
        for ts in t_hay:
            k = int(np.ceil(ts + d_ms))
            if k < len(want):
                want[k] += 1.0
        assert want.sum() >= 2
        for row in range(2):
            np.testing.assert_array_equal(x[row], want)
        # the Hay cell received the surrogate spikes: its synapse conducts from the first arrival on
        g, tt = np.asarray(g_syn), np.asarray(t_vec)
        first = t_surr.min() + d_ms
        assert np.all(g[tt < first - 1e-9] == 0.0)
        assert g[tt > first + 0.5].max() > 0.0
    finally:
        pc.gid_clear()
        SurrogateEngine.close_all()
        stim.amp = 0.0


def _load_example():
    import importlib.util

    name = "lfdeep_example_network"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def _site(engine, channel):
    """(section, x, kind) of an input channel, from the engine's tables."""
    syn = engine.synapses
    seg = int(syn["seg_idx"][channel])
    kind = "exc" if int(syn["type"][channel]) == 0 else "inh"
    return str(engine.segments["name"][seg]), float(engine.segments["x"][seg]), kind
