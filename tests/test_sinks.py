"""The engine's public sink interface (cosim/sinks.py) and the public seams around it.

* a user-written EngineSink gets exactly the rows it asked for, in its order, with the engine's
  voltages, logits, spikes, inputs and times; it is held weakly, can be removed, and one added
  during a run waits for the next finitialize;
* anything else is refused by add_sink;
* ChannelMap lives with the tables (hay/channels.py) and keeps its old import path;
* PopulationLFPSink (lfp.py) equals PopulationLFP applied to a recording, [T, E].
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

N_CH = 1278


def _tables(n_seg=6):
    names = np.array([b"soma[0]"] + [b"dend[0]"] * (n_seg - 1))
    segments = {"name": names, "x": np.r_[0.5, (np.arange(n_seg - 1) + 0.5) / (n_seg - 1)]}
    idx = np.arange(N_CH)
    synapses = {"syn_idx": idx, "seg_idx": 1 + (idx % 639) % (n_seg - 1), "type": (idx >= 639).astype(int)}
    return segments, synapses


def _engine(cosim, **kw):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(0)
    segments, synapses = _tables()
    model = MMoE.from_config("tiny", n_segments=6, n_channels=N_CH)
    return cosim.SurrogateEngine(model, device="cpu", segments=segments, synapses=synapses,
                                 dtype=torch.float64, **kw)


class Collect:
    """A sink as a user would write one: keeps copies of what it is handed."""

    def __init__(self, rows=None, inputs=False):
        self.rows, self.wants_inputs = rows, inputs
        self.n_resets, self.steps, self.inputs = 0, [], []

    def reset(self, engine):
        self.n_resets += 1
        self.steps, self.inputs = [], []
        return self.rows

    def append_inputs(self, inputs):
        self.inputs.append(inputs.copy())

    def append(self, step):
        self.steps.append((step.k, step.t_ms, step.v_mV.clone().numpy(), step.spike_logit.clone().numpy(),
                           step.spiked.copy()))


def _as_sink(cosim):
    from lfdeep_neuron.cosim.sinks import EngineSink

    class Sink(Collect, EngineSink):
        pass

    return Sink


def test_a_user_sink_gets_its_rows_in_its_order(cosim):
    from neuron import h

    eng = _engine(cosim, spike_rule="level")
    cells = [cosim.SurrogateL5PC(engine=eng, gid=None) for _ in range(3)]
    Sink = _as_sink(cosim)
    mine = eng.add_sink(Sink(rows=[2, 0], inputs=True))
    everyone = eng.add_sink(Sink())
    assert eng.add_sink(mine) is mine and eng.sinks == [mine, everyone]      # added once
    rec = eng.record()
    syn = cells[2].synapse("dend[0]", 0.5, "exc")
    src = h.NetStim()
    src.start, src.number, src.interval, src.noise = 1.5, 1, 1.0, 0.0
    nc = syn.connect(src, weight=2.0, delay=1.0)                                # arrives at 2.5 ms: step 3
    h.finitialize(-65)
    h.continuerun(5)
    logits = np.stack([s[3] for s in everyone.steps[1:]])
    eng.spike_threshold = float(np.median(logits))          # about half of the (row, step)s spike
    h.finitialize(-65)
    h.continuerun(5)
    assert mine.n_resets == everyone.n_resets == 2
    ks = [s[0] for s in mine.steps]
    assert ks == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal([s[1] for s in mine.steps], [0.0, 1.0, 2.0, 3.0, 4.0])
    v_all = np.stack([s[2] for s in everyone.steps], axis=-1)                  # [3, S, T]
    v_mine = np.stack([s[2] for s in mine.steps], axis=-1)                     # [2, S, T]
    assert v_all.shape == (3, 6, 5) and v_mine.shape == (2, 6, 5)
    np.testing.assert_array_equal(v_mine, v_all[[2, 0]])
    np.testing.assert_allclose(v_all, rec.v_mV, atol=1e-5)                     # Recording is float32
    assert np.isnan(mine.steps[0][3]).all() and np.isfinite(mine.steps[1][3]).all()
    # spikes: the rows that emitted at each step, as the engine reports them
    gid, t = eng.spikes()
    for k, _, _, _, spiked in everyone.steps:
        emitted = -1 - gid[np.isclose(t, k + h.dt)]
        np.testing.assert_array_equal(np.flatnonzero(spiked), np.sort(emitted))
    assert 0 < sum(s[4].sum() for s in everyone.steps) == len(t) < 12
    np.testing.assert_array_equal(mine.steps[3][4], everyone.steps[3][4][[2, 0]])
    # inputs: [2, 1278] per step, the event in row 0 (= cell 2) at step 3
    x = np.stack(mine.inputs, axis=-1)
    assert x.shape == (2, N_CH, 5) and everyone.inputs == []
    assert x[0, syn.channel, 3] == 2.0 and x.sum() == 2.0
    del nc


def test_sink_lifecycle_weak_removed_and_late(cosim):
    from neuron import h

    eng = _engine(cosim)
    cosim.SurrogateL5PC(engine=eng)
    Sink = _as_sink(cosim)
    kept, dropped = eng.add_sink(Sink()), eng.add_sink(Sink())
    del dropped
    gc.collect()
    assert eng.sinks == [kept]                                                 # held weakly
    h.finitialize(-65)
    h.continuerun(2)
    late = eng.add_sink(Sink())                                                # during a run: waits
    h.continuerun(4)
    assert len(kept.steps) == 4 and late.n_resets == 0 and late.steps == []
    eng.remove_sink(kept)
    h.finitialize(-65)
    h.continuerun(3)
    assert len(kept.steps) == 4 and len(late.steps) == 3 and eng.sinks == [late]
    with pytest.raises(TypeError, match="EngineSink"):
        eng.add_sink(Collect())                                                # duck-typed: refused
    bad = eng.add_sink(Sink(rows=[0, 5]))
    with pytest.raises(RuntimeError, match=r"rows outside \[0, 1\)"):
        h.finitialize(-65)
    eng.remove_sink(bad)


def test_instances_and_gids_through_public_methods(cosim):
    eng = _engine(cosim)
    cell = cosim.SurrogateL5PC(engine=eng)
    assert cell.index == 0 and eng.gids.tolist() == [-1]
    eng.set_gid(0, 7)
    assert eng.gids.tolist() == [7]
    with pytest.raises(IndexError, match="no local instance 3"):
        eng.set_gid(3, 1)


def test_channel_map_lives_with_the_tables():
    from lfdeep_neuron import cosim, hay
    from lfdeep_neuron.cosim.cell import ChannelMap as FromCell
    from lfdeep_neuron.errors import InputError
    from lfdeep_neuron.hay.channels import ChannelMap, section_name

    assert cosim.ChannelMap is ChannelMap is FromCell is hay.ChannelMap
    segments, synapses = _tables()
    cmap = ChannelMap(segments, synapses)
    assert cmap.channel("dend[0]", 0.5, "exc") == cmap.channel("dend_0", 0.5, "exc")   # NetPyNE's import names
    assert section_name("apic_36") == "apic[36]" and section_name("soma_0") == "soma[0]"
    with pytest.raises(InputError, match="no section 'apic\\[3\\]'"):
        cmap.segment("apic[3]", 0.5)
    with pytest.raises(InputError, match="not a Hay L5PC section name"):
        section_name("trunk")


def test_population_lfp_sink_equals_the_batch_product(cosim):
    """The sink's [T, E] LFP = PopulationLFP.from_voltages of the recorded voltages of its cells."""
    import torch

    from lfdeep_neuron.lfp import AxialLaplacian, ElectrodeArray, PopulationLFP, PopulationLFPSink, SegmentGeometry
    from neuron import h

    eng = _engine(cosim)
    start = np.c_[np.zeros(6), np.r_[-10.0, 0.0, 40.0, 80.0, 120.0, 160.0], np.zeros(6)]
    end = start + np.r_[[[0.0, 10.0, 0.0]], [[0.0, 40.0, 0.0]] * 5]
    eng.segments.update(xyz_start=start, xyz_mid=(start + end) / 2, xyz_end=end, diam_um=np.full(6, 2.0),
                        sec_type=np.array(["soma"] + ["dend"] * 5), parent_seg=np.arange(-1, 5))
    lap = np.diag(np.r_[1.0, 2, 2, 2, 2, 1]) - np.eye(6, k=1) - np.eye(6, k=-1)      # a chain, µS
    cells = [cosim.SurrogateL5PC(engine=eng, position_um=(30.0 * i, 0.0, 0.0)) for i in range(3)]
    probe = ElectrodeArray(np.c_[np.full(4, 20.0), np.arange(4) * 50.0, np.full(4, 5.0)])
    sink = eng.add_sink(PopulationLFPSink(probe, AxialLaplacian(lap), cells=[cells[2], cells[0]]))
    rec = eng.record(cells=[cells[2], cells[0]])
    rec_v64 = eng.add_sink(_as_sink(cosim)(rows=[2, 0]))
    h.finitialize(-65)
    h.continuerun(6)
    assert sink.lfp_mV.shape == (6, 4) and rec.v_mV.shape == (2, 6, 6)         # [T, E]
    np.testing.assert_array_equal(sink.t_ms, np.arange(6.0))
    v = np.stack([s[2] for s in rec_v64.steps], axis=-1)
    geoms = [SegmentGeometry.from_table(c.segment_table()) for c in (cells[2], cells[0])]
    want = PopulationLFP.from_geometries(geoms, probe, lap, dtype=torch.float64).from_voltages(v)
    assert want.shape == (6, 4) and np.abs(want).max() > 0
    np.testing.assert_allclose(sink.lfp_mV, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
