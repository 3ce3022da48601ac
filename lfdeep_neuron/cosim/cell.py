"""SurrogateL5PC: a deep-surrogate L5 pyramidal cell that sits where a HayL5PC would.

To a network it looks like a cell: it has synapses addressed by ``(section, x, kind)`` exactly
as :class:`lfdeep_neuron.hay.HayL5PC` (the segment of ``section`` that contains ``x``; kind
``'exc'`` -> AMPA+NMDA channel c, ``'inh'`` -> GABA_A channel 639 + c of dendritic segment c),
and a spike source for NetCons and ``pc.cell(gid, ...)``. Underneath it is one ``SurrogateCell``
artificial cell (``mod/SurrogateCell.mod``) that stores the weights of incoming events in the
process's intake buffer, plus a row in its :class:`~lfdeep_neuron.cosim.engine.SurrogateEngine`
batch, which advances all local instances with one forward pass per surrogate step.

Connecting
----------
A NetCon onto a surrogate carries its channel in ``weight[1]`` (``weight[0]`` = weight in units
of the reference synapse, 1 = one training-data activation). Use one of::

    syn = cell.synapse("apic[36]", 0.5, "exc")          # SurrogateSynapse(target, channel)
    nc = syn.connect(netstim, weight=1.0, delay=1.0)      # local source (hoc object)
    nc = cell.connect(source_gid, "dend[3]", 0.5, "inh")  # any rank (pc.gid_connect)
    nc = connect(source, syn_or_point_process, weight, delay)  # works for HayL5PC synapses too

or set ``nc.weight[1] = syn.channel`` yourself on ``h.NetCon(src, syn.target)``. Weights given to
these functions must be finite and >= 0 (``lfdeep_neuron.errors.InputError`` otherwise: a surrogate
was never trained on negative weights); ``allow_negative_weights=True`` is the explicit opt-in.
"""
from __future__ import annotations

import numpy as np

from lfdeep_neuron.cosim.engine import N_CHANNELS, SurrogateEngine
from lfdeep_neuron.hay.channels import KIND_TYPES, ChannelMap, section_name  # noqa: F401 (re-exported)

__all__ = ["SurrogateL5PC", "SurrogateSynapse", "ChannelMap", "connect", "check_weight", "KIND_TYPES",
           "section_name"]

class SurrogateSynapse:
    """A NetCon target on a surrogate: the artificial cell and the channel of ``weight[1]``."""

    __slots__ = ("cell", "channel", "section", "x", "kind")

    def __init__(self, cell, channel, section, x, kind):
        self.cell, self.channel, self.section, self.x, self.kind = cell, int(channel), section, x, kind

    @property
    def target(self):
        """The hoc object to give to ``h.NetCon`` / ``pc.gid_connect`` as target."""
        return self.cell.target

    def connect(self, source, weight: float = 1.0, delay: float = 1.0, threshold: float | None = None,
                allow_negative_weights: bool = False):
        """NetCon from ``source`` (hoc object, SurrogateL5PC, gid or None) onto this channel."""
        return connect(source, self, weight=weight, delay=delay, threshold=threshold,
                       allow_negative_weights=allow_negative_weights)

    def __repr__(self):
        return f"SurrogateSynapse({self.section}({self.x:g}) {self.kind} -> channel {self.channel})"


def check_weight(weight, target, allow_negative_weights: bool = False) -> float:
    """``weight`` as a float if a surrogate can take it, else ``InputError`` naming it and the target.

    A surrogate was trained on non-negative weights in units of the reference synapse: NaN and
    infinities are always refused, negative weights unless ``allow_negative_weights``.
    """
    from lfdeep_neuron.errors import InputError

    w = float(weight)
    if not np.isfinite(w):
        raise InputError(f"NetCon weight {w!r} onto {target!r} is not finite")
    if w < 0 and not allow_negative_weights:
        raise InputError(f"negative NetCon weight {w!r} onto {target!r}: the surrogate was never trained on "
                         "negative weights (use the inhibitory synapse), or pass allow_negative_weights=True")
    return w


