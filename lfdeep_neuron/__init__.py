"""lfdeep-neuron: deep multitask surrogates of the Hay L5PC, co-simulated in NEURON.

Importing the package prepares MPI for NEURON (see :mod:`lfdeep_neuron.parallel`)
so that ``mpiexec -n 2 python script.py`` works with the pip ``mpich`` wheel.
"""
from lfdeep_neuron.parallel import configure_mpi_env as _configure_mpi_env

_configure_mpi_env()

__version__ = "0.1.0"
