COMMENT
SurrogateCell: event intake and spike source of one deep-surrogate L5PC.

One instance stands for one SurrogateL5PC in a NEURON network (see
lfdeep_neuron/cosim). It is the NetCon target for all 1278 synaptic input
channels of the cell and, at the same time, the cell's spike source.

Intake. Every process keeps ONE hoc Vector of n_rows * n_channels doubles
(row = instance, column = input channel), handed to the mechanism through
set_buffer(vec). Each instance knows its row offset `base` (= row *
n_channels). An incoming event with NetCon weight vector (w, channel),
channel >= 0, adds w (units of the reference synapse) to
buffer[base + channel]. No Python runs per event.

Touched lists. Each instance also belongs to an engine `slot` (0..7). When an
event lands on a buffer entry that is still zero, the entry's flat index is
appended to the slot's touched list (a second Vector, set_touched(slot, vec)).
Once per surrogate step the engine reads only those entries (a few thousand
instead of n_rows * 1278), zeroes them and resets the list (reset_touched).
An index can appear twice if an entry sums back to exactly zero; if the list
fills up, touched_overflow(slot) becomes 1 and the engine falls back to
reading its whole rows for that step.

Spikes out. An event with a negative channel (sent by the engine through a
per-instance "fire" NetCon whose weight[1] = -1) calls net_event(t): the
instance emits a spike at the event time, which NEURON delivers like the
spike of any other cell (ParallelContext gid exchange included).

Safety. Events whose channel is not an integer in [0, n_channels), whose row
lies outside the buffer, or that arrive before a buffer was set are not
written anywhere; they are counted (bad_events(), last_bad_event(0|1)) and the
engine raises a clear error. A Vector must not be resized or freed while its
pointer is held: the engine owns them and replaces them only at
initialisation, handing the new pointer before releasing the old Vector.

Pitfall guarded against: without the (empty) INITIAL block inside
NET_RECEIVE, finitialize() would reset every NetCon's weight[1] to zero and
all events would land in channel 0.
ENDCOMMENT

NEURON {
    ARTIFICIAL_CELL SurrogateCell
    RANGE base, slot
    GLOBAL n_channels
    THREADSAFE
}

PARAMETER {
    n_channels = 1278   : input channels per instance
    base = -1           : row offset (row * n_channels) in the shared buffer; -1 = unregistered
    slot = 0            : engine slot (0..7) whose touched list records this instance's entries
}

VERBATIM
#define SURROGATE_MAX_SLOTS 8
/* One shared intake buffer per process (all instances of a process write into it). */
static double* surrogate_buffer_ = 0;
static long surrogate_buffer_len_ = 0;
/* Per engine slot: flat indices of the entries that became non-zero since the last reset. */
static double* surrogate_touched_[SURROGATE_MAX_SLOTS] = {0};
static long surrogate_touched_cap_[SURROGATE_MAX_SLOTS] = {0};
static long surrogate_n_touched_[SURROGATE_MAX_SLOTS] = {0};
static int surrogate_overflow_[SURROGATE_MAX_SLOTS] = {0};
static double surrogate_bad_events_ = 0.0;
static double surrogate_last_bad_[2] = {0.0, 0.0};   /* (row offset, channel) of the last bad event */
ENDVERBATIM

NET_RECEIVE(w, channel) {
    INITIAL {
        : keep the channel number given by the user across finitialize()
    }
    if (channel < 0) {
        net_event(t)
    } else {
        accumulate(base, slot, channel, w)
    }
}

PROCEDURE accumulate(row_offset, engine_slot, channel, w) {
VERBATIM
    {
        long c = (long) _lchannel;
        long off = (long) _lrow_offset;
        long idx = off + c;
        int s = (int) _lengine_slot;
        if (surrogate_buffer_ == 0 || (double) c != _lchannel || c < 0 || c >= (long) n_channels
            || off < 0 || idx >= surrogate_buffer_len_ || s < 0 || s >= SURROGATE_MAX_SLOTS) {
            surrogate_bad_events_ += 1.0;
            surrogate_last_bad_[0] = _lrow_offset;
            surrogate_last_bad_[1] = _lchannel;
        } else {
            if (surrogate_buffer_[idx] == 0.0) {
                if (surrogate_n_touched_[s] < surrogate_touched_cap_[s]) {
                    surrogate_touched_[s][surrogate_n_touched_[s]++] = (double) idx;
                } else {
                    surrogate_overflow_[s] = 1;
                }
            }
            surrogate_buffer_[idx] += _lw;
        }
    }
ENDVERBATIM
}

PROCEDURE set_buffer() {
    : set_buffer(vec): hand the shared intake Vector to the mechanism (all instances).
    : set_buffer() with no argument forgets it (events are then counted as bad).
VERBATIM
    if (ifarg(1)) {
        IvocVect* vec = vector_arg(1);
        surrogate_buffer_ = vector_vec(vec);
        surrogate_buffer_len_ = (long) vector_capacity(vec);
    } else {
        surrogate_buffer_ = 0;
        surrogate_buffer_len_ = 0;
    }
ENDVERBATIM
}

PROCEDURE set_touched(engine_slot) {
    : set_touched(slot, vec): the touched list of an engine slot; set_touched(slot) forgets it.
VERBATIM
    {
        int s = (int) _lengine_slot;
        if (s >= 0 && s < SURROGATE_MAX_SLOTS) {
            if (ifarg(2)) {
                IvocVect* vec = vector_arg(2);
                surrogate_touched_[s] = vector_vec(vec);
                surrogate_touched_cap_[s] = (long) vector_capacity(vec);
            } else {
                surrogate_touched_[s] = 0;
                surrogate_touched_cap_[s] = 0;
            }
            surrogate_n_touched_[s] = 0;
            surrogate_overflow_[s] = 0;
        }
    }
ENDVERBATIM
}

FUNCTION n_touched(engine_slot) {
    : number of indices in the slot's touched list
VERBATIM
    {
        int s = (int) _lengine_slot;
        _ln_touched = (s >= 0 && s < SURROGATE_MAX_SLOTS) ? (double) surrogate_n_touched_[s] : 0.0;
    }
ENDVERBATIM
}

FUNCTION touched_overflow(engine_slot) {
    : 1 if the slot's touched list filled up since the last reset (read the whole rows then)
VERBATIM
    {
        int s = (int) _lengine_slot;
        _ltouched_overflow = (s >= 0 && s < SURROGATE_MAX_SLOTS) ? (double) surrogate_overflow_[s] : 0.0;
    }
ENDVERBATIM
}

PROCEDURE reset_touched(engine_slot) {
VERBATIM
    {
        int s = (int) _lengine_slot;
        if (s >= 0 && s < SURROGATE_MAX_SLOTS) {
            surrogate_n_touched_[s] = 0;
            surrogate_overflow_[s] = 0;
        }
    }
ENDVERBATIM
}

FUNCTION bad_events() {
    : number of events that could not be stored since the last reset_bad_events()
VERBATIM
    _lbad_events = surrogate_bad_events_;
ENDVERBATIM
}

FUNCTION last_bad_event(what) {
    : what = 0: row offset (base) of the instance that got the last bad event; 1: its channel
VERBATIM
    _llast_bad_event = surrogate_last_bad_[((int) _lwhat) == 0 ? 0 : 1];
ENDVERBATIM
}

PROCEDURE reset_bad_events() {
VERBATIM
    surrogate_bad_events_ = 0.0;
ENDVERBATIM
}
