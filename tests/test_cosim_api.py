"""SurrogateEngine / SurrogateL5PC API: engine lookup, recordings (arrays and HDF5), clear errors."""
from __future__ import annotations

import numpy as np
import pytest

N_CH = 1278


def _model(segments=6, seed=0):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(seed)
    return MMoE.from_config("tiny", n_segments=segments, n_channels=N_CH)


def test_engine_get_is_one_per_model_and_process(cosim):
    m1, m2 = _model(), _model(seed=1)
    e1 = cosim.SurrogateEngine.get(m1, device="cpu")
    assert cosim.SurrogateEngine.get(m1) is e1
    assert cosim.SurrogateEngine.get() is e1                    # the only engine
    assert str(e1.device) == "cpu"
    e2 = cosim.SurrogateEngine.get(m2, device="cpu")
    assert e2 is not e1
    with pytest.raises(ValueError, match="2 engines exist"):
        cosim.SurrogateEngine.get()
    cell = cosim.SurrogateL5PC(model=m2)
    assert cell.engine is e2 and cell.index == 0
    with pytest.raises(ValueError, match="model and engine disagree"):
        cosim.SurrogateL5PC(model=m1, engine=e2)
    with pytest.raises(TypeError, match="streamer"):
        cosim.SurrogateEngine(object())
    direct = cosim.SurrogateEngine(_model(seed=2), device="cpu")    # made without get()
    cosim.SurrogateL5PC(engine=direct)
    from neuron import h

    h.finitialize(-65)
    h.continuerun(3)
    assert direct.n_forward == e2.n_forward == 2               # steps 1, 2 (t = 0: initial state)
    cosim.SurrogateEngine.close_all()                          # closes every engine, however made
    assert direct.closed and e1.closed and e2.closed
    h.finitialize(-65)
    h.continuerun(3)
    assert direct.n_forward == 2                               # no longer stepped
    with pytest.raises(ValueError, match="no engine exists"):
        cosim.SurrogateEngine.get()
    with pytest.raises(RuntimeError, match="was closed"):
        cosim.SurrogateL5PC(engine=direct)


def test_two_engines_share_the_intake_and_step_independently(cosim):
    """Two models in one process: each instance's events reach its own engine's batch row."""
    from neuron import h

    e1 = cosim.SurrogateEngine(_model(), device="cpu")
    e2 = cosim.SurrogateEngine(_model(seed=1), device="cpu")
    a = [cosim.SurrogateL5PC(engine=e1) for _ in range(2)]
    b = [cosim.SurrogateL5PC(engine=e2) for _ in range(3)]
    ncs = [(a[1].channel_target(7).connect(None, weight=2.0), 3.0),
           (b[0].channel_target(1277).connect(None, weight=0.5), 4.0),
           (b[2].channel_target(0).connect(None, weight=1.5), 4.0)]
    fih = h.FInitializeHandler(1, lambda: [nc.event(t) for nc, t in ncs])  # noqa: F841
    r1, r2 = e1.record(segments=[], inputs=True), e2.record(segments=[], inputs=True)
    h.finitialize(-65)
    h.continuerun(6)
    x1, x2 = r1.inputs, r2.inputs
    assert x1.shape == (2, N_CH, 6) and x2.shape == (3, N_CH, 6)
    assert x1.sum() == 2.0 and x1[1, 7, 3] == 2.0
    assert x2.sum() == 2.0 and x2[0, 1277, 4] == 0.5 and x2[2, 0, 4] == 1.5
    assert e1.n_forward == e2.n_forward == 5


