"""Biophysics of the Hay L5PC as simulated by Beniaguev et al. 2021 (``L5PCbiophys5b``).

Every number comes from ``shared/hay/BIOPHYSICS.md`` (§2 passive, §4 calcium, §5 densities).
Units: S/cm² (densities), µF/cm² (cm), Ω·cm (Ra), mV, ms, µm, mM.

Section lists: ``somatic`` (soma[0]), ``axonal`` (the two 30-µm stubs), ``basal`` (dend[*]),
``apical`` (apic[*]). Apical Ih and Ca_LVAst depend on the path distance ``d`` from the soma centre
(soma(0.5), the same as apic[0](0)); each apical section's segments 0..nseg-2 take the value at
their centre and its last segment takes the value at the section's far end (x = 1), and each value
is rounded to 10 decimals, exactly as the original's text-formatting loop does (§5.4).
"""
from __future__ import annotations

import math

__all__ = [
    "PASSIVE",
    "UNIFORM",
    "CA_DYNAMICS",
    "ION_REVERSALS_MV",
    "MECH_TABLE_PARAMS",
    "ih_apical",
    "ca_lva_apical",
    "round10",
    "SECTION_MECHANISMS",
]

#: cm (µF/cm²), Ra (Ω·cm), g_pas (S/cm²), e_pas (mV) per section list (§2.1).
PASSIVE = {
    "somatic": dict(cm=1.0, Ra=100.0, g_pas=3e-5, e_pas=-90.0),
    "axonal": dict(cm=1.0, Ra=100.0, g_pas=3e-5, e_pas=-90.0),
    "basal": dict(cm=2.0, Ra=100.0, g_pas=6e-5, e_pas=-90.0),
    "apical": dict(cm=2.0, Ra=100.0, g_pas=6e-5, e_pas=-90.0),
}

#: Mechanisms inserted per section list (pitfall 10 of §8).
SECTION_MECHANISMS = {
    "somatic": ("Ih", "NaTs2_t", "SKv3_1", "SK_E2", "Im", "Ca_HVA", "Ca_LVAst", "CaDynamics_E2"),
    "axonal": ("Ih", "NaTa_t", "Nap_Et2", "K_Tst", "K_Pst", "SKv3_1", "SK_E2", "Im", "Ca_HVA",
               "Ca_LVAst", "CaDynamics_E2"),
    "basal": ("Ih",),
    "apical": ("Ih", "NaTs2_t", "SKv3_1", "SK_E2", "Im", "Ca_HVA", "Ca_LVAst", "CaDynamics_E2"),
}

#: Uniform maximal conductances (S/cm²) per section list, as NEURON range names (§5.1).
#: Apical Ih and Ca_LVAst are distributed (see :func:`ih_apical`, :func:`ca_lva_apical`).
UNIFORM = {
    "somatic": {
        "gNaTs2_tbar_NaTs2_t": 0.998912, "gSKv3_1bar_SKv3_1": 0.338029, "gSK_E2bar_SK_E2": 0.09965,
        "gImbar_Im": 0.000008, "gCa_HVAbar_Ca_HVA": 0.000644, "gCa_LVAstbar_Ca_LVAst": 0.000557,
        "gIhbar_Ih": 0.000075,
    },
    "axonal": {
        "gNaTa_tbar_NaTa_t": 3.89618, "gNap_Et2bar_Nap_Et2": 0.005834, "gK_Tstbar_K_Tst": 0.077274,
        "gK_Pstbar_K_Pst": 0.188851, "gSKv3_1bar_SKv3_1": 0.473799, "gSK_E2bar_SK_E2": 0.000047,
        "gImbar_Im": 0.013322, "gCa_HVAbar_Ca_HVA": 0.000222, "gCa_LVAstbar_Ca_LVAst": 0.000813,
        "gIhbar_Ih": 0.00005,
    },
    "apical": {
        "gNaTs2_tbar_NaTs2_t": 0.021489, "gSKv3_1bar_SKv3_1": 0.001808, "gSK_E2bar_SK_E2": 0.000002,
        "gImbar_Im": 0.00099, "gCa_HVAbar_Ca_HVA": 0.000701,
    },
    "basal": {"gIhbar_Ih": 0.00005},
}