def connect(source, target, weight: float = 1.0, delay: float = 1.0, threshold: float | None = None,
            pc=None, allow_negative_weights: bool = False):
    """A NetCon from ``source`` to a synapse of a surrogate or of a detailed cell.

    Parameters
    ----------
    source : int, hoc object, cell or None
        An int is a gid (``pc.gid_connect``: the source may live on any rank); a hoc object is a
        local event source (NetStim, artificial cell); a SurrogateL5PC or HayL5PC on this rank is
        its spike source (HayL5PC: soma(0.5) v, 0 mV threshold); None makes a NetCon driven by
        ``nc.event(t)``.
    target : SurrogateSynapse or hoc point process
        ``SurrogateL5PC.synapse(...)`` or a detailed cell's synapse (``HayL5PC.synapse(...)``).
    weight : float
        In units of the reference synapse (1 = one training-data activation). Onto a surrogate it
        must be finite and >= 0 (``InputError`` otherwise) unless ``allow_negative_weights``.
    delay : float
        ms. From a surrogate it should be ≥ the surrogate step (see the engine's timing rule).
    allow_negative_weights : bool
        Explicit opt-in for negative weights onto a surrogate (it was never trained on them).
    """
    from neuron import h

    if isinstance(target, SurrogateSynapse):
        weight = check_weight(weight, target, allow_negative_weights)
    tgt = target.target if isinstance(target, SurrogateSynapse) else target
    if isinstance(source, (int, np.integer)):
        if pc is None:
            from lfdeep_neuron.parallel import parallel_context

            pc = parallel_context()
        nc = pc.gid_connect(int(source), tgt)
    else:
        if isinstance(source, SurrogateL5PC):
            nc = h.NetCon(source.spike_source(), tgt)
        elif hasattr(source, "spike_netcon"):          # a detailed cell on this rank
            nc = source.spike_netcon(tgt)
        else:
            nc = h.NetCon(source, tgt)
    nc.weight[0] = float(weight)
    if isinstance(target, SurrogateSynapse):
        nc.weight[1] = float(target.channel)
    nc.delay = float(delay)
    if threshold is not None:
        nc.threshold = float(threshold)
    return nc


