"""Ground-truth data: simulation records, input generators, parallel generation, torch datasets.

* :mod:`~lfdeep_neuron.data.records` — one simulation per HDF5 file (the reference layout);
* :mod:`~lfdeep_neuron.data.inputs` — the published inhomogeneous-Poisson generator and simple protocols;
* :mod:`~lfdeep_neuron.data.simulate` — ``lfdeep-neuron generate``: parallel, resumable generation;
* :mod:`~lfdeep_neuron.data.dataset` — :class:`SimulationDataset`, training sequences for PyTorch.

Submodules are imported on use (NEURON and torch are not imported by ``import lfdeep_neuron.data``).
"""
from lfdeep_neuron.data.records import (  # noqa: F401  (light: numpy + h5py only)
    Record,
    RecordFormatError,
    open_record,
    read_record,
    validate_record,
    write_record,
)
