"""The spike-reliability benchmark's perturbations: exact amounts, bounds, reproducibility, bad arguments."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def reliability(benchmark_module):
    return benchmark_module("spike_reliability")


def _events(n=20000, duration_ms=1000.0, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 1278, n), rng.randint(0, int(duration_ms), n).astype(np.float64)


def test_jitter_moves_the_chosen_fraction_by_one_ms_inside_the_run(reliability):
    syn, t = _events()
    syn2, t2, n = reliability.perturb_events(syn, t, "jitter", 0.01, 1000.0, np.random.RandomState(3))
    moved = t2 != t
    assert np.array_equal(syn2, syn)                       # which synapse fires is unchanged
    assert 150 < n < 250                                   # ~1 % of 20000 chosen
    # every chosen event moved by exactly 1 ms, except those clipped at the edges, which stay inside
    assert moved.sum() <= n and np.all(np.abs(t2 - t)[moved] <= 1.0)
    assert np.all(np.abs(t2 - t)[moved & (t >= 2) & (t <= 997)] == 1.0)
    assert t2.min() >= 0.0 and t2.max() <= 999.0
    assert np.all(t2[moved] >= 1.0)
    # earlier and later both occur, about equally
    d = (t2 - t)[moved]
    assert 0.3 < (d > 0).mean() < 0.7
    # the same generator state gives the same perturbation
    _, t3, _ = reliability.perturb_events(syn, t, "jitter", 0.01, 1000.0, np.random.RandomState(3))
    assert np.array_equal(t2, t3)


def test_drop_deletes_the_chosen_fraction_and_keeps_the_rest_in_order(reliability):
    syn, t = _events()
    syn2, t2, n = reliability.perturb_events(syn, t, "drop", 0.1, 1000.0, np.random.RandomState(5))
    assert syn2.size == t2.size == syn.size - n and 1800 < n < 2200
    keep = np.random.RandomState(5).rand(t.size) >= 0.1
    assert np.array_equal(syn2, syn[keep]) and np.array_equal(t2, t[keep])


def test_none_and_dt_leave_the_events_alone(reliability):
    syn, t = _events(n=100)
    for kind, value in (("none", 0.0), ("dt", 0.025)):
        syn2, t2, n = reliability.perturb_events(syn, t, kind, value, 1000.0, np.random.RandomState(0))
        assert n == 0 and np.array_equal(syn2, syn) and np.array_equal(t2, t)


@pytest.mark.parametrize("text", ["jitter", "jitter:2", "drop:-0.1", "dt:0", "none:1", "shift:0.1"])
def test_bad_perturbations_are_refused(reliability, text):
    with pytest.raises(ValueError, match="perturbation"):
        reliability.parse_perturbation(text)
    with pytest.raises(SystemExit, match="spike_reliability: perturbation"):
        reliability.main(["--data", "nowhere", "--perturb", text, "--json", "unused.json"])


def test_good_perturbations_parse(reliability):
    assert reliability.parse_perturbation("none") == ("none", 0.0)
    assert reliability.parse_perturbation("jitter:0.001") == ("jitter", 0.001)
    assert reliability.parse_perturbation("dt:0.025") == ("dt", 0.025)


def test_a_missing_dataset_is_named(reliability, tmp_path):
    with pytest.raises(SystemExit, match="no dataset at .*meta.json"):
        reliability.main(["--data", str(tmp_path / "nowhere"), "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.json.jsonl").exists()


def test_nearest_shifts(reliability):
    rows = [{"rerun_ms": [10.2, 50.0, 99.0], "recorded_ms": [10.0, 51.5]},
            {"rerun_ms": [], "recorded_ms": [5.0]}, {"rerun_ms": [3.0], "recorded_ms": []}]
    assert np.allclose(reliability.nearest_shifts_ms(rows), [0.2, 1.5, 47.5])
    assert reliability.nearest_shifts_ms([]).size == 0


def test_figure_is_written(reliability, tmp_path):
    summary = {"sims": [1, 2], "perturbations": {"none": {"gamma": 1.0, "n_true": 3},
                                                  "jitter:0.1": {"gamma": 0.5, "n_true": 3}}}
    shifts = {"none": np.zeros(3), "jitter:0.1": np.array([0.1, 1.5, 40.0])}
    reliability.plot(summary, shifts, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_surrogate_trains_equal_single_cell_rollouts(reliability, tiny_ckpt):
    """The batched closed-loop run gives each record the spikes that `rollout` gives it alone, perturbed inputs
    included (same events, same time convention)."""
    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate
    from lfdeep_neuron.surrogate.rollout import rollout

    model = load_surrogate(tiny_ckpt).eval()
    T = 300
    records = []
    for seed in (1, 2, 3):
        syn, t = _events(n=30000, duration_ms=T, seed=seed)
        records.append({"syn": syn, "t_ms": t + 0.5 * (seed == 2), "duration_ms": float(T),
                        "v0_mV": model.v_rest.detach().numpy() + seed})
    probe = rollout(model, bin_events(records[0]["syn"], records[0]["t_ms"], 1278, 0, T), records[0]["v0_mV"],
                    spike_threshold=0.0, spike_waveform=False)["spike_logit_1ms"][1:]
    thr = float(np.quantile(probe, 0.9))                    # a threshold this untrained model crosses now and then
    sims = [10, 11, 12]
    for kind, value in (("none", 0.0), ("drop", 0.3)):
        batched = reliability.surrogate_trains(model, records, kind, value, sims, spike_threshold=thr)
        assert sum(b.size for b in batched) > 3
        for r, index, got in zip(records, sims, batched):
            rng = np.random.RandomState(1000 + index)
            syn, t, _ = reliability.perturb_events(r["syn"], r["t_ms"], kind, value, T, rng)
            alone = rollout(model, bin_events(syn, t, 1278, 0, T), r["v0_mV"], spike_threshold=thr,
                            spike_waveform=False)["soma_spike_times_ms"]
            assert np.allclose(got, alone), (kind, index)


def test_figure_with_surrogate_bars(reliability, tmp_path):
    summary = {"sims": [1], "perturbations": {
        "none": {"gamma": 1.0, "n_true": 3, "surrogate_gamma_vs_own_unchanged": 1.0},
        "drop:0.01": {"gamma": 0.8, "n_true": 3, "surrogate_gamma_vs_own_unchanged": 0.6}}}
    reliability.plot(summary, {"none": np.zeros(3), "drop:0.01": np.array([0.5])}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_a_missing_morphology_or_checkpoint_is_one_line(reliability, tmp_path, morphology):
    (tmp_path / "meta.json").write_text('{"generation": {}, "splits": {"test": []}}')
    with pytest.raises(SystemExit, match="spike_reliability: morphology file .*nosuch.asc does not exist"):
        reliability.main(["--data", str(tmp_path), "--morphology", str(tmp_path / "nosuch.asc"),
                          "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="spike_reliability: surrogate checkpoint .*nosuch.pt does not exist"):
        reliability.main(["--data", str(tmp_path), "--morphology", str(morphology),
                          "--model", str(tmp_path / "nosuch.pt"), "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.json.jsonl").exists()
