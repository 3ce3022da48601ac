"""NetPyNE glue (real NetPyNE, NEURON, mpiexec, LFPykit): surrogate L5PCs as a NetPyNE cell type.

* the example network gives identical spikes (and LFP) on 1 and 2 MPI ranks;
* connParams on named sections land on the right channels (apic[36] at 0.5, as HayL5PC.channel),
  and the events arrive there during sim.simulate();
* recordTraces of surrogate voltages equal the engine's predictions;
* the glue's population LFP equals the sum of single-cell LFPs of the recorded voltages;
* unknown sections / synMechs raise; the same spec with detailed HayL5PCs runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "netpyne_l5pc_network.py"
DRIVE_MS = (3.0, 7.5, 12.0, 16.5, 21.0)      # the drive NetStim's spike times (ms)


@pytest.fixture(scope="module")
def tiny_imem_ckpt(tmp_path_factory, reference_dir):
    """As ``tiny_ckpt`` with membrane-current tasks (untrained; normalisation from the reference's voltages
    and an arbitrary current scale)."""
    import torch

    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint
    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(1)
    rec = read_record(reference_dir / "synaptic_seed1.h5", require=("segments", "synapses", "v_1ms"))
    model = MMoE.from_config("tiny", n_segments=642, n_channels=1278, imem_tasks=True)
    v = np.asarray(rec["v_1ms"], np.float64)
    model.set_normalization(v.mean(1), v.std(1), imem_mean=np.zeros(642), imem_std=np.full(642, 0.05))
    path = tmp_path_factory.mktemp("netpyne_imem") / "tiny_imem.pt"
    save_checkpoint(path, model, segments=rec["segments"], synapses=rec["synapses"])
    return path


@pytest.fixture(scope="module")
def hay(morphology):
    from lfdeep_neuron.hay import HayL5PC

    return HayL5PC(morphology, synapses=False)


def _example(tmp_path, n_ranks, ckpt, *args):
    out = tmp_path / f"np{n_ranks}.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, str(EXAMPLE), "--model", str(ckpt), "--out", str(out), "--no-figures", *args]
    if n_ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n_ranks)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dict(np.load(out)), proc.stdout


def test_network_same_spikes_and_lfp_on_1_and_2_ranks(tmp_path, tiny_ckpt):
    args = ["--n-cells", "6", "--tstop", "80", "--dtype", "float64", "--calibrate", "--target-rate", "25",
            "--conv-exc", "100", "--conv-inh", "60", "--n-bkg-exc", "150", "--n-bkg-inh", "100"]
    one, log1 = _example(tmp_path, 1, tiny_ckpt, *args)
    two, log2 = _example(tmp_path, 2, tiny_ckpt, *args)
    assert "on 2 rank(s)" in log2 and "on 1 rank(s)" in log1
    l5 = one["spkid"] < 6
    assert l5.sum() >= 6 and len(np.unique(one["spkid"][l5])) >= 3, "the L5 cells should fire"
    np.testing.assert_array_equal(one["spkid"], two["spkid"])
    np.testing.assert_array_equal(one["spkt"], two["spkt"])
    # surrogate spikes leave at the stepper's times k + dt
    np.testing.assert_allclose(one["spkt"][l5] - np.floor(one["spkt"][l5]), 0.025, atol=1e-9)
    # the soma trace and the population LFP (summed over ranks) agree to round-off
    np.testing.assert_allclose(one["v_soma_cell0"], two["v_soma_cell0"], atol=1e-9, equal_nan=True)
    assert one["lfp_mV"].shape == (80, 16) and np.abs(one["lfp_mV"]).max() > 0
    np.testing.assert_allclose(one["lfp_mV"], two["lfp_mV"], rtol=0, atol=1e-9 * np.abs(one["lfp_mV"]).max())


# -------------------------------------------------------------------------------------------------
# In-process networks
# -------------------------------------------------------------------------------------------------

def _spec(cell_rule, n_cells=1, duration=40.0, conns=None, lfp=False, rotate=False):
    from netpyne import specs

    from lfdeep_neuron.cosim.netpyne import add_syn_mechs, record_surrogate_lfp

    net = specs.NetParams()
    net.sizeX, net.sizeY, net.sizeZ = 300.0, 100.0, 300.0
    net.rotateCellsRandomly = rotate
    net.cellParams["L5PC"] = cell_rule
    add_syn_mechs(net)
    net.popParams["L5"] = {"cellType": "L5PC", "numCells": n_cells}
    net.popParams["drive"] = {"cellModel": "NetStim", "numCells": 1, "start": 3.0, "interval": 4.5,
                              "number": len(DRIVE_MS), "noise": 0.0}        # spikes at DRIVE_MS
    for label, conn in (conns or {}).items():
        net.connParams[label] = {"preConds": {"pop": "drive"}, "postConds": {"pop": "L5"},
                                 "weight": 1.0, "delay": 1.0, **conn}
    cfg = specs.SimConfig()
    cfg.duration, cfg.dt, cfg.recordStep = duration, 0.025, 0.25
    cfg.hParams["v_init"] = -76.0
    cfg.recordCells = ["L5"]
    cfg.recordTraces = {"V_soma": {"sec": "soma", "loc": 0.5, "var": "v"},
                        "V_apic": {"sec": "apic[36]", "loc": 0.5, "var": "v"}}
    cfg.verbose = False
    cfg.printRunTime = False
    cfg.saveJson = cfg.savePickle = False
    if lfp:
        record_surrogate_lfp(cfg, pops=["L5"])
    return net, cfg


def test_conn_params_land_on_hay_channels_and_traces_match(netpyne_sim, tiny_ckpt, hay):
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params

    sim = netpyne_sim
    conns = {"a36": {"sec": "apic[36]", "loc": 0.5, "synMech": "exc", "weight": 2.0},
             "a36i": {"sec": "apic[36]", "loc": 0.5, "synMech": "GABAA"},
             "d3": {"sec": "dend[3]", "loc": 0.2, "synMech": "AMPA_NMDA", "weight": 0.5}}
    net, cfg = _spec(surrogate_cell_params(tiny_ckpt, dtype="float64"), conns=conns)
    sim.create(netParams=net, simConfig=cfg)
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    want = {("apic[36]", "exc"): hay.channel("apic[36]", 0.5, "exc"),
            ("apic[36]", "GABAA"): hay.channel("apic[36]", 0.5, "inh"),
            ("dend[3]", "AMPA_NMDA"): hay.channel("dend[3]", 0.2, "exc")}
    got = {(c["sec"], c["synMech"]): int(c["hObj"].weight[1]) for c in cell.conns}
    assert got == want
    assert want[("apic[36]", "GABAA")] == want[("apic[36]", "exc")] + 639           # same segment
    rec = cell.engine.record(cells=[cell.surrogate], inputs=True)
    sim.simulate()
    # each NetStim spike at t reaches its channels with delay 1 ms: step ceil(t + 1)
    x = rec.inputs[0]                                              # [1278, T]
    for (sec, mech), ch in want.items():
        w = {"exc": 2.0, "GABAA": 1.0, "AMPA_NMDA": 0.5}[mech]
        expect = np.zeros(x.shape[1])
        for t in DRIVE_MS:
            expect[int(np.ceil(t + 1.0))] += w
        np.testing.assert_array_equal(x[ch], expect)
    assert x.sum() == pytest.approx(5 * 3.5)
    # recordTraces equal the engine's voltages at the step times (and interpolate linearly between)
    v_soma = np.asarray(sim.allSimData["V_soma"]["cell_0"])
    v_apic = np.asarray(sim.allSimData["V_apic"]["cell_0"])
    k = np.arange(rec.v_mV.shape[-1])
    seg36 = cell.engine.channel_map.segment("apic[36]", 0.5)
    np.testing.assert_allclose(v_soma[4 * k], rec.v_mV[0, 0], atol=1e-4)
    np.testing.assert_allclose(v_apic[4 * k], rec.v_mV[0, seg36], atol=1e-4)
    np.testing.assert_allclose(v_soma[2], 0.5 * (rec.v_mV[0, 0, 0] + rec.v_mV[0, 0, 1]), atol=1e-4)
    # t = 39.25 .. 40 ms: after the last surrogate step (39 ms), its value held
    assert len(v_soma) == 161 and np.isfinite(v_soma).all() and np.isfinite(v_apic).all()
    np.testing.assert_allclose(v_soma[157:], rec.v_mV[0, 0, -1], atol=1e-4)


@pytest.mark.parametrize("duration", [40.0, 30.55])
def test_surrogate_traces_have_no_nan_at_the_end(netpyne_sim, duration):
    """README's recording idiom (recordCells ['all'], NetPyNE's default recordStep) with the bundled model: every
    sample of every surrogate trace is finite, also the ones after the last 1-ms step, which hold its value."""
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint

    sim = netpyne_sim
    conns = {"e": {"sec": "apical", "synMech": "exc", "weight": 3.0, "synsPerConn": 20}}
    net, cfg = _spec(surrogate_cell_params(str(bundled_checkpoint())), n_cells=2, duration=duration, conns=conns)
    cfg.recordCells = ["all"]
    cfg.recordStep = 0.1
    cfg.recordTraces = {"V_soma": {"sec": "soma", "loc": 0.5, "var": "v"}}
    sim.create(netParams=net, simConfig=cfg)
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    rec = cell.engine.record(segments="soma")
    sim.simulate()
    traces = sim.allSimData["V_soma"]
    assert sorted(traces) == ["cell_0", "cell_1"]
    n = int(round(duration / 0.1)) + 1
    last = int(np.ceil(duration - 1.0))                             # the last surrogate step (ms)
    assert rec.t_ms[-1] == last
    for gid, key in enumerate(sorted(traces)):
        v = np.asarray(traces[key])
        assert len(v) == n and np.isfinite(v).all(), (key, np.flatnonzero(~np.isfinite(v)))
        np.testing.assert_allclose(v[10 * np.arange(last + 1)], rec.v_mV[gid, 0], atol=1e-4)
        np.testing.assert_allclose(v[10 * last:], rec.v_mV[gid, 0, -1], atol=1e-4)   # held after it


def _two_cell_lfp_run(sim, ckpt, **record_kw):
    """Two rotated surrogate cells with apical drive and surrogate LFP, 30 ms: (cells, recording, lfp)."""
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params, surrogate_lfp

    conns = {"e": {"sec": "apical", "synMech": "exc", "weight": 3.0, "synsPerConn": 5}}
    net, cfg = _spec(surrogate_cell_params(ckpt, dtype="float64"), n_cells=2, duration=30.0,
                     conns=conns, lfp=True, rotate=True)
    sim.create(netParams=net, simConfig=cfg)
    cells = [c for c in sim.net.cells if c.tags["pop"] == "L5"]
    rec = cells[0].engine.record(cells=[c.surrogate for c in cells], **record_kw)
    sim.simulate()
    lfp = surrogate_lfp(sim)
    assert lfp["lfp_mV"].shape == (30, 16)                 # [T, E], as NetPyNE's recordLFP
    assert not np.allclose(cells[0].randRotationAngle, cells[1].randRotationAngle)
    return cells, rec, lfp


def _single_cell_lfps(cells, lfp, laplacian, per_cell, from_currents=False):
    """Sum over cells of each cell's own LFP (placed from NetPyNE's x, y, z and angle), float64."""
    import torch

    from lfdeep_neuron.lfp import PopulationLFP, SegmentGeometry

    base = SegmentGeometry.from_table(cells[0].engine.segments)
    total = np.zeros((30, 16))
    for i, c in enumerate(cells):
        pos = np.array([c.tags["x"], c.tags["y"], c.tags["z"]]) - base.soma_centre_um
        geom = base.placed(pos, rotation=(0.0, -c.randRotationAngle, 0.0))
        one = PopulationLFP.from_geometries([geom], _probe(lfp), laplacian, dtype=torch.float64)
        total += (one.from_currents if from_currents else one.from_voltages)(per_cell[i:i + 1])
    assert np.abs(total).max() > 0
    return total


def test_population_lfp_is_sum_of_single_cell_lfps(netpyne_sim, tiny_ckpt, morphology):
    from lfdeep_neuron.hay import HayL5PC
    from lfdeep_neuron.lfp import AxialLaplacian

    cells, rec, lfp = _two_cell_lfp_run(netpyne_sim, tiny_ckpt)
    # independent: each cell's LFP from its recorded voltages
    lap = AxialLaplacian.from_cell(HayL5PC(morphology, synapses=False))
    # Recording.v_mV is float32, which the Laplacian amplifies to ~1e-3 of this tiny LFP: use the
    # engine's float64 samples the Recording holds
    v64 = rec.array("v_mV", np.float64)                             # [2, S, T]
    assert np.allclose(v64.astype(np.float32), rec.v_mV)
    total = _single_cell_lfps(cells, lfp, lap, v64)
    np.testing.assert_allclose(lfp["lfp_mV"], total, rtol=0, atol=1e-9 * np.abs(total).max())


def test_population_lfp_from_predicted_currents(netpyne_sim, tiny_imem_ckpt, tiny_ckpt):
    """A model with current tasks: the LFP is sum_c M_c i_c of its predicted currents (no Laplacian)."""
    from lfdeep_neuron.cosim import SurrogateEngine

    sim = netpyne_sim
    cells, rec, lfp = _two_cell_lfp_run(sim, tiny_imem_ckpt, currents=True)
    assert cells[0].engine.predicts_currents
    i64 = rec.array("imem_nA", np.float64)                           # [2, S, T] nA
    assert np.allclose(i64.astype(np.float32), rec.imem_nA)
    assert np.all(i64[..., 0] == 0.0) and np.abs(i64[..., 1:]).min(axis=-1).max() > 0
    total = _single_cell_lfps(cells, lfp, None, i64, from_currents=True)
    np.testing.assert_allclose(lfp["lfp_mV"], total, rtol=0, atol=1e-9 * np.abs(total).max())
    # asking for currents from a voltage-only model, or recording them, is refused clearly
    SurrogateEngine.close_all()
    sim.clearAll()
    sim.fih = []
    with pytest.raises(ValueError, match="needs a surrogate with membrane-current tasks"):
        eng = SurrogateEngine(tiny_ckpt)
        eng.record(currents=True)
    SurrogateEngine.close_all()


def _probe(lfp):
    from lfdeep_neuron.lfp import ElectrodeArray

    return ElectrodeArray(lfp["electrodes_um"])


def test_unknown_sections_and_syn_mechs_raise(netpyne_sim, tiny_ckpt):
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params

    sim = netpyne_sim
    bad = [({"sec": "apic[500]", "loc": 0.5, "synMech": "exc"}, r"unknown section\(s\) \['apic\[500\]'\]"),
           ({"sec": "trunk", "loc": 0.5, "synMech": "exc"}, r"unknown section"),
           ({"sec": "apic[3]", "loc": 0.5, "synMech": "NMDA_only"}, r"unknown synMech 'NMDA_only'"),
           ({"sec": "apic[3]", "loc": 0.5, "synMech": "weird"}, r"neither excitatory nor inhibitory"),
           ({"sec": "soma", "loc": 0.5, "synMech": "exc"}, r"no synaptic input channel on soma")]
    rule = surrogate_cell_params(tiny_ckpt)
    for conn, msg in bad:
        net, cfg = _spec(rule, conns={"c": conn})
        net.synMechParams["weird"] = {"mod": "Exp2Syn", "tau1": 0.1, "tau2": 5.0, "e": 0}
        with pytest.raises(ValueError, match=msg):
            sim.create(netParams=net, simConfig=cfg)
        from lfdeep_neuron.cosim import SurrogateEngine

        SurrogateEngine.close_all()
        sim.clearAll()


def test_same_spec_with_detailed_hay_cells_runs(netpyne_sim, morphology):
    from lfdeep_neuron.cosim.netpyne import hay_cell_params

    sim = netpyne_sim
    conns = {"a36": {"sec": "apic[36]", "loc": 0.5, "synMech": "exc", "weight": 1.0},
             "basal": {"sec": "basal", "synMech": "exc", "weight": 20.0, "synsPerConn": 10}}
    net, cfg = _spec(hay_cell_params(morphology), n_cells=2, duration=40.0, conns=conns)
    sim.createSimulateAnalyze(netParams=net, simConfig=cfg)
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    a36 = next(c for c in cell.conns if c["sec"] == "apic[36]")
    assert a36["hObj"].syn() == cell.hay.synapse("apic[36]", 0.5, "exc")     # the HayL5PC's own synapse
    v = np.asarray(sim.allSimData["V_soma"]["cell_0"])
    assert len(v) == 161 and v[0] == pytest.approx(-76.0)
    assert v.max() > v[0] + 2.0, "the basal drive should depolarise the soma"
    # the soma of gid 0 sits at NetPyNE's position
    np.testing.assert_allclose(cell.hay.soma_centre_um, [cell.tags[k] for k in "xyz"], atol=1e-3)
