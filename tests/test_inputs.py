"""Input generators: exact reproduction of the published generator, dead synapses, validation protocols."""
from __future__ import annotations

import numpy as np
import pytest

from lfdeep_neuron.data.inputs import (
    N_CHANNELS,
    CurrentStep,
    GeneratorConfig,
    beniaguev_inputs,
    dead_synapses,
    dendritic_lengths_um,
    effective_events,
    homogeneous_poisson,
)
from lfdeep_neuron.data.records import read_record


@pytest.fixture(scope="module")
def seed1(reference_dir):
    return read_record(reference_dir / "synaptic_seed1.h5", require=("input", "input_effective", "synapses"))


def test_reproduces_reference_events_bit_for_bit(seed1):
    lengths, n_basal = dendritic_lengths_um(seed1["segments"])
    assert (lengths.size, n_basal) == (639, 262)
    syn, t, draw = beniaguev_inputs(int(seed1.attrs["seed"]), lengths, n_basal, int(seed1.attrs["duration_ms"]))
    assert draw.keep_inst_rate_const_for_ms == seed1.attrs["gen_keep_inst_rate_const_for_ms"] == 74
    assert draw.temporal_inst_rate_smoothing_sigma_ms == seed1.attrs["gen_temporal_inst_rate_smoothing_sigma_ms"] == 131
    assert draw.num_inst_rate_samples == seed1.attrs["gen_num_inst_rate_samples"]
    assert syn.dtype == np.int32 and t.dtype == np.float64
    np.testing.assert_array_equal(syn, seed1["input"]["syn_idx"])
    np.testing.assert_array_equal(t, seed1["input"]["t_ms"])
    # a private RandomState gives the same trial without touching numpy's global RNG
    np.random.seed(12345)
    before = np.random.rand()
    np.random.seed(12345)
    syn2, t2, _ = beniaguev_inputs(1, lengths, n_basal, 3000, rng=np.random.RandomState(1))
    assert np.random.rand() == before
    np.testing.assert_array_equal(syn2, syn)
    np.testing.assert_array_equal(t2, t)
    # generator attributes use the reference's names and values
    for k in ("gen_min_seg_length_um", "gen_num_bas_ex_spikes_per_100ms_range",
              "gen_num_apic_ex_inh_spike_diff_per_100ms_range"):
        np.testing.assert_array_equal(draw.attrs()[k], seed1.attrs[k])


def test_effective_events_match_reference(seed1):
    syn, t = seed1["input"]["syn_idx"], seed1["input"]["t_ms"]
    eff_syn, eff_t, dead = effective_events(syn, t)
    np.testing.assert_array_equal(dead, seed1["synapses"]["dead"])
    np.testing.assert_array_equal(eff_syn, seed1["input_effective"]["syn_idx"])
    np.testing.assert_array_equal(eff_t, seed1["input_effective"]["t_ms"])
    assert dead.sum() == 6 and len(syn) - len(eff_syn) == 154


def test_dead_synapses_small():
    syn = np.array([3, 5, 3, 7, 5])
    t = np.array([0.0, 0.5, 4.0, 0.0, 9.0])
    dead = dead_synapses(syn, t, n_channels=10)
    assert np.flatnonzero(dead).tolist() == [3, 7]
    s, tt, _ = effective_events(syn, t, n_channels=10)
    assert s.tolist() == [5, 5] and tt.tolist() == [0.5, 9.0]


