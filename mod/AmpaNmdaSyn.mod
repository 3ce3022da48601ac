COMMENT
AmpaNmdaSyn: deterministic excitatory synapse with an AMPA and an NMDA receptor,
each a normalised double exponential (the Beniaguev et al. 2021 configuration of the
Hay L5PC, written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 6.2/6.4).

States (per receptor X = AMPA, NMDA): dA_X/dt = -A_X / tau_r_X, dB_X/dt = -B_X / tau_d_X.
On every event of weight w: A_X += w f_X and B_X += w f_X for both receptors, with the
peak normalisation
    t_pk = tau_r tau_d / (tau_d - tau_r) ln(tau_d / tau_r)
    f    = 1 / (exp(-t_pk / tau_d) - exp(-t_pk / tau_r))
so that a lone event of weight 1 peaks at exactly gmax in each receptor.

    g_AMPA = gmax (B_AMPA - A_AMPA)
    g_NMDA = gmax (B_NMDA - A_NMDA) mgblock,  mgblock = 1 / (1 + exp(-0.08 v) mg / 3.57)
    i = (g_AMPA + g_NMDA) (v - e)                 (nA; positive = outward)

Release is deterministic: every event is transmitted, no random numbers are used.
Under CVODE the jump happens exactly at the event time (NET_RECEIVE).
If tau_r is not smaller than tau_d the double exponential is degenerate; INITIAL then
uses tau_r = 0.9999 tau_d (as NEURON's Exp2Syn does).
ENDCOMMENT

NEURON {
    POINT_PROCESS AmpaNmdaSyn
    NONSPECIFIC_CURRENT i
    RANGE tau_r_AMPA, tau_d_AMPA, tau_r_NMDA, tau_d_NMDA, gmax, e, mg
    RANGE g, g_AMPA, g_NMDA, i, i_AMPA, i_NMDA, mgblock
    RANGE factor_AMPA, factor_NMDA
    THREADSAFE
}

UNITS {
    (nA) = (nanoamp)
    (mV) = (millivolt)
    (uS) = (microsiemens)
    (mM) = (milli/liter)
}

PARAMETER {
    tau_r_AMPA = 0.3 (ms)
    tau_d_AMPA = 3 (ms)
    tau_r_NMDA = 2 (ms)
    tau_d_NMDA = 70 (ms)
    gmax = 0.0004 (uS)
    e = 0 (mV)
    mg = 1 (mM)
}

ASSIGNED {
    v (mV)
    i (nA)
    i_AMPA (nA)
    i_NMDA (nA)
    g (uS)
    g_AMPA (uS)
    g_NMDA (uS)
    mgblock
    factor_AMPA
    factor_NMDA
    tr_AMPA (ms)
    tr_NMDA (ms)
}

STATE {
    A_AMPA
    B_AMPA
    A_NMDA
    B_NMDA
}

INITIAL {
    tr_AMPA = rise_time(tau_r_AMPA, tau_d_AMPA)
    tr_NMDA = rise_time(tau_r_NMDA, tau_d_NMDA)
    factor_AMPA = peak_factor(tr_AMPA, tau_d_AMPA)
    factor_NMDA = peak_factor(tr_NMDA, tau_d_NMDA)
    A_AMPA = 0
    B_AMPA = 0
    A_NMDA = 0
    B_NMDA = 0
}

BREAKPOINT {
    SOLVE states METHOD cnexp
    mgblock = 1 / (1 + exp(-0.08 * v) * mg / 3.57)
    g_AMPA = gmax * (B_AMPA - A_AMPA)
    g_NMDA = gmax * (B_NMDA - A_NMDA) * mgblock
    g = g_AMPA + g_NMDA
    i_AMPA = g_AMPA * (v - e)
    i_NMDA = g_NMDA * (v - e)
    i = i_AMPA + i_NMDA
}

DERIVATIVE states {
    A_AMPA' = -A_AMPA / tr_AMPA
    B_AMPA' = -B_AMPA / tau_d_AMPA
    A_NMDA' = -A_NMDA / tr_NMDA
    B_NMDA' = -B_NMDA / tau_d_NMDA
}

NET_RECEIVE(weight) {
    A_AMPA = A_AMPA + weight * factor_AMPA
    B_AMPA = B_AMPA + weight * factor_AMPA
    A_NMDA = A_NMDA + weight * factor_NMDA
    B_NMDA = B_NMDA + weight * factor_NMDA
}

FUNCTION rise_time(tr (ms), td (ms)) (ms) {
    if (tr / td > 0.9999) {
        rise_time = 0.9999 * td
    } else {
        rise_time = tr
    }
}

FUNCTION peak_factor(tr (ms), td (ms)) {
    LOCAL tpk
    tpk = tr * td / (td - tr) * log(td / tr)
    peak_factor = 1 / (exp(-tpk / td) - exp(-tpk / tr))
}
