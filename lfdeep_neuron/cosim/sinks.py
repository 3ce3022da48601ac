"""The public sink interface of :class:`~lfdeep_neuron.cosim.engine.SurrogateEngine`.

A *sink* receives the engine's batched predictions while NEURON runs: recordings
(:class:`~lfdeep_neuron.cosim.recording.Recording`), the population LFP
(:class:`~lfdeep_neuron.lfp.PopulationLFPSink`) and NetPyNE's voltage traces all implement
:class:`EngineSink` and are attached with :meth:`SurrogateEngine.add_sink`.

Lifecycle
---------
1. ``engine.add_sink(sink)``: the engine keeps a *weak* reference (whoever made the sink owns it;
   a sink that is no longer referenced is dropped).
2. At every ``finitialize`` the engine calls ``rows = sink.reset(engine)``. The sink returns the
   local instance indices (rows of the engine's batch, ``SurrogateL5PC.index``) whose data it wants,
   in the order it wants them, or ``None`` for all local instances in row order.
3. Every step k = 0, 1, 2, ... (sample 0 is the initial state at t0, see the engine's timing rule):
   first, if ``sink.wants_inputs``, ``sink.append_inputs(inputs)``; then ``sink.append(step)``.

What a step hands over (:class:`SinkStep`; rows = the rows the sink asked for, n = their number)::

    k            int                  step index (0: the initial state, no forward pass)
    t_ms         float                t0 + k·Δ (ms): the time the voltages are sampled at
    v_mV         tensor [n, S]        voltage of every segment at t_ms (mV, point samples)
    spike_logit  tensor [n]           somatic spike logit of the step (NaN at k = 0)
    imem_nA      tensor [n, S] | None bin-mean membrane current of every segment over (t_ms - Δ, t_ms]
                                      (nA; models with current tasks only, zeros at k = 0)
    spiked       bool ndarray [n]     which rows emitted a spike at this step

    inputs       float64 ndarray [n, 1278] (append_inputs): channel sums the step consumes
                                      (reference-synapse weight units; at k = 0 the events cleared
                                      at t0 and not fed)

Tensors live on the engine's device in the engine's dtype and are valid only during the call
(the engine may reuse them): a sink that keeps them must copy (``.clone()``, ``.cpu()``). S is
the number of segments in the canonical order of the model's segment table.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["EngineSink", "SinkStep"]


@dataclass(frozen=True)
class SinkStep:
    """One step of the engine as one sink sees it (its rows only; layout in the module doc).

    Attributes
    ----------
    k : int
        Step index; 0 is the initial state at t0.
    t_ms : float
        Sample time t0 + k·Δ (ms).
    v_mV : torch.Tensor [n, S]
        Voltages of every segment at ``t_ms`` (mV).
    spike_logit : torch.Tensor [n]
        Somatic spike logit (NaN at k = 0).
    imem_nA : torch.Tensor [n, S] or None
        Bin-mean membrane currents over (t_ms - Δ, t_ms] (nA), for models with current tasks.
    spiked : numpy.ndarray of bool [n]
        Rows that emitted a spike at this step.
    """

    k: int
    t_ms: float
    v_mV: Any
    spike_logit: Any
    imem_nA: Any
    spiked: np.ndarray


class EngineSink(ABC):
    """What a :class:`~lfdeep_neuron.cosim.engine.SurrogateEngine` hands data to every step.

    Subclasses implement :meth:`reset` and :meth:`append`; set ``wants_inputs = True`` and
    override :meth:`append_inputs` to also receive the channel sums each step consumes.
    """

    #: Whether the engine should call :meth:`append_inputs` (a [n, 1278] copy per step).
    wants_inputs: bool = False

    @abstractmethod
    def reset(self, engine) -> Sequence[int] | None:
        """Called at every ``finitialize``: forget old samples; return the rows wanted.

        Parameters
        ----------
        engine : SurrogateEngine
            The engine calling (its ``n_local``, ``gids``, ``device``, ``segments``,
            ``step_time(k)`` are valid at this point).

        Returns
        -------
        rows : sequence of int or None
            Local instance indices (``SurrogateL5PC.index``) in the order the sink wants their
            data, or None for all local instances in row order.
        """

    def append_inputs(self, inputs: np.ndarray) -> None:
        """Channel sums float64 [n, 1278] the step is about to consume (only if ``wants_inputs``)."""

    @abstractmethod
    def append(self, step: SinkStep) -> None:
        """One step's data for the sink's rows (see :class:`SinkStep`; copy what you keep)."""
