"""Action potentials in the predicted voltages (surrogate/waveform.py) and where they are used.

* the streaming form equals the whole-sequence form (random and overlapping spikes, a delay, currents), and
  both follow the restart rule worked out by hand;
* the spike-triggered average recovers a planted kernel (isolation, windows ended by the next spike,
  baseline subtraction), and ``fit_spike_waveform`` recovers one planted on a real surrogate's own
  closed-loop prediction (the alignment of predictions, targets and spikes);
* checkpoints keep the waveform (absent = none; malformed = CheckpointError), ``lfdeep-neuron waveform``
  writes it;
* the co-simulation engine adds it exactly at the cells that fired and nowhere else, without touching
  the model's state; ``rollout`` shows a somatic AP above 0 mV.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lfdeep_neuron.surrogate.waveform import SpikeWaveform, fit_spike_waveform, spike_triggered_average

torch.set_num_threads(1)
N_CH = 1278


def _kernel(S, K, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(S, K, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# the two forms
# ---------------------------------------------------------------------------------------------------------
def test_restart_rule_by_hand():
    S, K, T = 2, 4, 12
    kv = torch.arange(1.0, S * K + 1, dtype=torch.float64).view(S, K)
    wf = SpikeWaveform(kv)
    spiked = torch.zeros(1, T, dtype=torch.bool)
    spiked[0, [2, 4]] = True                               # the second spike restarts the first's waveform
    v, _ = wf.apply(torch.zeros(1, S, T, dtype=torch.float64), spiked)
    want = torch.zeros(S, T, dtype=torch.float64)
    want[:, 2:4] = kv[:, :2]
    want[:, 4:8] = kv
    assert torch.equal(v[0], want)
    wf2 = SpikeWaveform(kv, delay_steps=1)
    v2, _ = wf2.apply(torch.zeros(1, S, T, dtype=torch.float64), spiked)
    want2 = torch.zeros(S, T, dtype=torch.float64)
    want2[:, 3] = kv[:, 0]                                 # spike at 2: column 0 at step 3, cut at step 4
    want2[:, 5:9] = kv
    assert torch.equal(v2[0], want2)


@pytest.mark.parametrize("delay", [0, 2])
def test_streaming_equals_full_form(delay):
    B, S, K, T = 5, 7, 6, 80
    g = torch.Generator().manual_seed(1)
    wf = SpikeWaveform(_kernel(S, K, 20.0), _kernel(S, K, 0.5, seed=1), delay_steps=delay)
    spiked = torch.rand(B, T, generator=g) < 0.12              # many spikes within K of each other
    spiked[0] = False                                          # one cell never fires
    spiked[1, :] = False
    spiked[1, [3, 4, 5, T - 2]] = True                         # consecutive spikes, one near the end
    v = torch.randn(B, S, T, generator=g, dtype=torch.float64) - 65.0
    imem = torch.randn(B, S, T, generator=g, dtype=torch.float64)
    v_full, i_full = wf.apply(v, spiked, imem)
    state = wf.initial_state(B)
    for t in range(T):
        v_t, i_t, state = wf.step(state, v[:, :, t], spiked[:, t], imem[:, :, t])
        torch.testing.assert_close(v_t, v_full[:, :, t], rtol=0, atol=1e-12)
        torch.testing.assert_close(i_t, i_full[:, :, t], rtol=0, atol=1e-12)
    state = wf.initial_state(B)                                # in place (the engine's way): same numbers
    for t in range(T):
        v_in, i_in = v[:, :, t].clone(), imem[:, :, t].clone()
        v_t, i_t, state = wf.step(state, v_in, spiked[:, t], i_in, inplace=True)
        assert v_t is v_in and i_t is i_in
        torch.testing.assert_close(v_in, v_full[:, :, t], rtol=0, atol=1e-12)
        torch.testing.assert_close(i_in, i_full[:, :, t], rtol=0, atol=1e-12)
    assert torch.equal(v_full[0], v[0]) and torch.equal(i_full[0], imem[0])   # no spike: unchanged
    assert not torch.equal(v_full[2:], v[2:])
    v_np, i_np = wf.apply(v.numpy(), spiked.numpy())           # numpy in, numpy out, same numbers
    assert isinstance(v_np, np.ndarray) and i_np is None
    np.testing.assert_allclose(v_np, v_full.numpy(), atol=1e-12)


def test_bad_kernels_are_input_errors():
    from lfdeep_neuron.errors import InputError

    with pytest.raises(InputError, match=r"kernel_v_mV must be a float \[S, K\]"):
        SpikeWaveform(torch.zeros(5))
    with pytest.raises(InputError, match="non-finite"):
        SpikeWaveform(torch.full((2, 3), float("nan")))
    with pytest.raises(InputError, match="same"):
        SpikeWaveform(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------
def _planted(S, T, K, seed=0):
    """Residual = planted kernel at spikes (restart rule) + noise; spike steps incl. a burst."""
    rng = np.random.default_rng(seed)
    kern = _kernel(S, K, 10.0, seed=seed)
    spikes = np.arange(40, T - 30, 37)                   # isolated
    burst = np.array([spikes[3] + 3, spikes[7] + 2])     # not isolated; they cut the windows before them
    bins = np.sort(np.r_[spikes, burst])
    spiked = np.zeros((1, T), bool)
    spiked[0, bins] = True
    res = SpikeWaveform(kern).apply(np.zeros((1, S, T)), spiked)[0][0] + 0.05 * rng.standard_normal((S, T))
    return kern.numpy(), res, bins, burst


def test_sta_recovers_a_planted_kernel():
    S, T, K = 4, 2000, 8
    kern, res, bins, burst = _planted(S, T, K)
    est, counts, used = spike_triggered_average(res, bins, K)
    assert set(used) == set(bins) - set(burst)           # the burst spikes are not isolated
    n = len(used)
    # columns 3.. of one window and 2.. of another were cut by the burst spikes (restart rule)
    assert counts.tolist() == [n, n, n - 1, n - 2, n - 2, n - 2, n - 2, n - 2]
    np.testing.assert_allclose(est, kern, atol=0.05)
    # a constant offset of the model (pre-spike residual) is removed by the baseline
    est_b, _, used_b = spike_triggered_average(res + 5.0, bins, K, baseline_ms=5)
    np.testing.assert_allclose(est_b, kern, atol=0.1)
    est_nb, _, _ = spike_triggered_average(res + 5.0, bins, K)
    np.testing.assert_allclose(est_nb, kern + 5.0, atol=0.05)
    # no spike, no estimate
    est0, c0, u0 = spike_triggered_average(res, [], K)
    assert u0.size == 0 and (c0 == 0).all() and (est0 == 0).all()


class _Sims:
    """Whole simulations as item dicts (the interface fit_spike_waveform reads from a SimulationDataset)."""

    window_ms = None
    split = "planted"

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _tiny(feedback=True, imem=True, S=6, C=N_CH):
    from lfdeep_neuron.surrogate.mtl import MH

    torch.manual_seed(0)
    m = MH.from_config("tiny", n_segments=S, n_channels=C, feedback=feedback, imem_tasks=imem)
    m.set_normalization(np.linspace(-72, -62, S), np.full(S, 4.0), v_rest=np.full(S, -70.0),
                        imem_mean=np.zeros(S), imem_std=np.full(S, 0.2))
    return m.eval()


@pytest.mark.parametrize("feedback", [True, False])
def test_fit_recovers_a_kernel_planted_on_the_models_own_prediction(feedback):
    """v_true = the model's closed-loop prediction + planted AP waveform: the fit must give the waveform."""
    from lfdeep_neuron.surrogate.stream import closed_loop

    S, T, K = 6, 700, 6
    m = _tiny(feedback=feedback, C=10)
    rng = np.random.default_rng(3)
    kv, ki = _kernel(S, K, 30.0, seed=4), _kernel(S, K, 0.3, seed=5)
    items = []
    for sim in range(2):
        x = torch.from_numpy(rng.poisson(0.3, (10, T)).astype(np.float32))
        v0 = torch.full((S,), -70.0)
        pred = closed_loop(m, x[None, :, 1:], v0_mV=v0[None], output="mV")
        v = torch.cat([v0[:, None], pred.v[0]], 1).double()
        i = torch.cat([torch.zeros(S, 1), pred.imem[0]], 1).double()
        spike = np.zeros(T, np.float32)
        bins = np.r_[np.arange(30 + sim, T - 10, 41), 30 + sim + 5 * 41 + 3]    # + a burst: 3 ms after one
        spike[bins] = 1
        v_true, i_true = SpikeWaveform(kv, ki).apply(v[None], torch.from_numpy(spike[None] > 0), i[None])
        items.append({"x_syn": x, "v": v_true[0].float(), "imem": i_true[0].float(),
                      "spike": torch.from_numpy(spike)})
    wf = fit_spike_waveform(m, _Sims(items), kernel_ms=K)
    assert wf.n_spikes == 2 * len(np.arange(30, T - 10, 41))         # the burst spikes are excluded
    torch.testing.assert_close(wf.kernel_v_mV.double(), kv, atol=1e-3, rtol=0)
    torch.testing.assert_close(wf.kernel_i_nA.double(), ki, atol=1e-4, rtol=0)
    assert wf.info["sims"] == [0, 1] and wf.info["column_counts"][0] == wf.n_spikes


