"""Segment and channel tables of the Hay L5PC: (section, x, kind) -> input channel, pure numpy.

:class:`ChannelMap` answers, from a segment table and a channel table (the ``segments/`` and
``synapses/`` groups of a record, or ``model.meta``), which canonical segment holds (section, x)
and which of the 1278 input channels is its excitatory or inhibitory synapse. It needs no NEURON
and serves the detailed cell's addressing to the surrogate (``SurrogateL5PC.synapse``), the
recordings' segment names and the NetPyNE glue. (``lfdeep_neuron.cosim.ChannelMap`` is the same
class.)

Section names are canonical (``'soma[0]'``, ``'dend[3]'``, ``'apic[36]'``, ``'axon[1]'``);
:func:`section_name` also accepts NEURON sections, ``'HayL5PC[0].apic[36]'``, ``('apic', 36)``,
the bare ``'soma'`` and the names NetPyNE gives the sections of an imported Hay template
(``'apic_36'``, ``'soma_0'``).
"""
from __future__ import annotations

import re

import numpy as np

from lfdeep_neuron.errors import InputError
from lfdeep_neuron.hay.cell import N_CHANNELS

__all__ = ["ChannelMap", "section_name", "kind_type", "KIND_TYPES", "SECTION_KINDS"]

#: Section types of the cell, in canonical order.
SECTION_KINDS = ("soma", "dend", "apic", "axon")

#: Synapse kinds accepted by ``synapse()`` and the channel type they map to (0 exc, 1 inh).
KIND_TYPES = {
    "exc": 0, "excitatory": 0, "e": 0, "ampa": 0, "ampanmda": 0, "ampa_nmda": 0, "ampanmdasyn": 0,
    "inh": 1, "inhibitory": 1, "i": 1, "gaba": 1, "gabaa": 1, "gaba_a": 1, "gabaasyn": 1,
}

_SECTION_RE = re.compile(r"(soma|dend|apic|axon)\[(\d+)\]$")
_IMPORTED_RE = re.compile(r"^(soma|dend|apic|axon)_(\d+)$")   # NetPyNE's names of imported template sections


def kind_type(kind) -> int:
    """0 (excitatory) or 1 (inhibitory) for a synapse kind (``'exc'``, ``'inh'``, 0, 1 or a key of KIND_TYPES)."""
    if isinstance(kind, (int, np.integer)) and int(kind) in (0, 1):
        return int(kind)
    key = str(kind).strip().lower()
    if key not in KIND_TYPES:
        raise InputError(f"unknown synapse kind {kind!r}: use 'exc' (AMPA+NMDA) or 'inh' (GABA_A)")
    return KIND_TYPES[key]


def section_name(section) -> str:
    """Canonical name (``'apic[36]'``) of a section given as name, bytes, tuple or NEURON Section.

    A cell prefix (``'HayL5PC[0].apic[36]'``) is dropped; ``'soma'`` means ``'soma[0]'``; NetPyNE's
    names of an imported template's sections (``'apic_36'``) mean ``'apic[36]'``.
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
    imported = _IMPORTED_RE.match(name)
    if imported:
        name = f"{imported.group(1)}[{imported.group(2)}]"
    if name in ("soma", "axon", "dend", "apic"):
        name = f"{name}[0]"
    m = _SECTION_RE.search(name)
    if m is None:
        raise InputError(f"section {section!r} is not a Hay L5PC section name "
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
            raise InputError(f"channel table has channels outside [0, {N_CHANNELS})")
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
            raise InputError(f"the L5PC has no section {name!r}")
        if x is None:
            if len(segs) != 1:
                raise InputError(f"{name} has {len(segs)} segments: give x")
            return int(segs[0])
        x = float(x)
        if not 0.0 <= x <= 1.0:
            raise InputError(f"x must lie in [0, 1], got {x}")
        j = min(int(x * len(segs)), len(segs) - 1)
        return int(segs[j])

    def channel(self, section, x, kind) -> int:
        """Input channel (0..1277) of the synapse of ``kind`` on the segment containing x."""
        seg = self.segment(section, x)
        ch = int(self._channel[seg, kind_type(kind)])
        if ch < 0:
            raise InputError(
                f"no synaptic input channel on {self.segment_names[seg]} (segment {seg}): the "
                "surrogate's 1278 channels are on the 639 basal and apical segments only")
        return ch
