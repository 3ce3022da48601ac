COMMENT
K_Pst: slow-inactivating (persistent) potassium current of the Hay et al. 2011 L5
pyramidal cell (axon only), after Korngreen & Sakmann 2000.

    ik = gK_Pstbar * m^2 * h * (v - ek)

All formulas are evaluated at u = v + 10 mV (junction-potential shift):
    m_inf = 1 / (1 + exp(-(u + 1)/12))
    tau_m = (1.25 + 175.03 exp(0.026 u)) / qt    if u < -50
            (1.25 + 13 exp(-0.026 u)) / qt       otherwise
    h_inf = 1 / (1 + exp((u + 54)/11))
    tau_h = (360 + (1010 + 24 (u + 55)) exp(-((u + 75)/48)^2)) / qt
qt = 2.3^1.3 (constant; celsius is not read).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.5.
ENDCOMMENT

NEURON {
    SUFFIX K_Pst
    USEION k READ ek WRITE ik
    RANGE gK_Pstbar, gK_Pst
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gK_Pstbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    ek (mV)
    ik (mA/cm2)
    gK_Pst (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gK_Pst = gK_Pstbar * m * m * h
    ik = gK_Pst * (v - ek)
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
    mInf = 1 / (1 + exp(-(u + 1) / 12))
    if (u < -50) {
        mTau = (1.25 + 175.03 * exp(0.026 * u)) / qt
    } else {
        mTau = (1.25 + 13 * exp(-0.026 * u)) / qt
    }
    hInf = 1 / (1 + exp((u + 54) / 11))
    hTau = (360 + (1010 + 24 * (u + 55)) * exp(-((u + 75) / 48) * ((u + 75) / 48))) / qt
}
