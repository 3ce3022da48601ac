COMMENT
Ca_LVAst: low-voltage-activated (T-type) calcium current of the Hay et al. 2011 L5
pyramidal cell (soma, axon, apical dendrites), after Avery & Johnston 1996 with
time constants after Randall 1997.

    ica = gCa_LVAstbar * m^2 * h * (v - eca)    (eca: Nernst, computed by NEURON)

All formulas are evaluated at u = v + 10 mV (junction-potential shift):
    m_inf = 1 / (1 + exp(-(u + 30)/6))      tau_m = (5 + 20 / (1 + exp((u + 25)/5))) / qt
    h_inf = 1 / (1 + exp((u + 80)/6.4))     tau_h = (20 + 50 / (1 + exp((u + 40)/7))) / qt
qt = 2.3^1.3 (constant; celsius is not read).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 3.10.
ENDCOMMENT

NEURON {
    SUFFIX Ca_LVAst
    USEION ca READ eca WRITE ica
    RANGE gCa_LVAstbar, gCa_LVAst
    RANGE mInf, mTau, hInf, hTau
    THREADSAFE
}

UNITS {
    (S) = (siemens)
    (mV) = (millivolt)
    (mA) = (milliamp)
}

PARAMETER {
    gCa_LVAstbar = 0.00001 (S/cm2)
}

ASSIGNED {
    v (mV)
    eca (mV)
    ica (mA/cm2)
    gCa_LVAst (S/cm2)
    mInf
    mTau (ms)
    hInf
    hTau (ms)
}

STATE { m h }

BREAKPOINT {
    SOLVE states METHOD cnexp
    gCa_LVAst = gCa_LVAstbar * m * m * h
    ica = gCa_LVAst * (v - eca)
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
    mInf = 1 / (1 + exp(-(u + 30) / 6))
    mTau = (5 + 20 / (1 + exp((u + 25) / 5))) / qt
    hInf = 1 / (1 + exp((u + 80) / 6.4))
    hTau = (20 + 50 / (1 + exp((u + 40) / 7))) / qt
}
