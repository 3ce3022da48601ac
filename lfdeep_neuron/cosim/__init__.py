"""Co-simulation of deep surrogates inside NEURON networks.

* :class:`SurrogateL5PC` -- a surrogate cell with the synapse addressing of ``HayL5PC``.
* :class:`SurrogateEngine` -- one per model per process: event intake, one batched forward
  pass per surrogate step, spike emission, recordings (timing rule in its module doc).
* :func:`connect` -- a NetCon onto a surrogate synapse or a detailed cell's synapse.
"""
from lfdeep_neuron.cosim.cell import ChannelMap, SurrogateL5PC, SurrogateSynapse, connect
from lfdeep_neuron.cosim.engine import N_CHANNELS, SurrogateEngine
from lfdeep_neuron.cosim.recording import Recording

__all__ = ["SurrogateL5PC", "SurrogateSynapse", "SurrogateEngine", "ChannelMap", "Recording",
           "connect", "N_CHANNELS"]
