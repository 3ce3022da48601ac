COMMENT
NaTs2_t: transient (fast) sodium current of the Hay et al. 2011 L5 pyramidal cell
(soma and apical dendrites); NaTa_t kinetics shifted by +6 mV.

    ina = gNaTs2_tbar * m^3 * h * (v - ena)

Rates use E(x, k) = x / (1 - exp(-x/k)) with its analytic limit E(0, k) = k:
    alpha_m = 0.182 E(v + 32, 6)     beta_m = 0.124 E(-(v + 32), 6)
    alpha_h = 0.015 E(-(v + 60), 6)  beta_h = 0.015 E(v + 60, 6)
x_inf = alpha / (alpha + beta), tau_x = 1 / ((alpha + beta) qt), with the constant
qt = 2.3^((34 - 21)/10) (it does not read celsius).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.2.
ENDCOMMENT

NEURON {
    SUFFIX NaTs2_t
    USEION na READ ena WRITE ina
    RANGE gNaTs2_tbar, gNaTs2_t
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gNaTs2_tbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ena (mV)
    ina (mA/cm2)
    gNaTs2_t (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gNaTs2_t = gNaTs2_tbar * m * m * m * h
    ina = gNaTs2_t * (v - ena)
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
    LOCAL qt, am, bm, ah, bh
    qt = 2.952882641412121   : 2.3^1.3
    am = 0.182 * efun(vm + 32, 6)
    bm = 0.124 * efun(-(vm + 32), 6)
    ah = 0.015 * efun(-(vm + 60), 6)
    bh = 0.015 * efun(vm + 60, 6)
    mInf = am / (am + bm)
    mTau = 1 / ((am + bm) * qt)
    hInf = ah / (ah + bh)
    hTau = 1 / ((ah + bh) * qt)
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
