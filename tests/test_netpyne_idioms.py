"""NetPyNE idioms on both L5PC cell types (real NetPyNE and NEURON, 1 rank).

* importing the glue patches nothing; install() does, once;
* a VecStim population (spkTimes) drives a surrogate;
* HayL5PC populations get the same LFP request, from i_membrane_, [T, E] like NetPyNE's recordLFP;
* negative / non-finite weights into a surrogate raise (or are explicitly allowed);
* synMech parameters the cells ignore give ONE warning naming them, for both cells;
* section names and lists as NetPyNE users write them resolve for both cells; unknown ones raise;
* voltage traces are counted in NetPyNE's own recording summary and gathered into allSimData.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest


@pytest.fixture(scope="module")
def hay(morphology):
    from lfdeep_neuron.hay import HayL5PC

    return HayL5PC(morphology, synapses=False)


@pytest.fixture
def sim(netpyne_sim):
    return netpyne_sim


def _reset(sim):
    from lfdeep_neuron.cosim import SurrogateEngine

    SurrogateEngine.close_all()
    if hasattr(sim, "net"):
        sim.clearAll()
    sim.fih = []


def _spec(rule, conns=None, n_cells=1, duration=20.0, lfp=False, drive=None, syn_mechs=None, traces=None):
    from netpyne import specs

    from lfdeep_neuron.cosim.netpyne import add_syn_mechs, record_surrogate_lfp

    net = specs.NetParams()
    net.sizeX, net.sizeY, net.sizeZ = 300.0, 100.0, 300.0
    net.cellParams["L5PC"] = rule
    add_syn_mechs(net)
    net.synMechParams.update(syn_mechs or {})
    net.popParams["L5"] = {"cellType": "L5PC", "numCells": n_cells}
    net.popParams["drive"] = drive or {"cellModel": "NetStim", "numCells": 1, "start": 3.0, "interval": 4.5,
                                       "number": 3, "noise": 0.0}
    for label, conn in (conns or {}).items():
        net.connParams[label] = {"preConds": {"pop": "drive"}, "postConds": {"pop": "L5"},
                                 "weight": 1.0, "delay": 1.0, **conn}
    cfg = specs.SimConfig()
    cfg.duration, cfg.dt, cfg.recordStep = duration, 0.025, 0.25
    cfg.hParams["v_init"] = -76.0
    cfg.recordCells = ["L5"]
    cfg.recordTraces = traces if traces is not None else {}
    cfg.verbose = False
    cfg.printRunTime = False
    cfg.saveJson = cfg.savePickle = False
    if lfp:
        record_surrogate_lfp(cfg, pops=["L5"])
    return net, cfg


def test_importing_the_glue_patches_nothing_and_install_is_explicit():
    code = (
        "import netpyne.network.pop as P\n"
        "before = P.Pop._resolveCellClass\n"
        "import lfdeep_neuron.cosim.netpyne as glue\n"
        "assert P.Pop._resolveCellClass is before and not glue.installed(), 'patched on import'\n"
        "from lfdeep_neuron.errors import InputError\n"
        "for bad, says in ((lambda: glue.surrogate_cell_params('/no/such.pt'), 'does not exist'),\n"
        "                  (lambda: glue.hay_cell_params('/no/such.asc'), 'not found')):\n"
        "    try:\n"
        "        bad(); raise SystemExit('accepted a missing file')\n"
        "    except InputError as exc:\n"
        "        assert says in str(exc) and '/no/such.' in str(exc), str(exc)\n"
        "assert not glue.installed(), 'bad input must not patch NetPyNE'\n"
        "glue.install(); patched = P.Pop._resolveCellClass\n"
        "assert patched is not before and glue.installed()\n"
        "glue.install(); assert P.Pop._resolveCellClass is patched, 'not idempotent'\n"
        "from neuron import h; assert hasattr(h, 'VecStim')\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_vecstim_population_drives_a_surrogate(sim, tiny_ckpt, hay):
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params

    times = [2.0, 5.5, 9.25]
    drive = {"cellModel": "VecStim", "numCells": 2, "spkTimes": times}
    net, cfg = _spec(surrogate_cell_params(tiny_ckpt, dtype="float64"), drive=drive,
                     conns={"a36": {"sec": "apic[36]", "loc": 0.5, "synMech": "exc", "weight": 1.5}})
    sim.create(netParams=net, simConfig=cfg)
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    rec = cell.engine.record(cells=[cell.surrogate], inputs=True)
    sim.simulate()
    ch = hay.channel("apic[36]", 0.5, "exc")
    expect = np.zeros(rec.inputs.shape[-1])
    for t in times:
        expect[int(np.ceil(t + 1.0))] += 2 * 1.5                       # two VecStims, delay 1 ms
    np.testing.assert_array_equal(rec.inputs[0, ch], expect)
    assert rec.inputs.sum() == pytest.approx(expect.sum())
    drive_gids = set(sim.net.pops["drive"].cellGids)
    spkt = np.asarray(sim.allSimData["spkt"])
    spkid = np.asarray(sim.allSimData["spkid"])
    mine = np.isin(spkid, list(drive_gids))
    np.testing.assert_allclose(np.sort(spkt[mine]), np.repeat(times, 2))


def _hay_lfp_run(sim, morphology, fast_imem):
    """Two rotated HayL5PCs with basal drive and the L5 LFP request, 20 ms: (cells, lfp, i_membrane_ Vectors)."""
    from neuron import h

    from lfdeep_neuron.cosim.netpyne import hay_cell_params, surrogate_lfp

    conns = {"basal": {"sec": "basal", "synMech": "exc", "weight": 20.0, "synsPerConn": 10}}
    net, cfg = _spec(hay_cell_params(morphology), conns=conns, n_cells=2, duration=20.0, lfp=True)
    net.rotateCellsRandomly = True
    cfg.use_fast_imem = fast_imem            # False (NetPyNE's default) turns it off before the run
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sim.create(netParams=net, simConfig=cfg)
    assert not [w for w in got if "recordLFP" in str(w.message)]      # NetPyNE's recordLFP not set here
    cells = [c for c in sim.net.cells if c.tags["pop"] == "L5"]
    vecs = None
    if fast_imem:                            # independent: NEURON records every i_membrane_ at 0, 1, ... ms
        vecs = [[h.Vector().record(seg._ref_i_membrane_, 1.0) for seg in c.hay.segments] for c in cells]
    sim.simulate()
    lfp = surrogate_lfp(sim)
    i_nA = None if vecs is None else [np.array([np.asarray(v)[:20] for v in vv]) for vv in vecs]
    return cells, lfp, i_nA


def test_hay_population_lfp_from_i_membrane_in_netpyne_orientation(sim, morphology):
    from lfdeep_neuron.lfp import ElectrodeArray, SegmentGeometry

    cells, lfp, i_nA = _hay_lfp_run(sim, morphology, fast_imem=True)
    assert lfp["lfp_mV"].shape == (20, 16)                                   # [T, E]
    np.testing.assert_array_equal(lfp["t_ms"], np.arange(20.0))
    probe = ElectrodeArray(lfp["electrodes_um"])
    want = np.zeros((20, 16))
    for c, i in zip(cells, i_nA):
        assert i.shape == (642, 20)
        want += (probe.mapping(SegmentGeometry.from_cell(c.hay)) @ i).T
    assert np.abs(want[1:]).max() > 1e-5
    np.testing.assert_allclose(lfp["lfp_mV"], want, rtol=0, atol=1e-9 * np.abs(want).max())
    # NetPyNE's default (fast_imem off before the run): the recorder turns it on at finitialize
    _reset(sim)
    _, default, _ = _hay_lfp_run(sim, morphology, fast_imem=False)
    np.testing.assert_allclose(default["lfp_mV"], want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_netpyne_record_lfp_idiom_warns_and_lends_its_contacts(sim, tiny_ckpt):
    """NetPyNE's own recordLFP sums only its exact CompartCell class (zeros for these cells): one warning,
    and record_surrogate_lfp takes its contacts."""
    from lfdeep_neuron.cosim.netpyne import UnhonouredParameterWarning, record_surrogate_lfp, surrogate_cell_params
    from lfdeep_neuron.cosim.netpyne import surrogate_lfp

    net, cfg = _spec(surrogate_cell_params(tiny_ckpt, dtype="float64"), n_cells=2, duration=10.0,
                     conns={"a": {"sec": "apical", "synMech": "exc", "weight": 3.0, "synsPerConn": 5}})
    contacts = [[150.0, y, 150.0] for y in (-200.0, 400.0, 1000.0)]
    cfg.recordLFP = contacts
    cfg.recordStep = 1.0
    record_surrogate_lfp(cfg, morphology=None)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sim.create(netParams=net, simConfig=cfg)
    ours = [w for w in got if issubclass(w.category, UnhonouredParameterWarning) and "recordLFP" in str(w.message)]
    assert len(ours) == 1
    sim.simulate()
    lfp = surrogate_lfp(sim)
    np.testing.assert_array_equal(lfp["electrodes_um"], contacts)
    assert lfp["lfp_mV"].shape == (10, 3) and np.abs(lfp["lfp_mV"]).max() > 0
    netpyne_lfp = np.asarray(sim.allSimData["LFP"])
    assert netpyne_lfp.shape == (10, 3) and not netpyne_lfp.any()            # NetPyNE's: [T, E], zeros here


def test_negative_and_non_finite_weights_into_a_surrogate(sim, tiny_ckpt):
    from lfdeep_neuron.cosim.netpyne import surrogate_cell_params
    from lfdeep_neuron.errors import InputError

    for weight, msg in ((-1.0, r"connection 'neg'.*negative weight -1\.0"),
                        (float("nan"), r"connection 'neg'.*weight nan is not finite"),
                        ("-2.5 + 0.0 * post_ynorm", r"connection 'neg'.*negative weight -2\.5")):
        net, cfg = _spec(surrogate_cell_params(tiny_ckpt),
                         conns={"neg": {"sec": "apic[3]", "loc": 0.5, "synMech": "exc", "weight": weight}})
        with pytest.raises(InputError, match=msg):
            sim.create(netParams=net, simConfig=cfg)
        _reset(sim)
    net, cfg = _spec(surrogate_cell_params(tiny_ckpt, allow_negative_weights=True),
                     conns={"neg": {"sec": "apic[3]", "loc": 0.5, "synMech": "exc", "weight": -1.0}})
    sim.create(netParams=net, simConfig=cfg)                                  # explicit opt-in
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    assert [c["hObj"].weight[0] for c in cell.conns] == [-1.0]


@pytest.mark.parametrize("kind", ["surrogate", "hay"])
def test_syn_mech_parameters_the_cells_ignore_warn_once(sim, tiny_ckpt, morphology, kind):
    from lfdeep_neuron.cosim.netpyne import UnhonouredParameterWarning, hay_cell_params, surrogate_cell_params

    rule = surrogate_cell_params(tiny_ckpt) if kind == "surrogate" else hay_cell_params(morphology)
    n_cells = 2 if kind == "surrogate" else 1
    mechs = {"AMPA": {"mod": "Exp2Syn", "tau1": 0.05, "tau2": 5.3, "e": 0.0}}
    conns = {"x": {"sec": "apical", "synMech": "AMPA", "synsPerConn": 3},
             "y": {"sec": "basal", "synMech": "AMPA"},
             "z": {"sec": "apic[2]", "synMech": "exc"}}                   # add_syn_mechs' own: honoured
    net, cfg = _spec(rule, conns=conns, n_cells=n_cells, syn_mechs=mechs)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sim.create(netParams=net, simConfig=cfg)
    ours = [w for w in got if issubclass(w.category, UnhonouredParameterWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    text = str(ours[0].message)
    assert "'AMPA'" in text and "mod, e, tau1, tau2 not honoured" in text and "AmpaNmdaSyn" in text
    cells = [c for c in sim.net.cells if c.tags["pop"] == "L5"]
    assert sum(len(c.conns) for c in cells) == n_cells * 5                   # the connections are made


@pytest.mark.parametrize("kind", ["surrogate", "hay"])
def test_section_names_and_lists_as_netpyne_users_write_them(sim, tiny_ckpt, morphology, hay, kind):
    from lfdeep_neuron.cosim.netpyne import hay_cell_params, surrogate_cell_params
    from lfdeep_neuron.errors import InputError

    rule = surrogate_cell_params(tiny_ckpt) if kind == "surrogate" else hay_cell_params(morphology)
    assert {"somatic", "basal", "apical", "axonal", "all", "dendritic"} <= set(rule["secLists"])
    conns = {name: {"sec": name, "synMech": "exc", "synsPerConn": 4}
             for name in ("apical", "basal", "dendritic", "all")}
    conns["imported"] = {"sec": "apic_36", "loc": 0.5, "synMech": "exc"}      # importCellParams' name
    conns["listed"] = {"sec": ["dend_3", "apic[7]"], "synMech": "inh", "synsPerConn": 2}
    net, cfg = _spec(rule, conns=conns)
    sim.create(netParams=net, simConfig=cfg)
    cell = next(c for c in sim.net.cells if c.tags["pop"] == "L5")
    by = {}
    for c in cell.conns:
        by.setdefault(c["label"], []).append(c["sec"])
    assert all(s.startswith("apic[") for s in by["apical"]) and all(s.startswith("dend[") for s in by["basal"])
    assert all(s.startswith(("apic[", "dend[")) for s in by["dendritic"] + by["all"])
    assert by["imported"] == ["apic[36]"] and set(by["listed"]) <= {"dend[3]", "apic[7]"}
    imported = next(c for c in cell.conns if c["label"] == "imported")
    if kind == "surrogate":
        assert int(imported["hObj"].weight[1]) == hay.channel("apic[36]", 0.5, "exc")
    else:
        assert imported["hObj"].syn() == cell.hay.synapse("apic[36]", 0.5, "exc")
    _reset(sim)
    for sec, msg in (("somatic", r"section list 'somatic' .* has no section with synapses"),
                     ("axonal", r"section list 'axonal'"),
                     ("apic_500", r"unknown section\(s\) \['apic_500'\]"),
                     (["apic[3]", "tuft"], r"unknown section\(s\) \['tuft'\]")):
        net, cfg = _spec(rule, conns={"bad": {"sec": sec, "synMech": "exc"}})
        with pytest.raises(InputError, match=msg):
            sim.create(netParams=net, simConfig=cfg)
        _reset(sim)


@pytest.mark.parametrize("kind", ["surrogate", "hay"])
def test_traces_are_reported_like_a_normal_cells(sim, tiny_ckpt, morphology, hay, kind, capsys):
    from lfdeep_neuron.cosim.netpyne import hay_cell_params, surrogate_cell_params
    from lfdeep_neuron.errors import InputError

    rule = surrogate_cell_params(tiny_ckpt) if kind == "surrogate" else hay_cell_params(morphology)
    traces = {"V_soma": {"sec": "soma", "loc": 0.5, "var": "v"},
              "V_apic": {"sec": "apic_36", "loc": 0.5, "var": "v"}}
    net, cfg = _spec(rule, n_cells=2, duration=10.0, traces=traces)
    capsys.readouterr()
    sim.create(netParams=net, simConfig=cfg)
    assert "Recording 4 traces of 2 types on node 0" in capsys.readouterr().out
    sim.simulate()
    # The sample at t = 0 is exact (issue 33, "Why" item 8: it was checked to +-15 mV around -76, which a
    # trace of the wrong segment, or one starting anywhere in a cell's range, passes): a HayL5PC's is
    # v_init = -76 mV (finitialize), a surrogate's is its checkpoint's initial voltage v_rest of that segment
    # (the first feedback input; this untrained checkpoint's v_rest is the reference's mean voltage, ~-66).
    if kind == "surrogate":
        from lfdeep_neuron.surrogate.checkpoint import load_surrogate

        v_rest = load_surrogate(tiny_ckpt).v_rest.double().numpy()
        want = {"V_soma": v_rest[hay.segment_index("soma[0]", 0.5)],
                "V_apic": v_rest[hay.segment_index("apic[36]", 0.5)]}
        assert abs(want["V_soma"] - want["V_apic"]) > 0.1           # the two segments' values tell them apart
    else:
        want = {"V_soma": -76.0, "V_apic": -76.0}
    for key in traces:
        got = sim.allSimData[key]
        assert sorted(got) == ["cell_0", "cell_1"]
        v = np.asarray(got["cell_0"])
        assert len(v) in (40, 41)                                     # NEURON records 40 here
        assert v[0] == pytest.approx(want[key], abs=1e-5), key        # float32 of the checkpoint
        np.testing.assert_array_equal(np.asarray(got["cell_1"])[0], v[0])
    _reset(sim)
    net, cfg = _spec(rule, traces={"V_bad": {"sec": "trunk", "loc": 0.5, "var": "v"}})
    with pytest.raises(InputError, match=r"unknown section\(s\) \['trunk'\] in recordTraces\['V_bad'\]"):
        sim.create(netParams=net, simConfig=cfg)


MIXED_SCRIPT = '''
import sys

import numpy as np
from netpyne import sim, specs

from lfdeep_neuron.cosim.netpyne import (add_syn_mechs, hay_cell_params, record_surrogate_lfp,
                                         surrogate_cell_params, surrogate_lfp)

ckpt, morphology, out = sys.argv[1:4]
net = specs.NetParams()
net.sizeX, net.sizeY, net.sizeZ = 300.0, 100.0, 300.0
net.rotateCellsRandomly = True
net.cellParams["S"] = surrogate_cell_params(ckpt, dtype="float64")
net.cellParams["H"] = hay_cell_params(morphology)
add_syn_mechs(net)
net.popParams["surr"] = {"cellType": "S", "numCells": 2}
net.popParams["hay"] = {"cellType": "H", "numCells": 2}
net.popParams["bg"] = {"cellModel": "VecStim", "numCells": 3, "spkTimes": [2.0, 4.5, 8.0, 11.0]}
net.connParams["bg->surr"] = {"preConds": {"pop": "bg"}, "postConds": {"pop": "surr"}, "sec": "apical",
                              "synMech": "exc", "weight": 3.0, "delay": 1.0, "synsPerConn": 4}
net.connParams["bg->hay"] = {"preConds": {"pop": "bg"}, "postConds": {"pop": "hay"}, "sec": "basal",
                             "synMech": "exc", "weight": 20.0, "delay": 1.0, "synsPerConn": 5}
cfg = specs.SimConfig()
cfg.duration, cfg.dt, cfg.recordStep = 15.0, 0.025, 0.25
cfg.hParams["v_init"] = -76.0
cfg.verbose = cfg.printRunTime = False
cfg.saveJson = cfg.savePickle = False
record_surrogate_lfp(cfg)                       # every L5PC population: surrogate and HayL5PC
sim.createSimulateAnalyze(netParams=net, simConfig=cfg)
lfp = surrogate_lfp(sim)
if sim.rank == 0:
    parts = sorted(k for k in sim.allSimData["surrogateLFP"] if str(k).startswith("node"))
    np.savez(out, lfp_mV=lfp["lfp_mV"], t_ms=lfp["t_ms"], parts=np.array(parts))
sim.pc.barrier()
from lfdeep_neuron.parallel import parallel_context

parallel_context().done()
'''


def test_mixed_network_lfp_with_vecstim_same_on_1_and_2_ranks(tmp_path, tiny_ckpt, morphology):
    """A fresh script: VecStim drive, surrogate + HayL5PC populations, one LFP request, 1 vs 2 ranks."""
    import os

    script = tmp_path / "mixed.py"
    script.write_text(MIXED_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}.npz"
        cmd = [sys.executable, str(script), str(tiny_ckpt), str(morphology), str(out)]
        if n > 1:
            cmd = [str(os.path.join(os.path.dirname(sys.executable), "mpiexec")), "-n", str(n)] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{n} rank(s):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        runs[n] = dict(np.load(out))
    one, two = runs[1], runs[2]
    assert one["lfp_mV"].shape == (15, 16) and np.abs(one["lfp_mV"]).max() > 0          # [T, E]
    assert set(one["parts"]) == {"node0:hay", "node0:surrogate0"}
    assert set(two["parts"]) == {"node0:hay", "node0:surrogate0", "node1:hay", "node1:surrogate0"}
    np.testing.assert_array_equal(one["t_ms"], two["t_ms"])
    np.testing.assert_allclose(two["lfp_mV"], one["lfp_mV"], rtol=0, atol=1e-9 * np.abs(one["lfp_mV"]).max())
