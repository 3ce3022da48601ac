COMMENT
Nap_Et2: persistent sodium current of the Hay et al. 2011 L5 pyramidal cell
(axon only), after Magistretti & Alonso 1999.

    ina = gNap_Et2bar * m^3 * h * (v - ena)

    m_inf = 1 / (1 + exp(-(v + 52.6)/4.6))
    tau_m = 6 / ((alpha + beta) qt),  alpha = 0.182 E(v + 38, 6), beta = 0.124 E(-(v + 38), 6)
    h_inf = 1 / (1 + exp((v + 48.8)/10))
    tau_h = 1 / ((alpha_h + beta_h) qt),
            alpha_h = 2.88e-6 E(-(v + 17), 4.63), beta_h = 6.94e-6 E(v + 64.4, 2.63)
E(x, k) = x / (1 - exp(-x/k)), E(0, k) = k; qt = 2.3^1.3 (constant).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.3.
ENDCOMMENT

NEURON {
    SUFFIX Nap_Et2
    USEION na READ ena WRITE ina
    RANGE gNap_Et2bar, gNap_Et2
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gNap_Et2bar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ena (mV)
    ina (mA/cm2)
    gNap_Et2 (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gNap_Et2 = gNap_Et2bar * m * m * m * h
    ina = gNap_Et2 * (v - ena)
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
    mInf = 1 / (1 + exp(-(vm + 52.6) / 4.6))
    am = 0.182 * efun(vm + 38, 6)
    bm = 0.124 * efun(-(vm + 38), 6)
    mTau = 6 / ((am + bm) * qt)
    hInf = 1 / (1 + exp((vm + 48.8) / 10))
    ah = 2.88e-6 * efun(-(vm + 17), 4.63)
    bh = 6.94e-6 * efun(vm + 64.4, 2.63)
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
