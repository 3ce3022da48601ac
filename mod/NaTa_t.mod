COMMENT
NaTa_t: transient (fast) sodium current of the Hay et al. 2011 L5 pyramidal cell
(axon only), after Colbert & Pan 2002.

    ina = gNaTa_tbar * m^3 * h * (v - ena)

Rates use E(x, k) = x / (1 - exp(-x/k)) with its analytic limit E(0, k) = k:
    alpha_m = 0.182 E(v + 38, 6)     beta_m = 0.124 E(-(v + 38), 6)
    alpha_h = 0.015 E(-(v + 66), 6)  beta_h = 0.015 E(v + 66, 6)
x_inf = alpha / (alpha + beta), tau_x = 1 / ((alpha + beta) qt), with the constant
qt = 2.3^((34 - 21)/10) (it does not read celsius).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.1.
ENDCOMMENT

NEURON {
    SUFFIX NaTa_t
    USEION na READ ena WRITE ina
    RANGE gNaTa_tbar, gNaTa_t
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gNaTa_tbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ena (mV)
    ina (mA/cm2)
    gNaTa_t (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gNaTa_t = gNaTa_tbar * m * m * m * h
    ina = gNaTa_t * (v - ena)
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
    am = 0.182 * efun(vm + 38, 6)
    bm = 0.124 * efun(-(vm + 38), 6)
    ah = 0.015 * efun(-(vm + 66), 6)
    bh = 0.015 * efun(vm + 66, 6)
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
