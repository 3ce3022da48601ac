COMMENT
GabaASyn: deterministic inhibitory GABA_A synapse, a normalised double exponential
(the Beniaguev et al. 2021 configuration of the Hay L5PC, written for lfdeep-neuron
from shared/hay/BIOPHYSICS.md section 6.3/6.4).

    dA/dt = -A / tau_r,  dB/dt = -B / tau_d;  on each event of weight w: A += w f, B += w f
    t_pk = tau_r tau_d / (tau_d - tau_r) ln(tau_d / tau_r)
    f    = 1 / (exp(-t_pk / tau_d) - exp(-t_pk / tau_r))
    g = gmax (B - A),  i = g (v - e)              (nA; positive = outward)

A lone event of weight 1 peaks at exactly gmax. Release is deterministic: every event
is transmitted, no random numbers are used. Under CVODE the jump happens exactly at the
event time (NET_RECEIVE). If tau_r is not smaller than tau_d, INITIAL uses
tau_r = 0.9999 tau_d (as NEURON's Exp2Syn does).
ENDCOMMENT

NEURON {
    POINT_PROCESS GabaASyn
    NONSPECIFIC_CURRENT i
    RANGE tau_r, tau_d, gmax, e
    RANGE g, i, factor
    THREADSAFE
}

UNITS {
    (nA) = (nanoamp)
    (mV) = (millivolt)
    (uS) = (microsiemens)
}

PARAMETER {
    tau_r = 0.2 (ms)
    tau_d = 8 (ms)
    gmax = 0.001 (uS)
    e = -80 (mV)
}

ASSIGNED {
    v (mV)
    i (nA)
    g (uS)
    factor
    tr (ms)
}

STATE {
    A
    B
}

INITIAL {
    if (tau_r / tau_d > 0.9999) {
        tr = 0.9999 * tau_d
    } else {
        tr = tau_r
    }
    factor = peak_factor(tr, tau_d)
    A = 0
    B = 0
}

BREAKPOINT {
    SOLVE states METHOD cnexp
    g = gmax * (B - A)
    i = g * (v - e)
}

DERIVATIVE states {
    A' = -A / tr
    B' = -B / tau_d
}

NET_RECEIVE(weight) {
    A = A + weight * factor
    B = B + weight * factor
}

FUNCTION peak_factor(tr (ms), td (ms)) {
    LOCAL tpk
    tpk = tr * td / (td - tr) * log(td / tr)
    peak_factor = 1 / (exp(-tpk / td) - exp(-tpk / tr))
}
