COMMENT
Ih: hyperpolarisation-activated cation (HCN) current of the Hay et al. 2011 L5
pyramidal cell (every section), after Kole, Hallermann & Stuart 2006.

    ihcn = gIhbar * m * (v - ehcn)          (non-specific current, own reversal ehcn)
    alpha = 6.43e-3 E(-(v - vhalf - vshift), 11.9)
    beta  = 0.193 exp((v - vshift)/33.1)
    m_inf = alpha / (alpha + beta),  tau_m = 1 / (alpha + beta)   (no temperature factor)
E(x, k) = x / (1 - exp(-x/k)), E(0, k) = k.
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.8.
ENDCOMMENT

NEURON {
    SUFFIX Ih
    NONSPECIFIC_CURRENT ihcn
    RANGE gIhbar, gIh, ihcn, ehcn, vshift
    RANGE mInf, mTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gIhbar = 0.00001 (S/cm2)
    ehcn = -45 (mV)
    vshift = 0 (mV)
    vhalf = -154.9 (mV)
}

ASSIGNED {
    v (mV)
    ihcn (mA/cm2)
    gIh (S/cm2)
    mInf
    mTau (ms)
}

STATE { m }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gIh = gIhbar * m
    ihcn = gIh * (v - ehcn)
}

INITIAL {
    rates(v)
    m = mInf
}

DERIVATIVE states {
    rates(v)
    m' = (mInf - m) / mTau
}

PROCEDURE rates(vm (mV)) {
    LOCAL a, b
    a = 6.43e-3 * efun(-(vm - vhalf - vshift), 11.9)
    b = 0.193 * exp((vm - vshift) / 33.1)
    mInf = a / (a + b)
    mTau = 1 / (a + b)
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
