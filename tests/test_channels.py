"""The Hay-cell density mechanisms in ``mod/`` against shared/hay/BIOPHYSICS.md.

Every check runs the real compiled NMODL: gating steady states and time
constants are read from the mechanisms' RANGE variables (``mInf``, ``mTau``,
``hInf``, ``hTau``, ``zInf``) after ``finitialize(v)`` at a given voltage.

* the check table of BIOPHYSICS.md section 3.12, to its printed 4 significant digits;
* an independent Python transcription of the section 3 equations on a dense voltage
  grid that includes every removable singularity (relative 1e-9);
* currents = conductance x driving force with the right gate powers;
* SK_E2 z_inf check values; eca from Nernst (cai written by CaDynamics_E2);
* the CaDynamics_E2 right-hand side through CVODE's own f(t, y);
* fixed-step (cnexp) and CVODE runs of a spiking compartment agree.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lfdeep_neuron import mechanisms

mechanisms.load()
from neuron import h  # noqa: E402  (after the mechanisms are loaded)

h.load_file("stdrun.hoc")

QT = 2.3 ** 1.3
FARADAY = 96485.33212          # C/mol, NEURON >= 8 (nocmodl's FARADAY)
GAS_R = 8.314462618            # J/(mol K)

CHANNELS = ("NaTa_t", "NaTs2_t", "Nap_Et2", "K_Tst", "K_Pst", "SKv3_1", "Im", "Ih",
            "Ca_HVA", "Ca_LVAst", "SK_E2")

# --- BIOPHYSICS.md section 3.12, verbatim numbers ------------------------------------------
CHECK_VOLTAGES_MV = (-90, -76, -60, -40, -20, 0, 20)
CHECK_TABLE = """
NaTa_t mInf 0.0002527 0.0026 0.03616 0.5126 0.9672 0.9988 1
NaTa_t mTau 0.0525 0.07156 0.1166 0.1887 0.095 0.04882 0.03208
NaTa_t hInf 0.982 0.8411 0.2689 0.01295 0.000468 1.67e-05 5.958e-07
NaTa_t hTau 0.9069 1.54 1.739 0.8458 0.4903 0.3421 0.2625
NaTs2_t mInf 9.299e-05 0.0009581 0.01361 0.279 0.9156 0.9967 0.9999
NaTs2_t mTau 0.04708 0.06197 0.09531 0.1813 0.1228 0.05768 0.03577
NaTs2_t hInf 0.9933 0.935 0.5 0.03445 0.001271 4.54e-05 1.62e-06
NaTs2_t hTau 0.7425 1.228 1.881 1.051 0.563 0.3762 0.2822
Nap_Et2 mInf 0.0002944 0.006139 0.1668 0.9393 0.9992 1 1
Nap_Et2 mTau 0.315 0.4293 0.6996 1.132 0.57 0.2929 0.1925
Nap_Et2 hInf 0.984 0.9382 0.754 0.2932 0.05315 0.00754 0.001027
Nap_Et2 hTau 1611 1981 2098 1435 1038 755.6 578.1
K_Tst mInf 0.01462 0.03007 0.06713 0.1709 0.3714 0.6286 0.8291
K_Tst mTau 0.4195 0.4245 0.3896 0.3074 0.2221 0.1625 0.1318
K_Tst hInf 0.8022 0.5 0.168 0.0266 0.003684 0.0005002 6.772e-05
K_Tst hTau 17.84 17.84 8.814 3.213 2.718 2.709 2.709
K_Pst mInf 0.001381 0.004422 0.01657 0.08191 0.3208 0.7144 0.9298
K_Pst mTau 7.828 11.08 16.58 10.03 6.133 3.818 2.441
K_Pst hInf 0.914 0.7486 0.4101 0.1014 0.01799 0.002964 0.0004823
K_Pst hTau 259.3 365.8 413.7 348.3 235 159.7 130.5
SKv3_1 mInf 1.359e-05 5.754e-05 0.0002994 0.002349 0.01817 0.127 0.5335
SKv3_1 mTau 1.088 1.357 1.698 2.148 2.584 2.967 3.275
Im mInf 1.67e-05 0.0002746 0.006693 0.2689 0.9526 0.9991 1
Im mTau 0.4194 1.7 8.367 45.5 21.81 3.096 0.4194
Ih mInf 0.1235 0.03336 0.006622 0.0008207 9.813e-05 1.147e-05 1.318e-06
Ih mTau 68.87 49.76 31.54 17.33 9.48 5.181 2.832
Ca_HVA mInf 9.621e-08 6.788e-06 0.0007892 0.1676 0.9252 0.9924 0.9986
Ca_HVA mTau 0.4402 1.003 2.569 6.94 2.022 0.6677 0.3863
Ca_HVA hInf 0.8362 0.7091 0.5187 0.2934 0.1508 0.07914 0.04466
Ca_HVA hTau 392.3 440.1 443.4 374.2 286.8 224.6 189.1
Ca_LVAst mInf 0.0002403 0.002473 0.03445 0.5 0.9656 0.9987 1
Ca_LVAst mTau 8.466 8.464 8.421 6.645 2.014 1.699 1.693
Ca_LVAst hInf 0.5 0.1009 0.009126 0.0004045 1.778e-05 7.811e-07 3.432e-08
Ca_LVAst hTau 23.65 23.3 20.43 10.05 7.003 6.786 6.774
"""
CHECK_ROWS = [line.split() for line in CHECK_TABLE.strip().splitlines()]

# SK_E2 check values of section 3.11: cai (mM) -> z_inf
SK_CHECK = {5e-5: "3.269e-5", 1e-4: "9.098e-4", 2e-4: "0.02474", 4.3e-4: "0.5", 1e-3: "0.9829"}


def printed_tolerance(text: str) -> float:
    """Half a unit in the 4th significant digit of a value printed with %.4g."""
    value = abs(float(text))
    return 0.5 * 10.0 ** (math.floor(math.log10(value)) - 3) * (1 + 1e-9)


# --- an independent transcription of BIOPHYSICS.md section 3 (x in mV) ---------------------
def efun(x: float, k: float) -> float:
    """E(x, k) = x / (1 - exp(-x/k)) with E(0, k) = k, via expm1 (accurate near 0)."""
    return k if x == 0 else x / -math.expm1(-x / k)


def _ab(a: float, b: float, q: float = 1.0) -> tuple[float, float]:
    return a / (a + b), 1.0 / ((a + b) * q)


def reference_gates(mech: str, v: float, vshift: float = 0.0) -> dict[str, float]:
    """Steady states and time constants (ms) of ``mech`` at v (mV), from the sheet."""
    out: dict[str, float] = {}
    if mech in ("NaTa_t", "NaTs2_t"):
        vm, vh = (-38.0, -66.0) if mech == "NaTa_t" else (-32.0, -60.0)
        out["mInf"], out["mTau"] = _ab(0.182 * efun(v - vm, 6), 0.124 * efun(-(v - vm), 6), QT)
        out["hInf"], out["hTau"] = _ab(0.015 * efun(-(v - vh), 6), 0.015 * efun(v - vh, 6), QT)
    elif mech == "Nap_Et2":
        out["mInf"] = 1 / (1 + math.exp(-(v + 52.6) / 4.6))
        out["mTau"] = 6 / ((0.182 * efun(v + 38, 6) + 0.124 * efun(-(v + 38), 6)) * QT)
        out["hInf"] = 1 / (1 + math.exp((v + 48.8) / 10))
        out["hTau"] = 1 / ((2.88e-6 * efun(-(v + 17), 4.63) + 6.94e-6 * efun(v + 64.4, 2.63)) * QT)
    elif mech == "K_Tst":
        u = v + 10
        out["mInf"] = 1 / (1 + math.exp(-u / 19))
        out["mTau"] = (0.34 + 0.92 * math.exp(-((u + 71) / 59) ** 2)) / QT
        out["hInf"] = 1 / (1 + math.exp((u + 66) / 10))
        out["hTau"] = (8 + 49 * math.exp(-((u + 73) / 23) ** 2)) / QT
    elif mech == "K_Pst":
        u = v + 10
        out["mInf"] = 1 / (1 + math.exp(-(u + 1) / 12))
        out["mTau"] = ((1.25 + 175.03 * math.exp(0.026 * u)) if u < -50
                       else (1.25 + 13 * math.exp(-0.026 * u))) / QT
        out["hInf"] = 1 / (1 + math.exp((u + 54) / 11))
        out["hTau"] = (360 + (1010 + 24 * (u + 55)) * math.exp(-((u + 75) / 48) ** 2)) / QT
    elif mech == "SKv3_1":
        out["mInf"] = 1 / (1 + math.exp(-(v - 18.7) / 9.7))
        out["mTau"] = 4 / (1 + math.exp(-(v + 46.56) / 44.14))
    elif mech == "Im":
        out["mInf"], out["mTau"] = _ab(3.3e-3 * math.exp(0.1 * (v + 35)),
                                       3.3e-3 * math.exp(-0.1 * (v + 35)), QT)
    elif mech == "Ih":
        out["mInf"], out["mTau"] = _ab(6.43e-3 * efun(-(v + 154.9 - vshift), 11.9),
                                       0.193 * math.exp((v - vshift) / 33.1))
    elif mech == "Ca_HVA":
        out["mInf"], out["mTau"] = _ab(0.055 * efun(v + 27, 3.8), 0.94 * math.exp(-(v + 75) / 17))
        out["hInf"], out["hTau"] = _ab(4.57e-4 * math.exp(-(v + 13) / 50),
                                       0.0065 / (1 + math.exp(-(v + 15) / 28)))
    elif mech == "Ca_LVAst":
        u = v + 10
        out["mInf"] = 1 / (1 + math.exp(-(u + 30) / 6))
        out["mTau"] = (5 + 20 / (1 + math.exp((u + 25) / 5))) / QT
        out["hInf"] = 1 / (1 + math.exp((u + 80) / 6.4))
        out["hTau"] = (20 + 50 / (1 + math.exp((u + 40) / 7))) / QT
    else:
        raise ValueError(f"unknown mechanism {mech!r}")
    return out


# --- NEURON fixtures ------------------------------------------------------------------------
@pytest.fixture
def neuron_state():
    """Restore NEURON globals (integrator, dt, celsius, cai0) that a test changes."""
    cv = h.CVode()
    saved = (cv.active(), cv.atol(), cv.rtol(), h.dt, h.celsius, h.cai0_ca_ion)
    yield cv
    cv.active(saved[0])
    cv.atol(saved[1])
    cv.rtol(saved[2])
    h.dt, h.celsius, h.cai0_ca_ion = saved[3:]


@pytest.fixture(scope="module")
def gate_section():
    """One compartment carrying all 11 channels (gates do not depend on each other)."""
    sec = h.Section(name="gates")
    for mech in CHANNELS:
        sec.insert(mech)
    yield sec


def gates_at(sec, v_mV: float) -> dict[str, dict[str, float]]:
    h.finitialize(v_mV)
    seg = sec(0.5)
    out = {}
    for mech in CHANNELS[:-1]:
        m = getattr(seg, mech)
        names = ("mInf", "mTau") if mech in ("SKv3_1", "Im", "Ih") else ("mInf", "mTau", "hInf", "hTau")
        out[mech] = {n: getattr(m, n) for n in names}
    return out


@pytest.fixture(scope="module")
def table_values(gate_section):
    return {v: gates_at(gate_section, v) for v in CHECK_VOLTAGES_MV}


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("row", CHECK_ROWS, ids=[f"{r[0]}.{r[1]}" for r in CHECK_ROWS])
def test_check_table(row, table_values):
    mech, name, *printed = row
    for v, text in zip(CHECK_VOLTAGES_MV, printed):
        got = table_values[v][mech][name]
        assert abs(got - float(text)) <= printed_tolerance(text), (
            f"{mech}.{name} at {v} mV: {got:.7g}, BIOPHYSICS.md table says {text}")


def test_gates_match_equations_on_dense_grid_with_singularities(gate_section):
    # every removable singularity of section 3 exactly, and just beside it
    singular = [-38.0, -66.0, -32.0, -60.0, -17.0, -64.4, -154.9, -27.0]
    grid = list(np.round(np.arange(-160.0, 60.0, 1.37), 6)) + singular
    grid += [s + d for s in singular for d in (-1e-3, -1e-7, 1e-7, 1e-3)]
    worst = 0.0
    for v in grid:
        got = gates_at(gate_section, v)
        for mech, values in got.items():
            ref = reference_gates(mech, v)
            for name, value in values.items():
                assert math.isfinite(value), f"{mech}.{name} is {value} at {v} mV"
                err = abs(value - ref[name]) / abs(ref[name])
                worst = max(worst, err)
                assert err < 1e-9, f"{mech}.{name} at {v} mV: {value!r} vs {ref[name]!r}"
    assert worst < 1e-9


def test_analytic_limits_at_singular_points(gate_section):
    got = gates_at(gate_section, -38.0)["NaTa_t"]
    assert got["mInf"] == pytest.approx(1.092 / (1.092 + 0.744), rel=1e-12)
    assert got["mTau"] == pytest.approx(1 / (1.836 * QT), rel=1e-12)
    got = gates_at(gate_section, -66.0)["NaTa_t"]
    assert got["hInf"] == pytest.approx(0.5, rel=1e-12)
    assert got["hTau"] == pytest.approx(1 / (0.18 * QT), rel=1e-12)
    got = gates_at(gate_section, -60.0)["NaTs2_t"]
    assert got["hInf"] == pytest.approx(0.5, rel=1e-12)
    # Nap_Et2: alpha_h(-17) = 1.33344e-5, beta_h(-64.4) = 1.82522e-5 (sheet section 3.3)
    tau = gates_at(gate_section, -17.0)["Nap_Et2"]["hTau"]
    assert 1 / (tau * QT) - 6.94e-6 * efun(47.4, 2.63) == pytest.approx(1.33344e-5, rel=1e-6)
    tau = gates_at(gate_section, -64.4)["Nap_Et2"]["hTau"]
    assert 1 / (tau * QT) - 2.88e-6 * efun(47.4, 4.63) == pytest.approx(1.82522e-5, rel=1e-6)
    # Ih: alpha(vhalf) = 0.076517; Ca_HVA: alpha_m(-27) = 0.209
    m = gates_at(gate_section, -154.9)["Ih"]
    assert m["mInf"] / m["mTau"] == pytest.approx(0.076517, rel=1e-5)
    m = gates_at(gate_section, -27.0)["Ca_HVA"]
    assert m["mInf"] / m["mTau"] == pytest.approx(0.209, rel=1e-12)


def test_ih_parameters_and_vshift(neuron_state):
    sec = h.Section(name="ih")
    sec.insert("Ih")
    seg = sec(0.5)
    assert seg.Ih.ehcn == -45.0 and seg.Ih.vshift == 0.0
    seg.Ih.vshift = 7.0
    for v in (-110.0, -80.0, -147.9, -30.0):
        h.finitialize(v)
        ref = reference_gates("Ih", v, vshift=7.0)
        assert seg.Ih.mInf == pytest.approx(ref["mInf"], rel=1e-9)
        assert seg.Ih.mTau == pytest.approx(ref["mTau"], rel=1e-9)


# (mechanism, gbar name, current name, reversal (mV) or None for eca, m power, has h)
CURRENT_SPECS = [
    ("NaTa_t", "gNaTa_tbar", "ina", 50.0, 3, True),
    ("NaTs2_t", "gNaTs2_tbar", "ina", 50.0, 3, True),
    ("Nap_Et2", "gNap_Et2bar", "ina", 50.0, 3, True),
    ("K_Tst", "gK_Tstbar", "ik", -85.0, 4, True),
    ("K_Pst", "gK_Pstbar", "ik", -85.0, 2, True),
    ("SKv3_1", "gSKv3_1bar", "ik", -85.0, 1, False),
    ("Im", "gImbar", "ik", -85.0, 1, False),
    ("Ih", "gIhbar", "ihcn", -45.0, 1, False),
    ("Ca_HVA", "gCa_HVAbar", "ica", None, 2, True),
    ("Ca_LVAst", "gCa_LVAstbar", "ica", None, 2, True),
]


@pytest.mark.parametrize("spec", CURRENT_SPECS, ids=[s[0] for s in CURRENT_SPECS])
def test_current_is_gbar_times_gates_times_driving_force(spec, neuron_state):
    mech, gbar_name, current, reversal, power, has_h = spec
    sec = h.Section(name=f"cur_{mech}")
    sec.insert(mech)
    seg = sec(0.5)
    if current == "ina":
        seg.ena = 50.0
    elif current == "ik":
        seg.ek = -85.0
    gbar = 0.0123
    setattr(getattr(seg, mech), gbar_name, gbar)
    for v in (-70.0, -35.0, 5.0):
        h.finitialize(v)
        m = getattr(seg, mech)
        ref = reference_gates(mech, v)
        g = gbar * ref["mInf"] ** power * (ref["hInf"] if has_h else 1.0)
        e_rev = seg.eca if reversal is None else reversal
        i = m.ihcn if current == "ihcn" else getattr(seg, current)
        assert i == pytest.approx(g * (v - e_rev), rel=1e-9), f"{mech} {current} at {v} mV"


def test_sk_e2_check_values_and_current(neuron_state):
    sec = h.Section(name="sk")
    sec.insert("SK_E2")
    seg = sec(0.5)
    seg.ek = -85.0
    seg.SK_E2.gSK_E2bar = 0.09965
    for cai, text in SK_CHECK.items():
        seg.cai = cai                      # no mechanism writes cai here: it stays put
        h.finitialize(-76.0)
        z = seg.SK_E2.zInf
        assert abs(z - float(text)) <= printed_tolerance(text), f"z_inf({cai}) = {z}"
        assert z == pytest.approx(1 / (1 + (4.3e-4 / cai) ** 4.8), rel=1e-12)
        assert seg.SK_E2.z == z and seg.SK_E2.zTau == 1.0
        assert seg.ik == pytest.approx(0.09965 * z * (-76.0 + 85.0), rel=1e-12)
    seg.cai = 0.0                          # guarded: c = cai + 1e-7 below 1e-7 mM
    h.finitialize(-76.0)
    assert seg.SK_E2.zInf == pytest.approx(1 / (1 + (4.3e-4 / 1e-7) ** 4.8), rel=1e-12)


def test_eca_is_nernst_when_cadynamics_writes_cai(neuron_state):
    h.celsius = 6.3
    sec = h.Section(name="ca")
    sec.L = sec.diam = 10.0
    for mech in ("Ca_HVA", "Ca_LVAst", "CaDynamics_E2"):
        sec.insert(mech)
    seg = sec(0.5)
    seg.Ca_HVA.gCa_HVAbar = 0.005
    h.finitialize(-76.0)
    assert seg.cai == 5e-5                 # ion default, no INITIAL block
    assert seg.eca == pytest.approx(127.59, abs=0.005)
    rt_2f = GAS_R * (273.15 + 6.3) / (2 * FARADAY) * 1e3      # mV
    assert rt_2f == pytest.approx(12.0406, abs=1e-4)
    assert seg.eca == pytest.approx(rt_2f * math.log(2.0 / 5e-5), rel=1e-6)
    # depolarise: Ca enters, cai rises, and NEURON keeps eca on Nernst of the new cai
    h.dt = 0.025
    h.finitialize(-10.0)
    h.continuerun(20.0)
    assert seg.cai > 2e-4
    # a fixed step updates eca before the states; fcurrent() brings it up to date
    h.fcurrent()
    assert seg.eca == pytest.approx(rt_2f * math.log(2.0 / seg.cai), rel=1e-6)


@pytest.mark.parametrize("gamma,decay,depth,min_cai,v",
                         [(0.000509, 294.679571, 0.1, 1e-4, -10.0),
                          (0.05, 80.0, 0.3, 2e-4, 0.0),
                          (0.000637, 35.725651, 0.1, 1e-4, -76.0)])
def test_cadynamics_rhs(gamma, decay, depth, min_cai, v, neuron_state):
    cv = neuron_state
    h.celsius = 6.3
    sec = h.Section(name="shell")
    sec.L = sec.diam = 10.0
    for mech in ("Ca_HVA", "CaDynamics_E2"):
        sec.insert(mech)
    seg = sec(0.5)
    seg.Ca_HVA.gCa_HVAbar = 1e-3
    shell = seg.CaDynamics_E2
    shell.gamma, shell.decay, shell.depth, shell.minCai = gamma, decay, depth, min_cai
    cv.active(1)
    h.finitialize(v)
    y, ydot = h.Vector(), h.Vector()
    cv.states(y)
    cv.f(h.t, y, ydot)
    names = []
    for k in range(int(y.size())):
        name = h.ref("")
        cv.statename(k, name)
        names.append(name[0])
    k = next(i for i, n in enumerate(names) if "cai" in n and "shell" in n)
    expected = -1e4 * gamma * seg.ica / (2 * FARADAY * depth) - (seg.cai - min_cai) / decay
    assert seg.ica < 0
    assert ydot[k] == pytest.approx(expected, rel=1e-9)


def test_cadynamics_relaxes_to_min_cai_exactly(neuron_state):
    sec = h.Section(name="relax")
    sec.insert("CaDynamics_E2")        # no calcium current: pure relaxation
    shell = sec(0.5).CaDynamics_E2
    shell.decay, shell.minCai = 35.725651, 1e-4
    neuron_state.active(0)
    h.dt = 0.025
    h.finitialize(-76.0)
    t_vec, c_vec = h.Vector().record(h._ref_t), h.Vector().record(sec(0.5)._ref_cai)
    h.continuerun(100.0)
    t, c = np.array(t_vec), np.array(c_vec)
    exact = 1e-4 + (5e-5 - 1e-4) * np.exp(-t / 35.725651)
    np.testing.assert_allclose(c, exact, rtol=1e-9)    # cnexp is exact for a linear ODE


SOMA = dict(NaTs2_t=0.998912, SKv3_1=0.338029, SK_E2=0.09965, Im=0.000008, Ca_HVA=0.000644,
            Ca_LVAst=0.000557, Ih=0.000075, shell=(0.000509, 294.679571))
AXON = dict(NaTa_t=3.89618, Nap_Et2=0.005834, K_Tst=0.077274, K_Pst=0.188851, SKv3_1=0.473799,
            SK_E2=0.000047, Im=0.013322, Ca_HVA=0.000222, Ca_LVAst=0.000813, Ih=0.00005,
            shell=(0.000525, 277.300774))


@pytest.mark.parametrize("densities,amp_nA", [(SOMA, 0.15), (AXON, 0.3)], ids=["soma", "axon"])
def test_fixed_step_and_cvode_agree(densities, amp_nA, neuron_state):
    """A spiking compartment: cnexp (fixed dt) converges to the CVODE trajectory."""
    cv = neuron_state
    h.celsius = 6.3
    sec = h.Section(name="spiker")
    sec.L = sec.diam = 20.0
    sec.insert("pas")
    sec.g_pas, sec.e_pas = 3e-5, -90.0
    for mech, g in densities.items():
        if mech == "shell":
            sec.insert("CaDynamics_E2")
            sec.gamma_CaDynamics_E2, sec.decay_CaDynamics_E2 = g
            continue
        sec.insert(mech)
        setattr(sec, ("gIhbar" if mech == "Ih" else f"g{mech}bar") + f"_{mech}", g)
    sec.ek, sec.ena = -85.0, 50.0
    stim = h.IClamp(sec(0.5))
    stim.delay, stim.dur, stim.amp = 10.0, 60.0, amp_nA
    detector = h.NetCon(sec(0.5)._ref_v, None, sec=sec)
    detector.threshold = -20.0

    def spikes(cvode: bool, dt: float = 0.025) -> np.ndarray:
        times = h.Vector()
        detector.record(times)
        cv.active(int(cvode))
        if cvode:
            cv.atol(1e-7)
            cv.rtol(0)
        h.dt = dt
        h.finitialize(-76.0)
        h.continuerun(80.0)
        return np.array(times)

    ref = spikes(True)
    coarse, fine = spikes(False, 0.01), spikes(False, 0.005)
    assert len(ref) >= 3, f"expected repetitive firing, got spikes at {ref}"
    assert len(coarse) == len(fine) == len(ref)
    err_coarse, err_fine = np.abs(coarse - ref).max(), np.abs(fine - ref).max()
    assert err_fine < 0.1                     # ms
    assert err_fine < err_coarse              # converging as dt shrinks
