"""Deep multitask surrogates of the Hay L5PC (Verhellen et al. 2024) and their learning machinery.

* :mod:`~lfdeep_neuron.surrogate.tcn` -- causal TCN (weight norm, dilations, residual blocks) with O(1) steps;
* :mod:`~lfdeep_neuron.surrogate.mtl` -- ``MH``, ``MMoE``, ``MMoEEx``; named configs (``paper``, ``fast``, ...);
* :mod:`~lfdeep_neuron.surrogate.stream` -- ``model.streamer(n_cells)``: one-step inference, closed loop;
* :mod:`~lfdeep_neuron.surrogate.checkpoint` -- ``save_checkpoint``, ``load_surrogate`` (validated);
* :mod:`~lfdeep_neuron.surrogate.train` -- ``lfdeep-neuron train``;
* :mod:`~lfdeep_neuron.surrogate.synthetic` -- a cheap synthetic neuron with the dataset interface (tests).

Submodules import torch; ``import lfdeep_neuron.surrogate`` alone does not.
"""
