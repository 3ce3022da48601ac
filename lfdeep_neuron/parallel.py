"""MPI plumbing shared by every entry point.

NEURON loads MPI dynamically. With the pip ``mpich`` wheel the library that
NEURON must load is the real ``libmpi.so.12`` inside the environment (the
wheel's ``libmpi.so`` is a stub), and NEURON only finds it through the
``MPI_LIB_NRN_PATH`` environment variable. :func:`configure_mpi_env` sets it
(if the user has not).

Finding the library is not enough: NEURON must also *initialise* MPI before
anything asks NEURON how many hosts there are. NetPyNE asks once, in
``sim.initialize()`` (``sim.nhosts``, ``sim.rank``), and keeps the answer; if
MPI is initialised only later (our engine used to do it when the first
surrogate cell was built, inside ``sim.create``), every rank has already
decided that it is rank 0 of 1 and builds every cell, and NEURON stops with
``gid=N has not been set on rank 1``. :func:`prepare_mpi` therefore runs on
``import lfdeep_neuron`` when the process was started by ``mpiexec``:

- ``neuron`` not imported yet: it sets ``NEURON_INIT_MPI=1`` (and
  ``MPI_LIB_NRN_PATH``), and NEURON initialises MPI itself when it is imported,
  whoever imports it;
- ``neuron`` already imported (``import netpyne`` or ``import neuron`` came
  first): it calls ``h.nrnmpi_init()`` at once (NEURON allows it until MPI is
  initialised; the library is found through ``MPI_LIB_NRN_PATH``, which NEURON
  reads only at that moment).

Either way MPI is up before NetPyNE's ``sim.initialize``, since a script must
import ``lfdeep_neuron`` to name ``SurrogateL5PC``. If NetPyNE has already
counted its hosts before ``lfdeep_neuron`` was imported, no fix is possible in
this process: :func:`check_netpyne_hosts` raises :class:`MPISetupError` saying
what to do.

Exit: NEURON initialises MPI but, unless the script ends with ``h.quit()``,
never finalises it. A rank that leaves Python without ``MPI_Finalize`` makes
the pip MPICH's ``mpiexec`` (hydra) kill every other rank at once: rank 0,
still writing its figures or results after the last collective call (the
usual ``if sim.rank == 0: ...`` ending of a NetPyNE script), is killed silently
(exit status 0, file missing), and a rank still completing a collective may
see the connection vanish and abort ("Please see the FAQ page"). The exit
hook :func:`finalize_mpi_at_exit` therefore calls ``MPI_Finalize`` when the
interpreter ends normally, so ``mpiexec`` waits for every rank. After an
uncaught exception it does not (finalising could wait forever for ranks
blocked in a collective): the job is torn down as before.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import sys
from pathlib import Path

__all__ = ["configure_mpi_env", "launched_under_mpi", "mpi_world_size", "prepare_mpi", "parallel_context",
           "rank_size", "check_netpyne_hosts", "finalize_mpi_at_exit", "mark_failed_exit", "MPISetupError"]

_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_SIZE_ENV_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


class MPISetupError(RuntimeError):
    """NEURON's MPI was not initialised in time; the message says what to change in the script."""


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


def mpi_world_size() -> int | None:
    """Number of ranks that ``mpiexec`` started, from its environment (None when not under mpiexec)."""
    for var in _SIZE_ENV_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def prepare_mpi() -> None:
    """Make sure NEURON initialises MPI before anyone counts the hosts (no-op outside ``mpiexec``).

    Called on ``import lfdeep_neuron``. Sets ``MPI_LIB_NRN_PATH``; then, under ``mpiexec``, either
    asks NEURON to initialise MPI on import (``NEURON_INIT_MPI=1``) or, when ``neuron`` is already
    imported, initialises it now through :func:`parallel_context`.
    """
    configure_mpi_env()
    if not launched_under_mpi():
        return
    finalize_mpi_at_exit()
    if "neuron" in sys.modules or "hoc" in sys.modules:
        parallel_context()
        check_netpyne_hosts()
    else:
        os.environ.setdefault("NEURON_INIT_MPI", "1")


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


def check_netpyne_hosts() -> None:
    """Raise :class:`MPISetupError` if NetPyNE counted its hosts before NEURON's MPI was up.

    NetPyNE keeps ``sim.nhosts`` from ``sim.initialize()``; a value that disagrees with NEURON's
    ParallelContext means every rank would build every cell. Nothing to check when NetPyNE is not
    imported or not yet initialised.
    """
    sim = sys.modules.get("netpyne.sim")
    counted = getattr(sim, "nhosts", None) if sim is not None else None
    if counted is None:
        return
    nhost = int(parallel_context().nhost())
    if int(counted) != nhost:
        raise MPISetupError(
            f"NetPyNE counted {int(counted)} host(s) but NEURON runs on {nhost} MPI ranks: NetPyNE's "
            "sim.initialize()/sim.create() ran before NEURON's MPI was initialised. Import "
            "lfdeep_neuron (or lfdeep_neuron.cosim.netpyne) before calling sim.initialize/sim.create, "
            "or start the script with NEURON_INIT_MPI=1 in the environment.")


_EXIT_HOOK = {"registered": False, "uncaught": False}


def finalize_mpi_at_exit() -> None:
    """Call ``MPI_Finalize`` when the interpreter ends normally (once; a no-op without MPI).

    Registered by :func:`prepare_mpi` under ``mpiexec``. Skipped after an uncaught exception or
    :func:`mark_failed_exit` (a finalised rank counts as done for ``mpiexec``, which would then
    wait forever for ranks blocked in a collective; exiting without it lets ``mpiexec`` tear the
    job down) and when MPI is not initialised or already finalised (``h.quit()``, mpi4py).
    A script that stops one rank on an error should raise rather than ``sys.exit(code)``, or call
    :func:`mark_failed_exit` first.
    """
    if _EXIT_HOOK["registered"]:
        return
    _EXIT_HOOK["registered"] = True
    previous = sys.excepthook

    def note_uncaught(exc_type, exc, tb):
        _EXIT_HOOK["uncaught"] = True
        previous(exc_type, exc, tb)

    sys.excepthook = note_uncaught
    atexit.register(_finalize_mpi)


def mark_failed_exit() -> None:
    """This process is ending on an error: leave MPI unfinalised so that ``mpiexec`` stops the job."""
    _EXIT_HOOK["uncaught"] = True


def _finalize_mpi() -> None:
    path = os.environ.get("MPI_LIB_NRN_PATH")
    if _EXIT_HOOK["uncaught"] or not path:
        return
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)     # the library NEURON loaded: same handle
    except OSError:
        return
    flag = ctypes.c_int(0)
    if lib.MPI_Initialized(ctypes.byref(flag)) != 0 or not flag.value:
        return
    if lib.MPI_Finalized(ctypes.byref(flag)) != 0 or flag.value:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    lib.MPI_Finalize()
