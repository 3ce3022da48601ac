COMMENT
K_Tst: fast-inactivating (transient) potassium current of the Hay et al. 2011 L5
pyramidal cell (axon only), after Korngreen & Sakmann 2000.

    ik = gK_Tstbar * m^4 * h * (v - ek)

All formulas are evaluated at u = v + 10 mV (junction-potential shift):
    m_inf = 1 / (1 + exp(-u/19))        tau_m = (0.34 + 0.92 exp(-((u + 71)/59)^2)) / qt
    h_inf = 1 / (1 + exp((u + 66)/10))  tau_h = (8 + 49 exp(-((u + 73)/23)^2)) / qt
qt = 2.3^1.3 (constant; celsius is not read).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.4.
ENDCOMMENT

NEURON {
    SUFFIX K_Tst
    USEION k READ ek WRITE ik
    RANGE gK_Tstbar, gK_Tst
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gK_Tstbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ek (mV)
    ik (mA/cm2)
    gK_Tst (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gK_Tst = gK_Tstbar * m * m * m * m * h
    ik = gK_Tst * (v - ek)
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
    LOCAL qt, u
    qt = 2.952882641412121   : 2.3^1.3
    u = vm + 10
    mInf = 1 / (1 + exp(-u / 19))
    mTau = (0.34 + 0.92 * exp(-((u + 71) / 59) * ((u + 71) / 59))) / qt
    hInf = 1 / (1 + exp((u + 66) / 10))
    hTau = (8 + 49 * exp(-((u + 73) / 23) * ((u + 73) / 23))) / qt
}
