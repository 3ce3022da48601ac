"""MPI plumbing shared by every entry point.

NEURON loads MPI dynamically. With the pip ``mpich`` wheel the library that
NEURON must load is the real ``libmpi.so.12`` inside the environment (the
wheel's ``libmpi.so`` is a stub), and NEURON only finds it through the
``MPI_LIB_NRN_PATH`` environment variable. :func:`configure_mpi_env` sets it
(if the user has not) before NEURON initialises MPI; importing
:mod:`lfdeep_neuron` calls it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _candidate_mpi_libs():
    prefixes = [Path(sys.prefix), Path(sys.base_prefix)]
    for prefix in prefixes:
        for name in ("libmpi.so.12", "libmpich.so.12", "libmpi.so.40"):
            yield prefix / "lib" / name


def configure_mpi_env() -> str | None:
    """Point NEURON at the environment's MPI library; return the path used.

    Leaves an existing ``MPI_LIB_NRN_PATH`` untouched.
    """
    if os.environ.get("MPI_LIB_NRN_PATH"):
        return os.environ["MPI_LIB_NRN_PATH"]
    for lib in _candidate_mpi_libs():
        if lib.exists():
            os.environ["MPI_LIB_NRN_PATH"] = str(lib)
            return str(lib)
    return None


def launched_under_mpi() -> bool:
    """True when this process was started by ``mpiexec``/``mpirun``."""
    return any(v in os.environ for v in _MPI_ENV_VARS)


_PC = None


def parallel_context():
    """Return NEURON's ParallelContext, initialising MPI first when under mpiexec.

    Safe to call many times; NEURON's MPI is initialised once per process.
    """
    global _PC
    if _PC is None:
        configure_mpi_env()
        from neuron import h

        if launched_under_mpi():
            h.nrnmpi_init()
        _PC = h.ParallelContext()
    return _PC


def rank_size() -> tuple[int, int]:
    """(rank, number of ranks) of NEURON's ParallelContext."""
    pc = parallel_context()
    return int(pc.id()), int(pc.nhost())
