COMMENT
SKv3_1: Kv3.1 potassium current of the Hay et al. 2011 L5 pyramidal cell
(soma, axon, apical dendrites), after Rettig et al. 1992.

    ik = gSKv3_1bar * m * (v - ek)
    m_inf = 1 / (1 + exp(-(v - 18.7)/9.7))
    tau_m = 4 / (1 + exp(-(v + 46.56)/44.14))     (no temperature factor)
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.6.
ENDCOMMENT

NEURON {
    SUFFIX SKv3_1
    USEION k READ ek WRITE ik
    RANGE gSKv3_1bar, gSKv3_1
    RANGE mInf, mTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gSKv3_1bar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ek (mV)
    ik (mA/cm2)
    gSKv3_1 (S/cm2)
    mInf
    mTau (ms)
}

STATE { m }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gSKv3_1 = gSKv3_1bar * m
    ik = gSKv3_1 * (v - ek)
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
    mInf = 1 / (1 + exp(-(vm - 18.7) / 9.7))
    mTau = 4 / (1 + exp(-(vm + 46.56) / 44.14))
}
