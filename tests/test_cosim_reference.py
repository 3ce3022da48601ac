"""A surrogate inside NEURON, driven by the events of the Hay reference record, reproduces the
offline closed-loop streamer on the same binned inputs (voltages of all 642 segments <= 1e-4 mV,
same spike steps).

The offline side is the streamer of :mod:`lfdeep_neuron.surrogate.stream` run step by step over the
binned ``input_effective`` events (what ``lfdeep-neuron rollout`` does, which is written elsewhere);
the model is an untrained real MMoE ('tiny' config at Hay size) with the record's normalisation, so
its outputs are in a mV range. The spike threshold is set at a high quantile of the offline logits
so that the spike path is exercised (an untrained model's logits are meaningless in absolute value).
"""
from __future__ import annotations

import numpy as np
import pytest

N_CH = 1278


@pytest.fixture(scope="module")
def reference(reference_dir):
    from lfdeep_neuron.data.records import read_record

    return read_record(reference_dir / "synaptic_seed1.h5", require=("segments", "synapses", "input_effective"))


def _model(rec):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(3)
    model = MMoE.from_config("tiny", n_segments=642, n_channels=N_CH)
    v = rec["v_1ms"].astype(np.float64)
    model.set_normalization(v.mean(1), v.std(1), v_rest=v[:, 0])
    model.meta = dict(segments=rec["segments"], synapses=rec["synapses"], dt_ms=1.0)
    return model


def test_surrogate_in_neuron_matches_offline_streamer(reference):
    import torch

    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC

    torch.set_num_threads(1)
    rec = reference
    T = int(rec.attrs["duration_ms"])
    syn = rec["input_effective"]["syn_idx"].astype(np.int64)
    t_ev = rec["input_effective"]["t_ms"]
    keep = t_ev < T
    syn, t_ev = syn[keep], t_ev[keep]
    assert np.all(t_ev == np.round(t_ev))              # the reference's events sit on integer ms
    model = _model(rec)

    # offline: bin (k-1, k] -> column k, closed-loop streamer
    x = np.zeros((N_CH, T))
    np.add.at(x, (syn, t_ev.astype(np.int64)), 1.0)
    st = model.streamer(1, device="cpu", feedback=True, output="mV")
    v_off = np.empty((642, T), np.float32)
    logit_off = np.empty(T, np.float32)
    xt = torch.as_tensor(x.T.copy(), dtype=torch.float32)
    with torch.inference_mode():
        for k in range(T):
            v, lg = st.step(xt[k:k + 1])
            v_off[:, k], logit_off[k] = v[0].numpy(), lg[0].item()
    threshold = float(np.quantile(logit_off, 0.995))
    steps_off = np.flatnonzero(logit_off > threshold)
    assert 5 <= len(steps_off) <= 40

    # NEURON: one SurrogateL5PC, one NetCon per channel addressed by (section, x, kind)
    try:
        engine = SurrogateEngine(model, device="cpu", spike_threshold=threshold)
        cell = SurrogateL5PC(engine=engine, gid=None)
        seg_names = rec["segments"]["name"]
        seg_x = rec["segments"]["x"]
        ncs = []
        for c in range(N_CH):
            s = int(rec["synapses"]["seg_idx"][c])
            kind = "exc" if rec["synapses"]["type"][c] == 0 else "inh"
            syn_handle = cell.synapse(seg_names[s], seg_x[s], kind)
            assert syn_handle.channel == c                  # same addressing as the record's table
            ncs.append(syn_handle.connect(None, weight=1.0, delay=0.0))
        order = np.argsort(t_ev, kind="stable")

        def queue():
            for i in order:
                ncs[syn[i]].event(float(t_ev[i]))

        fih = h.FInitializeHandler(1, queue)  # noqa: F841
        recording = engine.record(segments="all", inputs=True, logits=True)
        t_spk = h.Vector()
        src = cell.spike_netcon()
        src.record(t_spk)
        h.dt = 0.025
        h.tstop = T
        h.run()

        assert engine.n_forward == T
        np.testing.assert_array_equal(recording.inputs[0], x)          # the same binned inputs
        np.testing.assert_array_equal(recording.t_ms, np.arange(T, dtype=float))
        v_nrn = recording.v_mV[0]
        err = np.abs(v_nrn - v_off).max()
        assert err <= 1e-4, f"max |v_neuron - v_offline| = {err} mV"
        assert np.ptp(v_nrn[0]) > 100 * 1e-4            # the trace moves far more than the tolerance
        np.testing.assert_allclose(recording.spike_logit[0], logit_off, atol=1e-5, rtol=0)
        # spikes: emitted as net_event at the stepper's time k + dt (fixed step)
        t_emitted = np.asarray(t_spk)
        np.testing.assert_allclose(t_emitted, steps_off + h.dt, atol=1e-9)
        gid_e, t_e = engine.spikes()
        np.testing.assert_allclose(t_e, t_emitted, atol=0)
    finally:
        SurrogateEngine.close_all()
