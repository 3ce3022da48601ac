COMMENT
SK_E2: small-conductance calcium-activated potassium current of the Hay et al. 2011
L5 pyramidal cell (soma, axon, apical dendrites), after Koehler et al. 1996.

    ik = gSK_E2bar * z * (v - ek)
    z_inf = 1 / (1 + (4.3e-4 mM / c)^4.8),  c = cai (c = cai + 1e-7 mM if cai < 1e-7 mM)
    tau_z = 1 ms                                  (constant, no temperature factor)
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.11.
ENDCOMMENT

NEURON {
    SUFFIX SK_E2
    USEION k READ ek WRITE ik
    USEION ca READ cai
    RANGE gSK_E2bar, gSK_E2
    RANGE zInf, zTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
    (mM) = (milli/liter)
}

PARAMETER {
    gSK_E2bar = 0.000001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ek (mV)
    cai (mM)
    ik (mA/cm2)
    gSK_E2 (S/cm2)
    zInf
    zTau (ms)
}

STATE { z FROM 0 TO 1 }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gSK_E2 = gSK_E2bar * z
    ik = gSK_E2 * (v - ek)
}

INITIAL {
    rates(cai)
    z = zInf
}

DERIVATIVE states {
    rates(cai)
    z' = (zInf - z) / zTau
}

PROCEDURE rates(ca (mM)) {
    LOCAL c
    c = ca
    if (c < 1e-7) {
        c = c + 1e-7
    }
    zInf = 1 / (1 + pow(4.3e-4 / c, 4.8))
    zTau = 1
}