def test_fit_without_spikes_is_an_input_error():
    from lfdeep_neuron.errors import InputError

    m = _tiny(C=10)
    item = {"x_syn": torch.zeros(10, 50), "v": torch.full((6, 50), -70.0), "imem": torch.zeros(6, 50),
            "spike": torch.zeros(50)}
    with pytest.raises(InputError, match="no isolated somatic spike"):
        fit_spike_waveform(m, _Sims([item]), kernel_ms=5)


# ---------------------------------------------------------------------------------------------------------
# checkpoints and the CLI
# ---------------------------------------------------------------------------------------------------------
def _save(path, m, **kw):
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint
    from lfdeep_neuron.surrogate.synthetic import synthetic_tables

    segs, syns = synthetic_tables(m.n_segments)
    syns = {"syn_idx": np.arange(m.n_channels), "seg_idx": 1 + np.arange(m.n_channels) % (m.n_segments - 1),
            "type": (np.arange(m.n_channels) >= m.n_channels // 2).astype(int)}
    return save_checkpoint(path, m, segments=segs, synapses=syns, **kw)


def test_checkpoint_round_trip_and_errors(tmp_path):
    from lfdeep_neuron.surrogate.checkpoint import (CheckpointError, SegmentMismatchError, load_surrogate,
                                                    write_spike_waveform)

    m = _tiny(C=10)
    wf = SpikeWaveform(_kernel(6, 5, 20.0).float(), _kernel(6, 5, 0.2, seed=1).float(), delay_steps=1,
                       n_spikes=17, info={"data": "planted", "sims": [1, 2]})
    old = _save(tmp_path / "old.pt", m)                                # no waveform: loads as before
    assert load_surrogate(old).meta["spike_waveform"] is None
    new = _save(tmp_path / "new.pt", m, spike_waveform=wf)
    got = load_surrogate(new).meta["spike_waveform"]
    assert torch.equal(got.kernel_v_mV, wf.kernel_v_mV) and torch.equal(got.kernel_i_nA, wf.kernel_i_nA)
    assert (got.delay_steps, got.n_spikes, got.info) == (1, 17, {"data": "planted", "sims": [1, 2]})
    # written into an existing checkpoint (in place, nothing else changes); then removed again
    before = torch.load(old, weights_only=True)
    write_spike_waveform(old, wf)
    after = torch.load(old, weights_only=True)
    assert set(after) == set(before) | {"spike_waveform"}
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert torch.equal(load_surrogate(old).meta["spike_waveform"].kernel_v_mV, wf.kernel_v_mV)
    write_spike_waveform(old, None, out=tmp_path / "none.pt")
    assert load_surrogate(tmp_path / "none.pt").meta["spike_waveform"] is None
    # malformed
    with pytest.raises(SegmentMismatchError, match="5 segments"):
        write_spike_waveform(old, SpikeWaveform(torch.zeros(5, 3)))
    ck = torch.load(new, weights_only=True)
    ck["spike_waveform"]["kernel_v_mV"] = torch.zeros(6)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: .*kernel_v_mV must be a float \[S, K\]"):
        load_surrogate(tmp_path / "bad.pt")
    no_i = _save(tmp_path / "noi.pt", _tiny(imem=False, C=10))
    with pytest.raises(CheckpointError, match="predicts no currents"):
        write_spike_waveform(no_i, wf)


def test_bundled_checkpoint_loads_with_its_waveform_and_without_one(tmp_path):
    """The bundled checkpoint's fitted waveform is what ``load_surrogate`` returns, value for value; the same
    file without the optional key (a checkpoint older than waveforms) loads with None and the same weights.

    Issue 33, "Why" item 5: this test (then ``..._loads_without_a_waveform``) asserted only that the key
    ``spike_waveform`` is in ``meta``, which ``load_surrogate`` always sets -- a loader that dropped the
    waveform, or one that invented one for a file without it, passed."""
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate

    path = bundled_checkpoint()
    raw = torch.load(path, weights_only=True)                  # the file itself is the reference
    stored = raw["spike_waveform"]
    wf = load_surrogate(path).meta["spike_waveform"]
    assert isinstance(wf, SpikeWaveform)
    assert wf.kernel_v_mV.shape == wf.kernel_i_nA.shape == (642, stored["info"]["kernel_ms"])
    assert torch.equal(wf.kernel_v_mV, stored["kernel_v_mV"]) and torch.equal(wf.kernel_i_nA, stored["kernel_i_nA"])
    assert (wf.delay_steps, wf.n_spikes, wf.info) == (stored["delay_steps"], stored["n_spikes"], stored["info"])
    assert float(wf.kernel_v_mV[0].max()) > 20.0               # a somatic AP: tens of mV above the prediction
    del raw["spike_waveform"]
    torch.save(raw, tmp_path / "no_waveform.pt")
    old = load_surrogate(tmp_path / "no_waveform.pt")
    assert old.meta["spike_waveform"] is None
    new = load_surrogate(path).state_dict()
    assert all(torch.equal(v, new[k]) for k, v in old.state_dict().items()) and set(new) == set(old.state_dict())


def test_cli_fits_and_writes_the_waveform(tmp_path, capsys):
    """lfdeep-neuron waveform on a dataset directory of records: one line, the checkpoint carries it."""
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.data.records import write_record
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate
    from lfdeep_neuron.surrogate.stream import closed_loop
    from lfdeep_neuron.surrogate.synthetic import synthetic_tables

    m = _tiny(feedback=False, imem=False, C=N_CH)
    ckpt = _save(tmp_path / "m.pt", m)
    segs, _ = synthetic_tables(6)
    syns = {"syn_idx": np.arange(N_CH), "seg_idx": 1 + np.arange(N_CH) % 5, "type": (np.arange(N_CH) >= 639) * 1}
    rng = np.random.default_rng(0)
    T, K = 300, 4
    kv = _kernel(6, K, 40.0, seed=9)
    data = tmp_path / "data"
    for sim in range(2):
        n_ev = 3000
        ev = {"syn_idx": rng.integers(0, N_CH, n_ev), "t_ms": np.sort(rng.uniform(0, T - 1, n_ev))}
        from lfdeep_neuron.data.dataset import bin_events
        x = torch.from_numpy(bin_events(ev["syn_idx"], ev["t_ms"], N_CH, 0, T))
        pred = closed_loop(m, x[None, :, 1:], output="mV").v[0]
        v = torch.cat([m.v_rest[:, None], pred], 1).double()
        spikes_ms = np.arange(20.3 + sim, T - 10, 29.0)
        spiked = np.zeros((1, T), bool)
        spiked[0, np.ceil(spikes_ms).astype(int)] = True
        v_true = SpikeWaveform(kv).apply(v[None], spiked)[0][0].numpy()
        write_record(data / f"sim_{sim:06d}.h5", segments=segs, synapses=syns,
                     traces={"v_1ms": v_true.astype(np.float32), "t_1ms": np.arange(T, dtype=float),
                             "soma_spike_times_ms": spikes_ms, "imem_mean_1ms": np.zeros((6, T), np.float32)},
                     attrs={"protocol": "synthetic", "duration_ms": float(T)}, inputs=ev, inputs_effective=ev)
    out = tmp_path / "with_wf.pt"
    code = main(["waveform", "--model", str(ckpt), "--data", str(data), "--split", "all", "--kernel-ms", str(K),
                 "--out", str(out), "--no-progress"])
    line = capsys.readouterr().out.strip()
    assert code == 0 and line.startswith(f"wrote {out}: ") and "spikes used" in line and "\n" not in line
    wf = load_surrogate(out).meta["spike_waveform"]
    torch.testing.assert_close(wf.kernel_v_mV.double(), kv, atol=2e-3, rtol=0)     # float32 records
    assert f"{wf.n_spikes} spikes used" in line and f"{wf.soma_peak_mV:+.1f} mV" in line
    assert load_surrogate(ckpt).meta["spike_waveform"] is None                      # --out: source untouched
    # bad input: one line, exit 2
    code = main(["waveform", "--model", str(ckpt), "--data", str(data), "--kernel-ms", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "lfdeep-neuron waveform: error: --kernel-ms must be >= 1, got 0"


# ---------------------------------------------------------------------------------------------------------
# where spikes are decided: the engine and rollout
# ---------------------------------------------------------------------------------------------------------
def test_engine_adds_the_waveform_exactly_where_cells_fired(cosim):
    """Two cells, one driven: the waveform lands on the fired cell's rows at steps k..k+K-1 only; spikes and
    the raw model output are those of the run without waveform (the model's state and feedback untouched)."""
    from neuron import h

    from lfdeep_neuron.surrogate.synthetic import synthetic_tables

    m = _tiny(feedback=True, imem=True, C=N_CH)
    with torch.no_grad():           # untrained: excitation lowers the spike logit a little; make it raise it
        m.towers.w2[m.n_segments].mul_(-50.0)
    segs, _ = synthetic_tables(6)
    syns = {"syn_idx": np.arange(N_CH), "seg_idx": 1 + np.arange(N_CH) % 5, "type": (np.arange(N_CH) >= 639) * 1}
    K = 3
    wf = SpikeWaveform(100.0 + torch.arange(6 * K, dtype=torch.float64).view(6, K),
                       1.0 + torch.arange(6 * K, dtype=torch.float64).view(6, K))
    eng = cosim.SurrogateEngine(m, device="cpu", segments=segs, synapses=syns, dtype=torch.float64,
                                spike_waveform=False)
    cells = [cosim.SurrogateL5PC(engine=eng) for _ in range(2)]
    src = h.NetStim()
    src.start, src.number, src.interval, src.noise = 2.5, 6, 2.0, 0.0
    ncs = [cells[0].channel_target(c).connect(src, weight=5.0, delay=1.0) for c in range(40)]
    T = 20

    def run():
        rec = eng.record(currents=True, logits=True)
        h.finitialize(-65)
        h.continuerun(T)
        eng.remove_sink(rec)          # a Recording records every later run too: keep this run's
        return rec

    raw = run()
    lg = raw.spike_logit                                        # [2, T]
    # a threshold that the driven cell crosses and the quiet one never reaches
    hi0, hi1 = np.nanmax(lg[0]), np.nanmax(lg[1])
    assert hi0 > hi1 + 0.01, "the drive must raise cell 0's spike logit above cell 1's"
    eng.spike_threshold = float(hi0 + hi1) / 2
    raw = run()
    gid_raw, t_raw = eng.spikes()
    eng.spike_waveform = wf
    got = run()
    gid, t = eng.spikes()
    np.testing.assert_array_equal(gid, gid_raw)
    np.testing.assert_array_equal(t, t_raw)
    assert len(t) >= 1 and set(gid.tolist()) == {-1}       # only cell 0 (local #0) fired
    np.testing.assert_array_equal(got.spike_logit, raw.spike_logit)
    spiked = np.zeros((2, T), bool)
    spiked[0, np.round(t - h.dt).astype(int)] = True       # emitted at k + dt
    v_want, i_want = wf.apply(torch.from_numpy(raw.v_mV).double(), torch.from_numpy(spiked),
                              torch.from_numpy(raw.imem_nA).double())
    np.testing.assert_allclose(got.v_mV, v_want.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.imem_nA, i_want.numpy(), atol=1e-5)
    changed = np.abs(got.v_mV - raw.v_mV).max(axis=1) > 1.0              # [2, T]
    assert not changed[1].any()                                          # the quiet cell: untouched
    ks = np.flatnonzero(spiked[0])
    inside = np.zeros(T, bool)
    for k in ks:
        inside[k:k + K] = True
    np.testing.assert_array_equal(changed[0], inside)                    # exactly the waveform's steps
    del ncs


def test_rollout_shows_a_somatic_action_potential():
    from lfdeep_neuron.surrogate.rollout import rollout

    m = _tiny(feedback=False, imem=False, C=10)
    K = 4
    kv = torch.zeros(6, K)
    kv[0] = torch.tensor([110.0, 20.0, -5.0, -2.0])           # an AP at the soma, +~40 mV peak
    x = np.random.default_rng(0).poisson(0.5, (10, 60)).astype(np.float32)
    plain = rollout(m, x, spike_threshold=-1e9, spike_waveform=False)
    m.meta = {"spike_waveform": SpikeWaveform(kv)}               # as load_surrogate attaches it
    res = rollout(m, x, spike_threshold=-1e9)                   # logit above from step 1: one spike
    np.testing.assert_array_equal(res["soma_spike_times_ms"], [0.5])
    assert plain["v_1ms"][0].max() < -40 and res["v_1ms"][0].max() > 0
    assert int(np.argmax(res["v_1ms"][0])) == 1
    np.testing.assert_allclose(res["v_1ms"][:, 1:1 + K] - plain["v_1ms"][:, 1:1 + K], kv.numpy(), atol=1e-4)
    np.testing.assert_array_equal(res["v_1ms"][:, 1 + K:], plain["v_1ms"][:, 1 + K:])
    assert res["spike_waveform"] is m.meta["spike_waveform"] and plain["spike_waveform"] is None


def test_rollout_returns_membrane_currents_with_the_current_kernel():
    from lfdeep_neuron.surrogate.rollout import rollout

    m = _tiny(feedback=False, imem=True, C=10)
    K = 3
    kv, ki = torch.zeros(6, K), torch.zeros(6, K)
    kv[0] = torch.tensor([100.0, 10.0, -3.0])
    ki[0] = torch.tensor([-2.0, 0.5, 0.1])
    x = np.random.default_rng(1).poisson(0.5, (10, 40)).astype(np.float32)
    plain = rollout(m, x, spike_threshold=-1e9, spike_waveform=False)
    assert plain["imem_mean_1ms"].shape == (6, 40) and plain["imem_mean_1ms"].dtype == np.float32
    np.testing.assert_array_equal(plain["imem_mean_1ms"][:, 0], 0.0)
    assert np.isfinite(plain["imem_mean_1ms"]).all() and np.abs(plain["imem_mean_1ms"][:, 1:]).max() > 0
    m.meta = {"spike_waveform": SpikeWaveform(kv, ki)}
    res = rollout(m, x, spike_threshold=-1e9)                   # one spike, at step 1
    np.testing.assert_allclose(res["imem_mean_1ms"][:, 1:1 + K] - plain["imem_mean_1ms"][:, 1:1 + K], ki.numpy(),
                               atol=1e-5)
    np.testing.assert_array_equal(res["imem_mean_1ms"][:, 1 + K:], plain["imem_mean_1ms"][:, 1 + K:])
    no_imem = rollout(_tiny(feedback=False, imem=False, C=10), x)
    assert no_imem["imem_mean_1ms"] is None
