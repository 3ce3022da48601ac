"""The detailed Hay L5PC (NEURON): :class:`HayL5PC`, its runner :func:`run_cell`, the ``replay`` CLI.

>>> from lfdeep_neuron.hay import HayL5PC, run_cell
>>> cell = HayL5PC("shared/hay/cell1.asc")                   # or $LFDEEP_HAY_MORPHOLOGY
>>> cell.set_input_events([0, 700], [10.0, 12.0])           # channel 0: exc of dend[0]; 700: inh
>>> out = run_cell(cell, 50.0)                              # CVODE atol 1e-3, as the references
>>> out["v_1ms"].shape
(642, 50)
"""
from lfdeep_neuron.hay.cell import (
    N_CHANNELS,
    N_DENDRITIC_SEGMENTS,
    N_SEGMENTS,
    SPIKE_THRESHOLD_MV,
    HayL5PC,
)
from lfdeep_neuron.hay.channels import ChannelMap, section_name
from lfdeep_neuron.hay.morphology import MorphologyError, place_points, rotation_matrix
from lfdeep_neuron.hay.simulate import run_cell

__all__ = ["HayL5PC", "run_cell", "ChannelMap", "section_name", "MorphologyError", "N_SEGMENTS",
           "N_DENDRITIC_SEGMENTS", "N_CHANNELS", "SPIKE_THRESHOLD_MV", "place_points", "rotation_matrix"]
