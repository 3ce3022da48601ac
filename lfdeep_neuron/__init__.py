"""lfdeep-neuron: deep multitask surrogates of the Hay L5PC, co-simulated in NEURON.

Importing the package prepares MPI for NEURON (see :mod:`lfdeep_neuron.parallel`):
it points NEURON at the pip ``mpich`` library and, under ``mpiexec``, makes sure
NEURON's MPI is initialised before NetPyNE counts its hosts, whatever was
imported first. ``mpiexec -n 2 python script.py`` then just works.
"""
from lfdeep_neuron.parallel import prepare_mpi as _prepare_mpi

_prepare_mpi()

__version__ = "0.1.0"