def _small_tables():
    """A 6-segment toy cell: soma, dend[0] (2 segments), apic[0], 2 axon stubs; channels on 1..3."""
    names = np.array(["soma[0]", "dend[0]", "dend[0]", "apic[0]", "axon[0]", "axon[1]"])
    segments = dict(name=names, x=np.array([0.5, 0.25, 0.75, 0.5, 0.5, 0.5]), xyz_mid=np.zeros((6, 3)))
    synapses = dict(syn_idx=np.arange(N_CH), seg_idx=np.concatenate([np.arange(N_CH // 2) % 3 + 1] * 2),
                    type=np.repeat([0, 1], N_CH // 2))
    return segments, synapses


def test_engine_from_a_checkpoint_path(cosim, tmp_path):
    from neuron import h

    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint

    segments, synapses = _small_tables()
    path = save_checkpoint(tmp_path / "tiny.pt", _model(), segments=segments, synapses=synapses, dt_ms=1.0)
    cell = cosim.SurrogateL5PC(model=str(path))                 # SurrogateEngine.get(path)
    assert cosim.SurrogateEngine.get(path) is cell.engine
    assert cell.synapse("dend[0]", 0.9, "inh").channel == 639 + 1   # 2nd dend segment = channel 1
    rec = cell.engine.record(segments="soma")
    h.finitialize(-65)
    h.continuerun(3)
    assert rec.v_mV.shape == (1, 1, 3) and cell.engine.n_forward == 2
    assert cell.engine.spike_threshold == 0.0                   # no calibrated threshold: 0


def test_spike_threshold_defaults_to_the_checkpoints_calibrated_one(cosim, tmp_path):
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint

    segments, synapses = _small_tables()
    path = save_checkpoint(tmp_path / "cal.pt", _model(), segments=segments, synapses=synapses, dt_ms=1.0,
                           metrics={"spike_threshold_logit": -2.75, "rmse_mV": 1.0})
    assert cosim.SurrogateEngine(str(path), device="cpu").spike_threshold == -2.75
    assert cosim.SurrogateEngine(str(path), device="cpu", spike_threshold=1.5).spike_threshold == 1.5
    assert cosim.SurrogateL5PC(model=str(path)).engine.spike_threshold == -2.75   # via get()
    model = _model()
    model.meta = {"metrics": {"spike_threshold_logit": 0.625}}
    assert cosim.SurrogateEngine(model, device="cpu").spike_threshold == 0.625
    model.meta = {"metrics": {}}
    assert cosim.SurrogateEngine(model, device="cpu").spike_threshold == 0.0


def test_recording_arrays_and_hdf5(cosim, tmp_path):
    import h5py
    from neuron import h

    segments, synapses = _small_tables()
    eng = cosim.SurrogateEngine(_model(), device="cpu", segments=segments, synapses=synapses,
                                spike_threshold=-1e9, spike_rule="level")   # every step spikes: emission
    cells = [cosim.SurrogateL5PC(engine=eng, gid=None) for _ in range(3)]
    full = eng.record()
    part = eng.record(cells=[cells[2]], segments=["dend[0](0.9)", "soma"], logits=True)
    h.finitialize(-65)
    h.continuerun(4)
    v = full.v_mV
    assert v.shape == (3, 6, 4) and np.isfinite(v).all()
    v_rest = eng.model.v_rest.numpy()
    np.testing.assert_array_equal(v[:, :, 0], np.broadcast_to(v_rest, (3, 6)))   # t = 0: initial state
    assert np.abs(v[:, :, 1:] - v_rest[None, :, None]).max() > 1e-3             # then predictions
    np.testing.assert_array_equal(part.segment_index, [2, 0])
    np.testing.assert_array_equal(part.v_mV[0], v[2][[2, 0]])
    lg = part.spike_logit
    assert lg.shape == (1, 4) and np.isnan(lg[0, 0]) and np.isfinite(lg[0, 1:]).all()
    np.testing.assert_array_equal(full.t_ms, [0, 1, 2, 3])
    gid, t = eng.spikes()
    assert len(t) == 9 and set(gid) == {-1, -2, -3}             # steps 1..3 (no spike at t = 0)
    np.testing.assert_allclose(np.unique(t), np.arange(1, 4) + h.dt, atol=1e-9)
    path = part.to_hdf5(tmp_path / "rec.h5")
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["v_mV"][:], part.v_mV)
        assert [s.decode() for s in f["segment_name"][:]] == ["dend[0]", "soma[0]"]
        np.testing.assert_array_equal(f["spikes/t_ms"][:], t)
        assert f["spike_logit"].shape == (1, 4)
    with pytest.raises(ValueError, match="not recorded"):
        full.inputs
    # a second run starts afresh
    h.finitialize(-65)
    h.continuerun(2)
    assert full.v_mV.shape == (3, 6, 2) and eng.n_forward == 1


def test_bad_channel_and_late_cells_raise_clear_errors(cosim):
    from neuron import h

    eng = cosim.SurrogateEngine(_model(), device="cpu")
    cell = cosim.SurrogateL5PC(engine=eng)
    nc = h.NetCon(None, cell.target)
    nc.weight[0], nc.weight[1] = 1.0, 1278          # one past the last channel
    fih = h.FInitializeHandler(1, lambda: nc.event(2.0))  # noqa: F841
    h.finitialize(-65)
    with pytest.raises(RuntimeError, match="could not be stored \\(last: channel 1278"):
        h.continuerun(5)
    nc.weight[1] = 3.5                                   # not an integer
    h.finitialize(-65)
    with pytest.raises(RuntimeError, match="could not be stored"):
        h.continuerun(5)
    nc.weight[1] = 3                                     # valid now: the run goes through
    h.finitialize(-65)
    h.continuerun(5)
    assert eng.n_forward == 4
    cosim.SurrogateL5PC(engine=eng)                      # created after finitialize
    with pytest.raises(RuntimeError, match="created after finitialize"):
        h.continuerun(7)
    h.finitialize(-65)                                   # a fresh init takes the new cell in
    h.continuerun(3)
    assert eng.n_local == 2 and eng.n_forward == 2
    with pytest.raises(ValueError, match="channel must lie in"):
        cell.channel_target(N_CH)
    with pytest.raises(ValueError, match="segment/synapse tables"):
        cell.synapse("apic[3]", 0.5, "exc")             # this model has no tables


def test_dt_larger_than_step_is_refused(cosim):
    from neuron import h

    eng = cosim.SurrogateEngine(_model(), device="cpu")
    cosim.SurrogateL5PC(engine=eng)
    h.dt = 2.0
    with pytest.raises(RuntimeError, match="larger than the surrogate step"):
        h.finitialize(-65)


def test_cvode_steps_and_spikes_at_quarter_dt(cosim):
    from neuron import h

    eng = cosim.SurrogateEngine(_model(), device="cpu", spike_threshold=-1e9, spike_rule="level")
    cell = cosim.SurrogateL5PC(engine=eng)
    t_spk = h.Vector()
    src = cell.spike_netcon()
    src.record(t_spk)
    h.cvode.active(1)
    h.finitialize(-65)
    h.continuerun(5)
    assert eng.n_forward == eng.n_steps == 4
    np.testing.assert_allclose(np.asarray(t_spk), np.arange(1, 5) + h.dt / 4, atol=1e-12)


@pytest.mark.parametrize("cvode", [False, True], ids=["fixed-step", "cvode"])
def test_initial_state_and_bin0_events_are_not_fed(cosim, cvode):
    """t = 0 is the initial state (v_rest, no forward pass); events at t <= 0 are dropped, and the
    outputs equal the offline closed-loop streamer fed columns 1.. of the binned inputs."""
    import torch
    from neuron import h

    model = _model()
    model.set_normalization(np.full(6, -70.0), np.full(6, 10.0), v_rest=np.full(6, -75.0))  # mV range
    eng = cosim.SurrogateEngine(model, device="cpu", spike_threshold=1e9)
    cell = cosim.SurrogateL5PC(engine=eng)
    big = cell.channel_target(3).connect(None, weight=50.0)
    small = cell.channel_target(700).connect(None, weight=2.0)
    plan = [(big, 0.0), (small, 0.0), (small, 0.5), (big, 1.0), (small, 2.0), (big, 3.5)]
    fih = h.FInitializeHandler(1, lambda: [nc.event(t) for nc, t in plan])  # noqa: F841
    rec = eng.record(inputs=True, logits=True)
    h.cvode.active(int(cvode))
    h.finitialize(-65)
    h.continuerun(6)
    x = rec.inputs[0]
    assert x[3, 0] == 50.0 and x[700, 0] == 2.0                 # bin 0: cleared at t0, kept for the record
    assert x[700, 1] == 2.0 and x[3, 1] == 50.0 and x[700, 2] == 2.0 and x[3, 4] == 50.0
    assert np.count_nonzero(x) == 6
    assert eng.n_forward == eng.n_steps == 5
    st = eng.model.streamer(1, device="cpu", output="mV")
    v_off, lg_off = [], []
    with torch.inference_mode():
        for k in range(1, 6):
            v, lg = st.step(torch.as_tensor(x[None, :, k], dtype=torch.float32))
            v_off.append(v[0].numpy())
            lg_off.append(lg.item())
    v = rec.v_mV[0]
    np.testing.assert_array_equal(v[:, 0], np.full(6, -75.0))
    np.testing.assert_allclose(v[:, 1:], np.stack(v_off, axis=1), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rec.spike_logit[0, 1:], lg_off, atol=1e-6, rtol=0)
    # feeding bin 0 as a first step (the old convention) would give a different trajectory
    st = eng.model.streamer(1, device="cpu", output="mV")
    with torch.inference_mode():
        st.step(torch.as_tensor(x[None, :, 0], dtype=torch.float32))
        v1_shifted = st.step(torch.as_tensor(x[None, :, 1], dtype=torch.float32))[0][0].numpy()
    assert np.abs(v1_shifted - v[:, 1]).max() > 100 * 1e-5


def _is_hoc(obj) -> bool:
    return type(obj).__name__ == "HocObject" or type(obj).__module__ in ("hoc", "nrn")


def test_no_reference_cycle_holds_a_hoc_object(cosim):
    """NEURON aborts if the garbage collector frees a point process inside finitialize or a step:
    dropping an engine, its cells and recordings must free them at once (by reference count)."""
    import gc

    from neuron import h

    gc.collect()
    eng = cosim.SurrogateEngine(_model(), device="cpu")
    cells = [cosim.SurrogateL5PC(engine=eng) for _ in range(3)]
    rec = eng.record(cells=cells[:2], inputs=True)
    nc = cells[0].channel_target(5).connect(None)
    fih = h.FInitializeHandler(1, lambda: nc.event(1.0))
    h.finitialize(-65)
    h.continuerun(3)
    assert rec.inputs[0, 5, 1] == 1.0
    n_before = eng.n_forward
    del eng, cells, rec, nc, fih
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        hoc = [r for o in gc.garbage for r in [o, *gc.get_referents(o)] if _is_hoc(r)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert hoc == [], f"{len(hoc)} hoc objects were only reachable through reference cycles"
    assert n_before == 2
    # the dropped engine's queued step is harmless; a new engine runs normally
    h.continuerun(5)
    eng2 = cosim.SurrogateEngine(_model(), device="cpu")
    cosim.SurrogateL5PC(engine=eng2)
    h.finitialize(-65)
    h.continuerun(2)
    assert eng2.n_forward == 1


def test_touched_list_overflow_falls_back_to_a_dense_read(cosim):
    """Entries that sum back to zero are re-listed each time; past the list's capacity the step
    reads the whole rows instead, and the sums stay exact."""
    from neuron import h

    eng = cosim.SurrogateEngine(_model(), device="cpu")
    cell = cosim.SurrogateL5PC(engine=eng)
    up = cell.channel_target(9).connect(None, weight=1.0)
    down = cell.channel_target(9).connect(None, weight=-1.0, allow_negative_weights=True)   # explicit opt-in
    other = cell.channel_target(700).connect(None, weight=2.5)
    n_pairs = N_CH + 4096 + 500                          # more re-listings than the list holds

    def queue():
        for i in range(n_pairs):
            up.event(2.1 + i * 1e-4)
            down.event(2.1 + i * 1e-4 + 5e-5)
        other.event(2.9)
        up.event(4.0)                                    # a normal, sparse step afterwards

    fih = h.FInitializeHandler(1, queue)  # noqa: F841
    rec = eng.record(segments=[], inputs=True, logits=True)
    h.finitialize(-65)
    h.continuerun(6)
    x = rec.inputs[0]
    assert x[9, 3] == 0.0 and x[700, 3] == 2.5 and x[9, 4] == 1.0
    assert np.count_nonzero(x) == 2
    assert eng.n_dense_reads == 1                        # step 3 only
    # the model saw the same inputs as the recording (sparse and dense steps alike; steps 1..5)
    st = eng.model.streamer(1, device="cpu", output="mV")
    import torch

    want = np.array([st.step(torch.as_tensor(x[None, :, k], dtype=torch.float32))[1].item() for k in range(1, 6)])
    np.testing.assert_allclose(rec.spike_logit[0, 1:], want, atol=1e-6)


def test_neuron_threads_use_whole_row_reads(cosim):
    """With pc.nthread(2) the (lock-free) touched lists are off; inputs stay exact."""
    from neuron import h

    from lfdeep_neuron.parallel import parallel_context

    pc = parallel_context()
    eng = cosim.SurrogateEngine(_model(), device="cpu")
    cells = [cosim.SurrogateL5PC(engine=eng) for _ in range(4)]
    stims = []
    for i, cell in enumerate(cells):
        ns = h.NetStim()
        ns.interval, ns.number, ns.start = 1.0, 100, 0.5 + 0.1 * i
        stims.append((ns, cell.channel_target(100 * i).connect(ns, weight=0.5 * (i + 1), delay=0.2)))
    rec = eng.record(segments=[], inputs=True)
    pc.nthread(2)
    try:
        h.finitialize(-65)
        h.continuerun(8)
    finally:
        pc.nthread(1)
    x = rec.inputs
    assert eng.n_forward == 7 and eng.n_dense_reads == 8    # the t0 clear reads whole rows too
    for i in range(4):                      # one event per ms from t = 0.7 + 0.1 i: steps 1..7
        np.testing.assert_array_equal(x[i, 100 * i], [0.0] + [0.5 * (i + 1)] * 7)
    assert np.count_nonzero(x) == 4 * 7
    h.finitialize(-65)                      # back to one thread: sparse again
    h.continuerun(3)
    assert eng.n_dense_reads == 0


def test_diverging_or_nan_predictions_stop_the_run_with_a_clear_error(cosim):
    import torch
    from neuron import h

    model = _model()
    model.set_normalization(torch.full((6,), -65.0), torch.full((6,), 1e4))   # outputs of order 1e4 mV
    eng = cosim.SurrogateEngine(model, device="cpu")
    cosim.SurrogateL5PC(engine=eng, gid=None)
    h.finitialize(-65)
    with pytest.raises(RuntimeError, match=r"diverged at t = 1 ms: 1 instance\(s\).*\|v\| > 500 mV"):
        h.continuerun(5)
    cosim.SurrogateEngine.close_all()
    model = _model()
    with torch.no_grad():
        model.towers.b2.fill_(float("nan"))
    eng = cosim.SurrogateEngine(model, device="cpu")
    cosim.SurrogateL5PC(engine=eng)
    h.finitialize(-65)
    with pytest.raises(RuntimeError, match="non-finite"):
        h.continuerun(5)
    cosim.SurrogateEngine.close_all()
    model = _model()                                          # a sane model runs, with the same check
    model.set_normalization(torch.full((6,), -65.0), torch.full((6,), 3.0))
    eng = cosim.SurrogateEngine(model, device="cpu")
    cosim.SurrogateL5PC(engine=eng)
    h.finitialize(-65)
    h.continuerun(5)
    assert eng.n_forward == 4


def test_default_spike_rule_is_one_spike_per_upward_crossing(cosim):
    from neuron import h

    eng = cosim.SurrogateEngine(_model(), device="cpu", spike_threshold=-1e9)   # always above
    assert eng.spike_rule == "crossing"
    cosim.SurrogateL5PC(engine=eng)
    cosim.SurrogateL5PC(engine=eng)
    h.finitialize(-65)
    h.continuerun(6)
    gid, t = eng.spikes()
    assert len(t) == 2 and set(gid) == {-1, -2}                       # one crossing each, at step 1
    np.testing.assert_allclose(t, 1 + h.dt, atol=1e-9)
    h.finitialize(-65)                                                # a new run starts below again
    h.continuerun(3)
    assert len(eng.spikes()[1]) == 2
    with pytest.raises(ValueError, match="spike_rule"):
        cosim.SurrogateEngine(_model(seed=1), device="cpu", spike_rule="edge")


def test_negative_or_non_finite_weights_onto_a_surrogate_are_refused(cosim):
    from lfdeep_neuron.errors import InputError

    eng = cosim.SurrogateEngine(_model(), device="cpu", segments=_small_tables()[0], synapses=_small_tables()[1])
    cell = cosim.SurrogateL5PC(engine=eng)
    syn = cell.synapse("dend[0]", 0.5, "exc")
    with pytest.raises(InputError, match=r"negative NetCon weight -1\.5 onto SurrogateSynapse\(dend\[0\]"):
        cosim.connect(None, syn, weight=-1.5)
    with pytest.raises(InputError, match=r"weight nan .* is not finite"):
        syn.connect(None, weight=float("nan"))
    with pytest.raises(InputError, match=r"weight inf"):
        cell.connect(None, "dend[0]", 0.5, "inh", weight=float("inf"), allow_negative_weights=True)
    nc = cell.connect(None, "dend[0]", 0.5, "inh", weight=-0.5, allow_negative_weights=True)   # opt-in
    assert nc.weight[0] == -0.5 and nc.weight[1] == cell.synapse("dend[0]", 0.5, "inh").channel