class SurrogateL5PC:
    """A deep-surrogate Hay L5PC usable wherever a detailed HayL5PC is (see module doc).

    Parameters
    ----------
    model : surrogate model or checkpoint path, optional
        Used to find the process's engine (``SurrogateEngine.get(model)``); ignored if
        ``engine`` is given.
    engine : SurrogateEngine, optional
        The engine that advances this instance. Default: ``SurrogateEngine.get(model)``.
    gid : int, optional
        Registers the instance on this rank (``pc.set_gid2node(gid, pc.id())`` and
        ``pc.cell(gid, cell.spike_netcon())``), so other cells can ``pc.gid_connect`` to it.
    position_um : 3 floats
        Translation (µm) applied after the rotation, as for HayL5PC: a point p of the model's
        segment table goes to ``R (p - soma_centre) + soma_centre + position_um``.
    rotation : None, 3 angles (rad, about x then y then z) or a 3x3 matrix
        Rotation about the soma centre (HayL5PC's convention; used by :meth:`segment_table`).
    position : alias of ``position_um``.
    """

    def __init__(self, model=None, engine=None, gid=None, position_um=None, rotation=None,
                 position=None):
        from lfdeep_neuron.hay.morphology import rotation_matrix

        if engine is None:
            engine = SurrogateEngine.get(model)
        elif model is not None and engine.model is not model:
            raise ValueError("SurrogateL5PC: model and engine disagree (engine.model is another model)")
        self.engine = engine
        h = engine.h
        self._art = h.SurrogateCell()
        self._fire = h.NetCon(None, self._art)     # engine -> net_event of this instance
        self._fire.weight[0] = 0.0
        self._fire.weight[1] = -1.0
        self._fire.delay = 1.0                     # ignored by NetCon.event(t); > 0 for NEURON threads
        self.gid = None
        if position is not None and position_um is not None:
            raise ValueError("give position_um or position, not both")
        pos = position_um if position_um is not None else position
        self.position_um = np.zeros(3) if pos is None else np.asarray(pos, np.float64)
        if self.position_um.shape != (3,):
            raise ValueError(f"position_um must be 3 numbers (µm), got {pos!r}")
        rotation_matrix(rotation)                  # validates now rather than at segment_table()
        self.rotation = rotation
        self._event_netcons, self._event_plan, self._fih = [], [], None
        self.index = engine.add_instance(self, self._art, self._fire)
        if gid is not None:
            self.register_gid(gid)

    # ---- network interface ----------------------------------------------------------------

    def register_gid(self, gid: int, pc=None):
        """``pc.set_gid2node(gid, this rank)`` and ``pc.cell(gid, spike source)``."""
        pc = pc or self.engine.pc
        gid = int(gid)
        pc.set_gid2node(gid, pc.id())
        pc.cell(gid, self.spike_netcon())
        self.gid = gid
        self.engine.set_gid(self.index, gid)

    def spike_source(self):
        """The NetCon source of this cell's spikes (the artificial cell).

        ``h.NetCon(cell.spike_source(), target, threshold, delay_ms, weight)`` as for HayL5PC
        (the threshold is ignored: spikes are events); for ``pc.cell(gid, nc)`` use
        :meth:`spike_netcon`.
        """
        return self._art

    def spike_netcon(self, target=None, *, delay_ms: float = 1.0, weight: float = 0.0):
        """A NetCon from this cell's spikes to ``target`` (None: for ``pc.cell`` / recording)."""
        return self.engine.h.NetCon(self._art, target, 0.0, float(delay_ms), float(weight))

    @property
    def target(self):
        """The artificial cell receiving every channel's events (NetCon target)."""
        return self._art

    def synapse(self, section, x=0.5, kind="exc") -> SurrogateSynapse:
        """Target handle for the synapse of ``kind`` on the segment of ``section`` containing x."""
        ch = self.engine.channel_map.channel(section, x, kind)
        return SurrogateSynapse(self, ch, section_name(section), float(x), kind)

    def connect(self, source, section, x=0.5, kind="exc", weight: float = 1.0, delay: float = 1.0,
                threshold: float | None = None, allow_negative_weights: bool = False):
        """NetCon from ``source`` (gid, hoc object, SurrogateL5PC, None) to ``synapse(section, x, kind)``."""
        return connect(source, self.synapse(section, x, kind), weight=weight, delay=delay,
                       threshold=threshold, pc=self.engine.pc, allow_negative_weights=allow_negative_weights)

    def channel_target(self, channel: int) -> SurrogateSynapse:
        """Target handle for a raw channel number (0..1277)."""
        channel = int(channel)
        if not 0 <= channel < N_CHANNELS:
            raise ValueError(f"channel must lie in [0, {N_CHANNELS}), got {channel}")
        return SurrogateSynapse(self, channel, "?", float("nan"), "exc" if channel < N_CHANNELS // 2 else "inh")

    # ---- input events (as HayL5PC.set_input_events) ---------------------------------------

    def set_input_events(self, syn_idx, t_ms, weights=None) -> None:
        """Queue input events on the channels at every run's initialisation, as ``HayL5PC`` does.

        Replaces any previous events. Each event is delivered at exactly ``t_ms`` by a NetCon onto this
        instance (channel in ``weight[1]``), queued by a type-1 FInitializeHandler; the engine's timing
        rule then bins it (an event at integer ms k is consumed by step k). Drive a surrogate and a
        detailed cell with the same list (e.g. ``draw_inputs(...).effective_syn_idx / effective_t_ms``)
        and they receive the same input.

        Parameters
        ----------
        syn_idx : int array [E]
            Channels 0..n_channels-1 of the model.
        t_ms : float array [E]
            Event times (ms, >= 0).
        weights : float array [E] or scalar, optional
            Weights in units of the reference synapse (default 1; finite, >= 0).
        """
        import weakref

        from lfdeep_neuron.data.inputs import events_by_channel

        h = self.engine.h
        plan = events_by_channel(syn_idx, t_ms, weights, N_CHANNELS)
        self._event_netcons, self._event_plan = [], []
        for c, weight, times in plan:
            nc = h.NetCon(None, self._art)
            nc.delay = 1.0                           # NetCon.event(t) delivers at t whatever the delay
            nc.weight[0] = check_weight(weight, self)
            nc.weight[1] = float(c)
            self._event_netcons.append(nc)
            self._event_plan.append((nc, times))
        if self._fih is None:
            ref = weakref.ref(self)

            def queue():
                cell = ref()
                if cell is not None:
                    for nc, times in cell._event_plan:
                        for t in times:
                            nc.event(t)
            self._fih = h.FInitializeHandler(1, queue)

    def clear_input_events(self) -> None:
        """Remove all queued input events."""
        self._event_netcons, self._event_plan = [], []

    # ---- geometry -------------------------------------------------------------------------

    def segment_table(self) -> dict:
        """The model's segment table with xyz placed by ``position_um`` and ``rotation`` (µm)."""
        from lfdeep_neuron.hay.morphology import place_points

        table = self.engine.segments
        if table is None:
            raise ValueError("the model carries no segment table (model.meta['segments'])")
        out = dict(table)
        soma = np.asarray(table["xyz_mid"], np.float64)[0]
        for key in ("xyz_start", "xyz_mid", "xyz_end"):
            if key in table:
                out[key] = place_points(table[key], soma, self.position_um, self.rotation)
        return out

    def __repr__(self):
        return f"SurrogateL5PC(gid={self.gid}, index={self.index}, engine={self.engine!r})"
