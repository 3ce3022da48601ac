"""Co-simulation of deep surrogates inside NEURON networks.

* :class:`SurrogateL5PC` -- a surrogate cell with the synapse addressing of ``HayL5PC``.
* :class:`SurrogateEngine` -- one per model per process: event intake, one batched forward
  pass per surrogate step, spike emission; hands every step to its sinks (timing rule in its
  module doc).
* :class:`EngineSink` / :class:`SinkStep` -- the public interface of what consumes those steps
  (:class:`Recording`, ``lfp.PopulationLFPSink``, the NetPyNE traces); attach with
  ``engine.add_sink``.
* :func:`connect` -- a NetCon onto a surrogate synapse or a detailed cell's synapse.
* :class:`ChannelMap` -- (section, x, kind) -> channel; defined in :mod:`lfdeep_neuron.hay.channels`.
"""
from lfdeep_neuron.cosim.cell import ChannelMap, SurrogateL5PC, SurrogateSynapse, connect
from lfdeep_neuron.cosim.engine import N_CHANNELS, SurrogateEngine
from lfdeep_neuron.cosim.recording import Recording
from lfdeep_neuron.cosim.sinks import EngineSink, SinkStep

__all__ = ["SurrogateL5PC", "SurrogateSynapse", "SurrogateEngine", "ChannelMap", "Recording",
           "EngineSink", "SinkStep", "connect", "N_CHANNELS"]
