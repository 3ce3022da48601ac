"""The spike-timing benchmark's analysis functions on logits whose answer is known."""
import numpy as np
import pytest

from lfdeep_neuron.surrogate.metrics import spikes_from_logits


@pytest.fixture(scope="module")
def spike_timing(benchmark_module):
    return benchmark_module("spike_timing")


def _bumps(n, centres, width):
    """Logits (index i = step i + 1, covering (i, i + 1] ms) of -8 with a triangular bump of peak 0 and
    half-width ``width`` steps at each index of ``centres``."""
    lg = np.full(n, -8.0)
    for c in centres:
        for d in range(-width, width + 1):
            lg[c + d] = max(lg[c + d], -8.0 * abs(d) / (width + 1))
    return lg


def test_peak_rule_times_the_maximum_and_crossing_the_onset(spike_timing):
    lg = _bumps(200, [50, 120], width=3)
    peak = spike_timing.peak_spikes(lg, -4.0, first_step=1)
    cross = spikes_from_logits(lg, -4.0, first_step=1)
    # index i is step i + 1, placed at (i + 1) - 0.5 ms
    np.testing.assert_allclose(peak, [50.5, 120.5])
    np.testing.assert_allclose(cross, [49.5, 119.5])       # first step above -4: index 49 (-2) after 48 (-4.0)
    assert spike_timing.peak_spikes(lg, 0.5).size == 0     # nothing above the threshold


def test_logit_profile_is_centred_on_the_spike_bin(spike_timing):
    lg = _bumps(300, [60, 150, 240], width=2)
    sims = [{"logit_cl": lg, "spike_times_ms": np.array([60.5, 150.5, 240.5]), "T": 301}]
    prof = spike_timing.logit_profile(sims, half_ms=10)
    med = dict(zip(prof["offsets_ms"], prof["median"]))
    assert prof["n"] == 3 and med[0] == 0.0 and med[-10] == -8.0 and med[1] < 0
    assert prof["argmax_counts"][5] == 3 and sum(prof["argmax_counts"]) == 3
    # a spike whose ±10-ms window leaves the run is not counted
    sims[0]["spike_times_ms"] = np.array([3.0, 60.5])
    assert spike_timing.logit_profile(sims, half_ms=10)["n"] == 1
    # Γ sweep: the peak rule finds both bumps at exactly their spike bins
    sims = [{"logit_cl": lg, "spike_times_ms": np.array([60.5, 150.5, 240.5]), "T": 301}]
    g = spike_timing.sweep_peak(sims, [-4.0])
    assert g[0] > 0.95


def test_misplaced_spikes_are_split_into_early_and_late(spike_timing):
    # crossings (first index above -4) at 49.5, 119.5 and 199.5 ms; true spikes 2 ms after, 4 ms before and
    # 5 ms after them, and one 40 ms from any prediction
    lg = _bumps(300, [50, 120, 200], width=3)
    sims = [{"logit_cl": lg, "spike_times_ms": np.array([51.5, 115.5, 204.5, 260.0]), "T": 301}]
    a = spike_timing.analyse(sims, -4.0, isolated_ms=30.0)
    assert a["pred_within_2ms"] == 1 and a["pred_2_to_10ms"] == 2 and a["pred_beyond_10ms"] == 0
    assert a["pred_2_to_10ms_early"] == 1 and a["pred_2_to_10ms_late"] == 1
    assert a["isolated"] == {"n": 4, "hit": 1}
