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
