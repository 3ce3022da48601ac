"""The deterministic synapses ``AmpaNmdaSyn`` and ``GabaASyn`` (BIOPHYSICS.md section 6).

Real compiled NMODL on a voltage-clamped single compartment: peak normalisation
factors, the Mg block, the peak conductance of a lone event, the exact closed-form
conductance under CVODE (jump exactly at the event time), superposition and weights.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lfdeep_neuron import mechanisms

mechanisms.load()
from neuron import h  # noqa: E402

h.load_file("stdrun.hoc")

# BIOPHYSICS.md section 6.2: Mg block check values (v in mV -> B_Mg, printed to 5 decimals)
MG_BLOCK = {-90: 0.00266, -80: 0.00590, -76: 0.00810, -70: 0.01303, -60: 0.02854,
            -50: 0.06137, -40: 0.12703, -30: 0.24463, -20: 0.41887, -10: 0.61599,
            0: 0.78118, 20: 0.94647}


def peak_time(tau_r: float, tau_d: float) -> float:
    return tau_r * tau_d / (tau_d - tau_r) * math.log(tau_d / tau_r)


def double_exp(t: np.ndarray, tau_r: float, tau_d: float) -> np.ndarray:
    """Normalised double exponential (peak 1) of an event at t = 0; 0 before."""
    tpk = peak_time(tau_r, tau_d)
    f = 1 / (math.exp(-tpk / tau_d) - math.exp(-tpk / tau_r))
    t = np.asarray(t, dtype=float)
    return np.where(t >= 0, f * (np.exp(-t / tau_d) - np.exp(-t / tau_r)), 0.0)


@pytest.fixture
def clamped():
    """A voltage-clamped compartment with one synapse of each kind and their NetCons."""
    cv = h.CVode()
    saved = (cv.active(), cv.atol(), cv.rtol(), h.dt)
    sec = h.Section(name="syn_comp")
    sec.L = sec.diam = 10.0
    sec.insert("pas")
    clamp = h.SEClamp(sec(0.5))
    clamp.dur1, clamp.rs = 1e9, 1e-6
    exc, inh = h.AmpaNmdaSyn(sec(0.5)), h.GabaASyn(sec(0.5))
    nc_exc, nc_inh = h.NetCon(None, exc), h.NetCon(None, inh)
    for nc in (nc_exc, nc_inh):
        nc.weight[0], nc.delay = 1.0, 0.0
    yield dict(sec=sec, clamp=clamp, exc=exc, inh=inh, nc_exc=nc_exc, nc_inh=nc_inh, cv=cv)
    cv.active(saved[0])
    cv.atol(saved[1])
    cv.rtol(saved[2])
    h.dt = saved[3]


def start(s, v_mV: float, cvode: bool = True) -> None:
    """Clamp at v_mV, pick the integrator and finitialize (set up recordings before)."""
    s["clamp"].amp1 = v_mV
    s["cv"].active(int(cvode))
    if cvode:
        s["cv"].atol(1e-10)
        s["cv"].rtol(1e-10)
    else:
        h.dt = 0.025
    h.finitialize(v_mV)


def test_defaults_and_peak_factors(clamped):
    exc, inh = clamped["exc"], clamped["inh"]
    assert (exc.tau_r_AMPA, exc.tau_d_AMPA, exc.tau_r_NMDA, exc.tau_d_NMDA) == (0.3, 3, 2, 70)
    assert (exc.gmax, exc.e, exc.mg) == (0.0004, 0, 1)
    assert (inh.tau_r, inh.tau_d, inh.gmax, inh.e) == (0.2, 8, 0.001, -80)
    start(clamped, -70.0)
    assert peak_time(0.3, 3.0) == pytest.approx(0.767528, abs=1e-6)
    assert peak_time(2.0, 70.0) == pytest.approx(7.319834, abs=1e-6)
    assert peak_time(0.2, 8.0) == pytest.approx(0.756693, abs=1e-6)
    assert exc.factor_AMPA == pytest.approx(1.435055, abs=1e-6)
    assert exc.factor_NMDA == pytest.approx(1.142886, abs=1e-6)
    assert inh.factor == pytest.approx(1.127389, abs=1e-6)
    assert exc.g == 0 and inh.g == 0 and exc.i == 0 and inh.i == 0


def test_mg_block_values(clamped):
    exc = clamped["exc"]
    for v, printed in MG_BLOCK.items():
        start(clamped, float(v))
        assert abs(exc.mgblock - printed) <= 0.5e-5 * (1 + 1e-9), f"B_Mg({v}) = {exc.mgblock}"
        assert exc.mgblock == pytest.approx(1 / (1 + math.exp(-0.08 * v) / 3.57), rel=1e-12)
    exc.mg = 0.0                                       # no magnesium: no block
    start(clamped, -70.0)
    assert exc.mgblock == 1.0
    exc.mg = 2.0
    start(clamped, -70.0)
    assert exc.mgblock == pytest.approx(1 / (1 + math.exp(5.6) * 2 / 3.57), rel=1e-12)


@pytest.mark.parametrize("cvode", [True, False], ids=["cvode", "fixed"])
def test_lone_event_peak_conductance(clamped, cvode):
    exc, inh = clamped["exc"], clamped["inh"]
    exc.mg = 0.0                                       # NMDA unblocked
    t0 = 1.0                                           # on the fixed-step grid
    t = h.Vector().record(h._ref_t)
    g_ampa, g_nmda = h.Vector().record(exc._ref_g_AMPA), h.Vector().record(exc._ref_g_NMDA)
    g_gaba, i_gaba = h.Vector().record(inh._ref_g), h.Vector().record(inh._ref_i)
    v = h.Vector().record(clamped["sec"](0.5)._ref_v)
    start(clamped, -40.0, cvode)
    clamped["nc_exc"].event(t0)
    clamped["nc_inh"].event(t0)
    if cvode:                                          # land exactly on each analytic peak
        for tpk in sorted([peak_time(0.3, 3), peak_time(2, 70), peak_time(0.2, 8)]):
            h.CVode().solve(t0 + tpk)
        h.CVode().solve(t0 + 20.0)
    else:
        h.continuerun(t0 + 20.0)
    t, v = np.array(t), np.array(v)
    g_ampa, g_nmda, g_gaba, i_gaba = map(np.array, (g_ampa, g_nmda, g_gaba, i_gaba))
    rel = 1e-4 if not cvode else 1e-7                  # fixed step samples the peak at +-dt/2
    assert np.max(g_ampa) == pytest.approx(0.0004, rel=rel)
    assert np.max(g_nmda) == pytest.approx(0.0004, rel=rel)
    assert np.max(g_gaba) == pytest.approx(0.001, rel=rel)
    assert np.all(g_ampa[t < t0] == 0) and np.all(g_gaba[t < t0] == 0)
    np.testing.assert_allclose(i_gaba, g_gaba * (v + 80.0), rtol=1e-6, atol=1e-12)
    # a fixed step records g (an assigned variable) as computed at the start of the step,
    # i.e. one dt late; CVODE hits the analytic peak time exactly
    lag, slack = (0.0, 1e-9) if cvode else (h.dt, h.dt / 2 + 1e-9)
    assert t[np.argmax(g_ampa)] == pytest.approx(t0 + peak_time(0.3, 3) + lag, abs=slack)
    assert t[np.argmax(g_gaba)] == pytest.approx(t0 + peak_time(0.2, 8) + lag, abs=slack)


def test_cvode_jump_exactly_at_event_time(clamped):
    """Off-grid events, several of them and weighted: g(t) equals the closed form."""
    exc, inh = clamped["exc"], clamped["inh"]
    v_hold = -30.0
    events = [(1.3137, 1.0), (2.05, 2.5), (9.871, 0.5)]     # (time ms, weight)
    start(clamped, v_hold)
    for t_k, w in events:
        # one NetCon per weight: NetCon.event delivers with the NetCon's own weight
        for syn in (exc, inh):
            nc = h.NetCon(None, syn)
            nc.weight[0], nc.delay = w, 0.0
            clamped.setdefault("keep", []).append(nc)
            nc.event(t_k)
    probe_times = [1.3137 - 1e-9, 1.3137 + 1e-9, 1.8, 2.05, 2.05 + 1e-6, 5.0, 9.871 + 1e-6, 30.0, 120.0]
    rows = []
    for tp in probe_times:
        h.CVode().solve(tp)
        rows.append((h.t, exc.g_AMPA, exc.g_NMDA, exc.mgblock, exc.i, inh.g, inh.i,
                     clamped["sec"](0.5).v))
    for t, g_ampa, g_nmda, mgb, i_exc, g_gaba, i_gaba, v in rows:
        ref_ampa = sum(w * 0.0004 * double_exp(t - t_k, 0.3, 3) for t_k, w in events)
        ref_nmda = sum(w * 0.0004 * double_exp(t - t_k, 2, 70) for t_k, w in events)
        ref_gaba = sum(w * 0.001 * double_exp(t - t_k, 0.2, 8) for t_k, w in events)
        assert g_ampa == pytest.approx(ref_ampa, rel=1e-6, abs=1e-12), f"t={t}"
        assert g_nmda == pytest.approx(ref_nmda * mgb, rel=1e-6, abs=1e-12), f"t={t}"
        assert mgb == pytest.approx(1 / (1 + math.exp(-0.08 * v) / 3.57), rel=1e-12)
        assert abs(v - v_hold) < 1e-6
        assert i_exc == pytest.approx((g_ampa + g_nmda) * v, rel=1e-12, abs=1e-18)
        assert g_gaba == pytest.approx(ref_gaba, rel=1e-6, abs=1e-12), f"t={t}"
        assert i_gaba == pytest.approx(g_gaba * (v + 80.0), rel=1e-12, abs=1e-18)
    assert rows[0][1] == 0.0 and rows[0][5] == 0.0          # nothing before the first event
    assert rows[1][1] > 0.0 and rows[1][5] > 0.0            # already rising just after it


def test_runs_are_deterministic(clamped):
    """No randomness: two runs of the same event train are bit-identical."""
    traces = []
    for _ in range(2):
        g = h.Vector().record(clamped["exc"]._ref_g)
        gi = h.Vector().record(clamped["inh"]._ref_g)
        start(clamped, -60.0, cvode=False)
        for t_k in (0.5, 1.0, 3.0, 3.025, 7.0):
            clamped["nc_exc"].event(t_k)
            clamped["nc_inh"].event(t_k)
        h.continuerun(15.0)
        traces.append((np.array(g), np.array(gi)))
    assert np.max(traces[0][0]) > 0.0004 * 0.02           # every event transmitted
    np.testing.assert_array_equal(traces[0][0], traces[1][0])
    np.testing.assert_array_equal(traces[0][1], traces[1][1])
