COMMENT
Ca_HVA: high-voltage-activated calcium current of the Hay et al. 2011 L5 pyramidal
cell (soma, axon, apical dendrites), after Reuveni et al. 1993.

    ica = gCa_HVAbar * m^2 * h * (v - eca)      (eca: Nernst, computed by NEURON)
    alpha_m = 0.055 E(v + 27, 3.8)              beta_m = 0.94 exp(-(v + 75)/17)
    alpha_h = 4.57e-4 exp(-(v + 13)/50)         beta_h = 0.0065 / (1 + exp(-(v + 15)/28))
x_inf = alpha / (alpha + beta), tau_x = 1 / (alpha + beta)   (no temperature factor)
E(x, k) = x / (1 - exp(-x/k)), E(0, k) = k.
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.9.
ENDCOMMENT

NEURON {
    SUFFIX Ca_HVA
    USEION ca READ eca WRITE ica
    RANGE gCa_HVAbar, gCa_HVA
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gCa_HVAbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    eca (mV)
    ica (mA/cm2)
    gCa_HVA (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gCa_HVA = gCa_HVAbar * m * m * h
    ica = gCa_HVA * (v - eca)
}

INITIAL {
    rates(v)
    m = mInf
    h = hInf
}

DERIVATIVE states {
    rates(v)
    m' = (mInf - m) / mTau
    h' = (hInf - h) / hTau
}

PROCEDURE rates(vm (mV)) {
    LOCAL am, bm, ah, bh
    am = 0.055 * efun(vm + 27, 3.8)
    bm = 0.94 * exp(-(vm + 75) / 17)
    ah = 4.57e-4 * exp(-(vm + 13) / 50)
    bh = 0.0065 / (1 + exp(-(vm + 15) / 28))
    mInf = am / (am + bm)
    mTau = 1 / (am + bm)
    hInf = ah / (ah + bh)
    hTau = 1 / (ah + bh)
}

FUNCTION efun(x (mV), k (mV)) (mV) {
    : x / (1 - exp(-x/k)); second-order series where the ratio is 0/0-prone
    LOCAL y
    y = x / k
    if (fabs(y) < 1e-4) {
        efun = k * (1 + y / 2 + y * y / 12)
    } else {
        efun = x / (1 - exp(-y))
    }
}
