COMMENT
CaDynamics_E2: submembrane calcium shell of the Hay et al. 2011 L5 pyramidal cell
(soma, axon, apical dendrites). One independent shell per segment, no diffusion:

    d cai/dt = -1e4 * gamma * ica / (2 F depth) - (cai - minCai) / decay

ica: the segment's total calcium current (mA/cm2), gamma: free fraction, depth (um),
decay (ms), minCai (mM). The factor 1e4 converts (mA/cm2)/(C/mol um) to mM/ms.
There is deliberately no INITIAL block: cai starts at the ion's initial value
(cai0_ca_ion, 5e-5 mM by default). Because this mechanism WRITES cai, NEURON
recomputes eca from the Nernst equation (cao fixed, 2 mM by default).
Written for lfdeep-neuron from shared/hay/BIOPHYSICS.md section 4.
ENDCOMMENT

NEURON {
    SUFFIX CaDynamics_E2
    USEION ca READ ica WRITE cai
    RANGE gamma, decay, depth, minCai
    THREADSAFE
}

UNITS {
    (mV) = (millivolt)
    (mA) = (milliamp)
    (mM) = (milli/liter)
    (um) = (micron)
    FARADAY = (faraday) (coulomb)
}

PARAMETER {
    gamma = 0.05
    decay = 80 (ms)
    depth = 0.1 (um)
    minCai = 1e-4 (mM)
}

ASSIGNED {
    ica (mA/cm2)
}

STATE {
    cai (mM)
}

BREAKPOINT {
    SOLVE states METHOD cnexp
}

DERIVATIVE states {
    cai' = -(10000) * ica * gamma / (2 * FARADAY * depth) - (cai - minCai) / decay
}
