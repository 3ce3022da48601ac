COMMENT
Im: muscarinic (M-type) potassium current of the Hay et al. 2011 L5 pyramidal cell
(soma, axon, apical dendrites), after Adams et al. 1982.

    ik = gImbar * m * (v - ek)
    alpha = 3.3e-3 exp(0.1 (v + 35)),  beta = 3.3e-3 exp(-0.1 (v + 35))
    m_inf = alpha / (alpha + beta),    tau_m = 1 / ((alpha + beta) qt)
qt = 2.3^1.3 (constant; celsius is not read).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.7.
ENDCOMMENT

NEURON {
    SUFFIX Im
    USEION k READ ek WRITE ik
    RANGE gImbar, gIm
    RANGE mInf, mTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gImbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ek (mV)
    ik (mA/cm2)
    gIm (S/cm2)
    mInf
    mTau (ms)
}

STATE { m }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gIm = gImbar * m
    ik = gIm * (v - ek)
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
    LOCAL qt, a, b
    qt = 2.952882641412121   : 2.3^1.3
    a = 3.3e-3 * exp(0.1 * (vm + 35))
    b = 3.3e-3 * exp(-0.1 * (vm + 35))
    mInf = a / (a + b)
    mTau = 1 / ((a + b) * qt)
}