#: CaDynamics_E2 parameters per section list (§4): gamma (free fraction), decay (ms), depth (µm),
#: minCai (mM).
CA_DYNAMICS = {
    "somatic": dict(gamma=0.000509, decay=294.679571, depth=0.1, minCai=1e-4),
    "axonal": dict(gamma=0.000525, decay=277.300774, depth=0.1, minCai=1e-4),
    "apical": dict(gamma=0.000637, decay=35.725651, depth=0.1, minCai=1e-4),
}

#: Fixed reversal potentials (mV) in sections with Na/K channels (§2.2); Ih's own ehcn.
ION_REVERSALS_MV = dict(ek=-85.0, ena=50.0)
IH_EHCN_MV = -45.0
IH_VSHIFT_MV = 0.0

#: Per-segment parameters reported in ``segments/mech/<param>`` (0 where the mechanism is absent);
#: (NEURON range name, mechanism or ion that must be present to read it, None = always).
MECH_TABLE_PARAMS = (
    ("Ra", None), ("cm", None), ("g_pas", "pas"), ("e_pas", "pas"),
    ("ek", "k_ion"), ("ena", "na_ion"),
    ("gNaTa_tbar_NaTa_t", "NaTa_t"), ("gNaTs2_tbar_NaTs2_t", "NaTs2_t"),
    ("gNap_Et2bar_Nap_Et2", "Nap_Et2"), ("gK_Pstbar_K_Pst", "K_Pst"), ("gK_Tstbar_K_Tst", "K_Tst"),
    ("gSKv3_1bar_SKv3_1", "SKv3_1"), ("gSK_E2bar_SK_E2", "SK_E2"), ("gImbar_Im", "Im"),
    ("gIhbar_Ih", "Ih"), ("vshift_Ih", "Ih"),
    ("gCa_HVAbar_Ca_HVA", "Ca_HVA"), ("gCa_LVAstbar_Ca_LVAst", "Ca_LVAst"),
    ("gamma_CaDynamics_E2", "CaDynamics_E2"), ("decay_CaDynamics_E2", "CaDynamics_E2"),
    ("depth_CaDynamics_E2", "CaDynamics_E2"), ("minCai_CaDynamics_E2", "CaDynamics_E2"),
)

# Apical distributions (§5.2, §5.3).
IH_PLATEAU_FRACTION = 0.65          # normalised distance beyond which Ih is constant
IH_OFFSET, IH_AMPLITUDE, IH_RATE, IH_SCALE_S_CM2 = -0.8696, 2.0870, 3.6161, 1e-4
CA_LVA_HOT_S_CM2 = 0.141954 * 1.6   # = 0.2271264 S/cm² inside the hot zone
CA_LVA_COLD_FACTOR = 0.01           # outside the zone
CA_LVA_ZONE_UM = (685.0, 885.0)     # strict inequalities, absolute path distance


def round10(value: float) -> float:
    """Round like the original's ``%.10f`` text formatting before assignment (§5.4)."""
    return float(f"{value:.10f}")


def ih_apical(dist_um: float, max_length_um: float) -> float:
    """Apical Ih density (S/cm²) at path distance ``dist_um`` from the soma centre (§5.2)."""
    d = min(dist_um / max_length_um, IH_PLATEAU_FRACTION)
    return IH_SCALE_S_CM2 * (IH_OFFSET + IH_AMPLITUDE * math.exp(IH_RATE * (d - 0.0)))


def ca_lva_apical(dist_um: float) -> float:
    """Apical Ca_LVAst density (S/cm²): a hot zone 685 µm < d < 885 µm, 1 % of it elsewhere (§5.3)."""
    lo, hi = CA_LVA_ZONE_UM
    return CA_LVA_HOT_S_CM2 * (1.0 if lo < dist_um < hi else CA_LVA_COLD_FACTOR)
