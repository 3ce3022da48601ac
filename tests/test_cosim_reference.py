"""(c) A surrogate inside NEURON, driven by the events of the Hay reference record, reproduces the
real ``lfdeep-neuron rollout`` CLI on the same checkpoint and inputs: ``v_1ms`` of all 642
segments within 1e-4 mV, the same spike steps; also for a model that reads its own emitted spikes
(spike history), where any difference in a spike decision would change everything after it.

The checkpoint is an untrained real MMoE ('tiny' config at Hay size) with the record's
normalisation (so its outputs are in a mV range) and the record's segment/synapse tables, saved
with ``save_checkpoint``. An untrained model's logits are meaningless in absolute value, so a first
rollout gives the logits, and the checkpoint is saved again with a calibrated
``metrics['spike_threshold_logit']`` at a high quantile of them: both the CLI and the engine then
use it by default, and the spike path is exercised.

Time conventions compared: both sides put the initial state (``model.v_rest``) at t = 0 and step
k >= 1 consumes (k-1, k]. Rollout places step k's spike at k - 0.5 ms, the engine emits it at
k + dt (fixed step): the test compares the step indices.
"""
from __future__ import annotations

import numpy as np
import pytest

N_CH = 1278
DURATION_MS = 500


@pytest.fixture(scope="module")
def reference(reference_dir):
    from lfdeep_neuron.data.records import read_record

    return read_record(reference_dir / "synaptic_seed1.h5", require=("segments", "synapses", "input_effective"))


def _model(rec, **over):
    import torch

    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(3)
    model = MMoE.from_config("tiny", n_segments=642, n_channels=N_CH, **over)
    v = rec["v_1ms"].astype(np.float64)
    model.set_normalization(v.mean(1), v.std(1), v_rest=v[:, 0])
    return model


def _rollout_cli(ckpt, inputs, out):
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.data.records import read_record

    rc = main(["rollout", "--model", str(ckpt), "--inputs", str(inputs), "--out", str(out),
               "--duration-ms", str(DURATION_MS), "--no-progress"])
    assert rc == 0
    return read_record(out)


@pytest.mark.parametrize("history", [False, True], ids=["input-only", "spike-history"])
def test_surrogate_in_neuron_matches_rollout_cli(reference, reference_dir, tmp_path, history):
    import torch

    import lfdeep_neuron  # noqa: F401
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC
    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    rec = reference
    inputs = reference_dir / "synaptic_seed1.h5"
    T = DURATION_MS
    model = _model(rec, spike_history=history)
    tables = dict(segments=rec["segments"], synapses=rec["synapses"], dt_ms=1.0)

    # calibrate a threshold on a first rollout, then save the checkpoint that both sides use
    first = _rollout_cli(save_checkpoint(tmp_path / "raw.pt", model, **tables), inputs, tmp_path / "raw.h5")
    logits = np.asarray(first["spike_logit_1ms"], np.float64)
    assert np.isnan(logits[0]) and np.isfinite(logits[1:]).all()
    threshold = float(np.quantile(logits[1:], 0.99))
    ckpt = save_checkpoint(tmp_path / "tiny.pt", model, metrics={"spike_threshold_logit": threshold}, **tables)
    out = _rollout_cli(ckpt, inputs, tmp_path / "rollout.h5")
    assert float(out.attrs["spike_threshold_logit"]) == threshold     # the CLI took the calibrated one
    v_cli = np.asarray(out["v_1ms"])
    spikes_cli = np.asarray(out["soma_spike_times_ms"])
    steps_cli = np.ceil(spikes_cli).astype(np.int64)                  # rollout: step k -> k - 0.5 ms
    assert v_cli.shape == (642, T)
    assert 3 <= len(steps_cli) <= 20
    after = np.arange(T) > steps_cli[0]
    moved = np.abs(np.asarray(out["spike_logit_1ms"])[after] - logits[after]).max()
    # with spike history the emitted spikes are inputs: the logits after the first spike change
    assert (moved > 0.05 * np.std(logits[1:])) if history else (moved < 1e-6)   # (untrained: logit std ~1e-3)

    syn = rec["input_effective"]["syn_idx"].astype(np.int64)
    t_ev = np.asarray(rec["input_effective"]["t_ms"], np.float64)
    keep = t_ev < T
    syn, t_ev = syn[keep], t_ev[keep]
    assert np.all(t_ev == np.round(t_ev))              # the reference's events sit on integer ms

    # NEURON: one SurrogateL5PC from the checkpoint file, one NetCon per channel by (section, x, kind)
    try:
        engine = SurrogateEngine(str(ckpt), device="cpu")                # spike_threshold: the checkpoint's
        assert engine.spike_threshold == threshold
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

        assert engine.n_forward == engine.n_steps == T - 1         # steps 1 .. T-1, one pass each
        np.testing.assert_array_equal(recording.t_ms, np.arange(T, dtype=float))
        x = bin_events(syn, t_ev, N_CH, 0, T)                       # rollout's binning
        np.testing.assert_array_equal(recording.inputs[0][:, 1:], x[:, 1:])
        v_nrn = recording.v_mV[0]
        np.testing.assert_array_equal(v_nrn[:, 0], v_cli[:, 0])     # the initial state, v_rest
        err = float(np.abs(v_nrn - v_cli).max())
        print(f"max |v_neuron - v_rollout| over 642 segments x {T} ms = {err:.3g} mV")
        assert err <= 1e-4, f"max |v_neuron - v_rollout| = {err} mV"
        assert np.ptp(v_nrn[0]) > 1e4 * 1e-4            # the trace moves far more than the tolerance
        lg = recording.spike_logit[0]
        assert np.isnan(lg[0])
        np.testing.assert_allclose(lg[1:], out["spike_logit_1ms"][1:], atol=1e-5, rtol=0)
        # spikes: emitted as net_event at the stepper's time k + dt (fixed step): same steps as rollout
        t_emitted = np.asarray(t_spk)
        steps_nrn = np.round(t_emitted - h.dt).astype(np.int64)
        np.testing.assert_allclose(t_emitted, steps_nrn + h.dt, atol=1e-9)
        np.testing.assert_array_equal(steps_nrn, steps_cli)
        gid_e, t_e = engine.spikes()
        np.testing.assert_allclose(t_e, t_emitted, atol=0)
    finally:
        SurrogateEngine.close_all()