def test_generator_ranges_over_seeds(seed1):
    lengths, n_basal = dendritic_lengths_um(seed1["segments"])
    holds, sigmas, counts = [], [], []
    for seed in range(12):
        syn, t, d = beniaguev_inputs(None, lengths, n_basal, 200, rng=np.random.RandomState(seed))
        holds.append(d.keep_inst_rate_const_for_ms)
        sigmas.append(d.temporal_inst_rate_smoothing_sigma_ms)
        counts.append((int(np.sum(syn < N_CHANNELS // 2)), int(np.sum(syn >= N_CHANNELS // 2))))
        assert syn.min() >= 0 and syn.max() < N_CHANNELS
        assert np.all(t == np.floor(t)) and t.min() >= 0 and t.max() <= 199
        # at most one event per channel per ms
        assert len(np.unique(syn.astype(np.int64) * 1000 + t.astype(np.int64))) == len(syn)
        assert np.all(np.diff(t) >= 0)
    assert all(6 <= h <= 469 for h in holds) and all(6 <= s <= 619 for s in sigmas)
    assert len(set(holds)) > 3 and len(set(sigmas)) > 3
    # Event volume against BIOPHYSICS.md section 7 (issue 33, "Why" item 8: this asserted max(counts) > 0, which
    # rates 10x too low, a tree left out or the rates' edge dip missing all pass). The coarse totals are
    # U(0, 800) exc and U(max(0, E - 600), E + 200) inh spikes per tree per 100 ms: expected 400 and 312.5, so
    # over both trees 8 exc and 6.25 inh events per ms (the segment lengths l'_i sum to each tree's Lambda,
    # the spatial noise has mean 1, P(spike) = lam (1 - exp(-1/lam)) ~ lam for these small lam); the
    # zero-padded Gaussian smoothing of step 11 scales the expectation by its kernel mass inside the trial.
    mass = sum(_kernel_mass_in_trial(s, 200) for s in sigmas)
    exc, inh = (sum(c) for c in zip(*counts))
    print(f"events / section-7 expectation: exc {exc / (8.0 * mass):.3f}, inh {inh / (6.25 * mass):.3f}")
    # measured 0.925 and 0.880 here; 12-seed sums spread with sd 0.09 / 0.11 (measured over 240 seeds, range
    # 0.76-1.24): bound +-25 %. Without the edge dip these seeds would give ~1.55, without a tree ~0.5.
    assert 0.75 <= exc / (8.0 * mass) <= 1.25
    assert 0.75 <= inh / (6.25 * mass) <= 1.25


def _kernel_mass_in_trial(sigma: int, T: int) -> float:
    """sum_t of BIOPHYSICS.md section 7 step 11's smoothing of a constant 1 over T bins (zero padding, 'same')."""
    M = 1 + 7 * sigma
    j = np.arange(M)
    w = np.exp(-0.5 * ((j - (M - 1) / 2) / sigma) ** 2)
    w /= w.sum()
    return float(np.convolve(np.ones(T), w)[(M - 1) // 2:(M - 1) // 2 + T].sum())


def test_config_changes_rates(seed1):
    lengths, n_basal = dendritic_lengths_um(seed1["segments"])
    quiet = GeneratorConfig(bas_ex_per_100ms=(0, 1), apic_ex_per_100ms=(0, 1),
                            bas_ex_inh_diff_per_100ms=(0, 1), apic_ex_inh_diff_per_100ms=(0, 1))
    syn_q, _, _ = beniaguev_inputs(None, lengths, n_basal, 1000, config=quiet, rng=np.random.RandomState(0))
    syn_d, _, _ = beniaguev_inputs(None, lengths, n_basal, 1000, rng=np.random.RandomState(0))
    assert len(syn_q) * 50 < len(syn_d)


def test_homogeneous_poisson_rates():
    syn, t = homogeneous_poisson(5.0, 10.0, 2000.0, seed=0)
    exc, inh = np.sum(syn < 639), np.sum(syn >= 639)
    # expected 639*5*2 = 6390 and 12780 events; Poisson sd ~ 80 / 113
    assert abs(exc - 6390) < 400 and abs(inh - 12780) < 560
    assert np.all(t == np.floor(t)) and np.all(np.diff(t) >= 0)
    syn_c, t_c = homogeneous_poisson(5.0, 0.0, 1000.0, seed=1, grid_ms=None, t_start_ms=1.0)
    assert syn_c.max() < 639 and t_c.min() >= 1.0 and t_c.max() < 1000.0 and np.all(np.diff(t_c) >= 0)
    assert np.any(t_c != np.floor(t_c))
    with pytest.raises(ValueError, match="exceeds one event per bin"):
        homogeneous_poisson(2000.0, 0.0, 10.0, seed=0)


def test_current_step():
    step = CurrentStep(0.793)
    i = step.current_nA(np.array([0.0, 699.9, 700.0, 2699.9, 2700.0]))
    np.testing.assert_array_equal(i, [0, 0, 0.793, 0.793, 0])
    assert step.attrs()["protocol"] == "somatic_step_current_hay2011"
    with pytest.raises(ValueError):
        CurrentStep(1.0, delay_ms=-1)
