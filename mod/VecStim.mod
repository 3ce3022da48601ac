COMMENT
VecStim: an artificial cell that fires at the times held in a Vector.

NetPyNE's point-cell population `cellModel: 'VecStim'` (with `spkTimes`,
`rate`/`interval`, `pulses`, `spikePattern`) creates `h.VecStim()` and calls
`play(times)` with a hoc Vector of spike times (ms, ascending). NEURON's pip
wheel does not compile a VecStim into nrniv, so lfdeep-neuron ships this one:
without it NetPyNE treats a VecStim population as a compartmental cell and
fails with KeyError: 'params'.

Interface
  vs.play(vec)   use the times of `vec` (a reference is kept; the Vector is read
                 at finitialize and while the run proceeds, so it may be filled
                 after play() and before finitialize)
  vs.play()      forget the Vector (no more spikes)
  NetCon(vs, target) delivers one event per time; times before the time of
  finitialize fire at finitialize; NaN entries end the list.

State: `index` is the position in the Vector of the next spike (-1 when the
list is exhausted), `t_next` its time (ms).
ENDCOMMENT

NEURON {
    THREADSAFE
    ARTIFICIAL_CELL VecStim
    BBCOREPOINTER times_vec
    RANGE index, t_next
}

ASSIGNED {
    index
    t_next (ms)
    times_vec
}

INITIAL {
    index = 0
    advance()
    if (index >= 0) {
        net_send(t_next - t, 1)
    }
}

NET_RECEIVE (w) {
    if (flag == 1) {
        net_event(t)
        advance()
        if (index >= 0) {
            net_send(t_next - t, 1)
        }
    }
}

PROCEDURE advance() {
    : Read the time at `index` into t_next (not before now) and step on; index = -1 at the end.
    lookup()
    if (index >= 0) {
        index = index + 1
        if (t_next < t) {
            t_next = t
        }
    }
}

PROCEDURE lookup() {
VERBATIM
    {
        IvocVect* held = *((IvocVect**) (&_p_times_vec));
        long at = (long) index;
        if (held == 0 || at < 0 || at >= (long) vector_capacity(held)) {
            index = -1.0;
        } else {
            double when = vector_vec(held)[at];
            if (when != when) {          /* NaN ends the list */
                index = -1.0;
            } else {
                t_next = when;
            }
        }
    }
ENDVERBATIM
}

PROCEDURE play() {
VERBATIM
    {
        IvocVect** slot = (IvocVect**) (&_p_times_vec);
        IvocVect* given = ifarg(1) ? vector_arg(1) : 0;
        if (given) {
            hoc_obj_ref(*vector_pobj(given));
        }
        if (*slot) {
            hoc_obj_unref(*vector_pobj(*slot));
        }
        *slot = given;
    }
ENDVERBATIM
}

DESTRUCTOR {
VERBATIM
    {
        IvocVect** slot = (IvocVect**) (&_p_times_vec);
        if (*slot) {
            hoc_obj_unref(*vector_pobj(*slot));
            *slot = 0;
        }
    }
ENDVERBATIM
}

VERBATIM
/* CoreNEURON transfer is not supported for this mechanism: nothing to write. */
static void bbcore_write(double* x, int* d, int* xx, int* offset, _threadargsproto_) {}
static void bbcore_read(double* x, int* d, int* xx, int* offset, _threadargsproto_) {}
ENDVERBATIM
