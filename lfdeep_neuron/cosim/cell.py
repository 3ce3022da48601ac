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

or set ``nc.weight[1] = syn.channel`` yourself on ``h.NetCon(src, syn.target)``.
"""
from __future__ import annotations

import re

import numpy as np

from lfdeep_neuron.cosim.engine import N_CHANNELS, SurrogateEngine

__all__ = ["SurrogateL5PC", "SurrogateSynapse", "ChannelMap", "connect", "KIND_TYPES"]

#: Synapse kinds accepted by ``synapse()`` and the channel type they map to (0 exc, 1 inh).
KIND_TYPES = {
    "exc": 0, "excitatory": 0, "e": 0, "ampa": 0, "ampanmda": 0, "ampa_nmda": 0, "ampanmdasyn": 0,
    "inh": 1, "inhibitory": 1, "i": 1, "gaba": 1, "gabaa": 1, "gaba_a": 1, "gabaasyn": 1,
}

_SECTION_RE = re.compile(r"(soma|dend|apic|axon)\[(\d+)\]$")


def _kind_type(kind) -> int:
    if isinstance(kind, (int, np.integer)) and int(kind) in (0, 1):
        return int(kind)
    key = str(kind).strip().lower()
    if key not in KIND_TYPES:
        raise ValueError(f"unknown synapse kind {kind!r}: use 'exc' (AMPA+NMDA) or 'inh' (GABA_A)")
    return KIND_TYPES[key]


def section_name(section) -> str:
    """Canonical name (``'apic[36]'``) of a section given as name, bytes, tuple or NEURON Section.

    A cell prefix (``'HayL5PC[0].apic[36]'``) is dropped; ``'soma'`` means ``'soma[0]'``.
    """
    if isinstance(section, tuple) and len(section) == 2:
        return f"{section[0]}[{int(section[1])}]"
    if isinstance(section, bytes):
        section = section.decode()
    if not isinstance(section, str):
        name = getattr(section, "name", None)
        if name is None:
            raise TypeError(f"section must be a name like 'apic[36]', a (type, index) tuple or a "
                            f"NEURON Section, not {type(section).__name__}")
        section = name() if callable(name) else str(name)
    name = section.strip()
    if name in ("soma", "axon", "dend", "apic"):
        name = f"{name}[0]"
    m = _SECTION_RE.search(name)
    if m is None:
        raise ValueError(f"section {section!r} is not a Hay L5PC section name "
                         "(soma[i], dend[i], apic[i], axon[i])")
    return m.group(0)


class ChannelMap:
    """(section, x, kind) -> input channel, from a segment table and a channel table.

    Parameters
    ----------
    segments : dict of arrays
        ``name`` (section name per segment, canonical order) and ``x`` (segment centre).
    synapses : dict of arrays
        ``syn_idx`` (channel), ``seg_idx`` (segment index) and ``type`` (0 exc, 1 inh).
    """

    def __init__(self, segments, synapses):
        names = np.asarray(segments["name"]).astype(str)
        x = np.asarray(segments["x"], np.float64)
        self.n_segments = len(names)
        self._sections: dict[str, np.ndarray] = {}
        order = np.lexsort((x, names))
        uniq, first = np.unique(names[order], return_index=True)
        for name, chunk in zip(uniq, np.split(order, first[1:])):
            self._sections[str(name)] = chunk          # segment indices of the section, by x
        self._channel = np.full((self.n_segments, 2), -1, np.int64)
        syn_idx = np.asarray(synapses["syn_idx"], np.int64)
        seg_idx = np.asarray(synapses["seg_idx"], np.int64)
        typ = np.asarray(synapses["type"], np.int64)
        if syn_idx.min() < 0 or syn_idx.max() >= N_CHANNELS:
            raise ValueError(f"channel table has channels outside [0, {N_CHANNELS})")
        order = np.argsort(-syn_idx, kind="stable")     # if channels share a site, the lowest wins
        self._channel[seg_idx[order], typ[order]] = syn_idx[order]
        self.segment_names = names

    @staticmethod
    def segment_of(table, section, x=None) -> int:
        """Index of the segment of ``section`` containing ``x`` in a segment table."""
        return ChannelMap(table, {"syn_idx": np.zeros(1, int), "seg_idx": np.zeros(1, int),
                                  "type": np.zeros(1, int)}).segment(section, x)

    def sections(self) -> list[str]:
        return sorted(self._sections)

    def segment(self, section, x=None) -> int:
        """Canonical index of the segment of ``section`` that contains ``x`` (0 <= x <= 1).

        ``x`` may be omitted for a section with one segment. The rule is HayL5PC's
        (``min(int(x * nseg), nseg - 1)``): x = 0 and x = 1 give the first and last segment.
        """
        name = section_name(section)
        segs = self._sections.get(name)
        if segs is None:
            raise ValueError(f"the surrogate's cell has no section {name!r}")
        if x is None:
            if len(segs) != 1:
                raise ValueError(f"{name} has {len(segs)} segments: give x")
            return int(segs[0])
        x = float(x)
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"x must lie in [0, 1], got {x}")
        j = min(int(x * len(segs)), len(segs) - 1)
        return int(segs[j])

    def channel(self, section, x, kind) -> int:
        """Input channel (0..1277) of the synapse of ``kind`` on the segment containing x."""
        seg = self.segment(section, x)
        ch = int(self._channel[seg, _kind_type(kind)])
        if ch < 0:
            raise ValueError(
                f"no synaptic input channel on {self.segment_names[seg]} (segment {seg}): the "
                "surrogate's 1278 channels are on the 639 basal and apical segments only")
        return ch


class SurrogateSynapse:
    """A NetCon target on a surrogate: the artificial cell and the channel of ``weight[1]``."""

    __slots__ = ("cell", "channel", "section", "x", "kind")

    def __init__(self, cell, channel, section, x, kind):
        self.cell, self.channel, self.section, self.x, self.kind = cell, int(channel), section, x, kind

    @property
    def target(self):
        """The hoc object to give to ``h.NetCon`` / ``pc.gid_connect`` as target."""
        return self.cell._art

    def connect(self, source, weight: float = 1.0, delay: float = 1.0, threshold: float | None = None):
        """NetCon from ``source`` (hoc object, SurrogateL5PC, gid or None) onto this channel."""
        return connect(source, self, weight=weight, delay=delay, threshold=threshold)

    def __repr__(self):
        return f"SurrogateSynapse({self.section}({self.x:g}) {self.kind} -> channel {self.channel})"


def connect(source, target, weight: float = 1.0, delay: float = 1.0, threshold: float | None = None,
            pc=None):
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
        In units of the reference synapse (1 = one training-data activation).
    delay : float
        ms. From a surrogate it should be ≥ the surrogate step (see the engine's timing rule).
    """
    from neuron import h

    tgt = target.target if isinstance(target, SurrogateSynapse) else target
    if isinstance(source, (int, np.integer)):
        if pc is None:
            from lfdeep_neuron.parallel import parallel_context

            pc = parallel_context()
        nc = pc.gid_connect(int(source), tgt)
    else:
        if isinstance(source, SurrogateL5PC):
            nc = h.NetCon(source._art, tgt)
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
        self.index = engine._register(self, self._art, self._fire)
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
        self.engine._gids[self.index] = gid

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
                threshold: float | None = None):
        """NetCon from ``source`` (gid, hoc object, SurrogateL5PC, None) to ``synapse(section, x, kind)``."""
        return connect(source, self.synapse(section, x, kind), weight=weight, delay=delay,
                       threshold=threshold, pc=self.engine.pc)

    def channel_target(self, channel: int) -> SurrogateSynapse:
        """Target handle for a raw channel number (0..1277)."""
        channel = int(channel)
        if not 0 <= channel < N_CHANNELS:
            raise ValueError(f"channel must lie in [0, {N_CHANNELS}), got {channel}")
        return SurrogateSynapse(self, channel, "?", float("nan"), "exc" if channel < N_CHANNELS // 2 else "inh")

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
