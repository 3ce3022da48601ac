"""Shared fixtures: where the third-party Hay material lives; the scripts of ``benchmarks/`` as modules.

The Hay morphology is third-party data and is not part of the repository.
Tests find it at ``../shared/hay/cell1.asc`` (next to the checkout) or at
``$LFDEEP_HAY_MORPHOLOGY``, and skip with that reason when it is absent.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_HAY = REPO.parent / "shared" / "hay"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _morphology_path() -> Path | None:
    env = os.environ.get("LFDEEP_HAY_MORPHOLOGY")
    for cand in ([Path(env)] if env else []) + [SHARED_HAY / "cell1.asc"]:
        if cand.is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def benchmark_module():
    """``load(name)``: the script ``benchmarks/<name>.py`` imported as a module (benchmarks are not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def morphology() -> Path:
    path = _morphology_path()
    if path is None:
        pytest.skip("Hay morphology cell1.asc not found (third-party data, not in the repo): "
                    "expected at ../shared/hay/cell1.asc or $LFDEEP_HAY_MORPHOLOGY")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    d = SHARED_HAY / "reference"
    if not d.is_dir():
        pytest.skip("reference recordings not found at ../shared/hay/reference "
                    "(made by the original Hay implementation; not in the repo)")
    return d


@pytest.fixture
def cosim():
    """The co-simulation package with NEURON on a fixed 0.025-ms step; every engine closed afterwards."""
    import torch

    import lfdeep_neuron  # noqa: F401  (MPI / NEURON set-up before NEURON is imported)
    from neuron import h

    from lfdeep_neuron import cosim as module

    torch.set_num_threads(1)
    h.load_file("stdrun.hoc")
    h.dt = 0.025
    h.cvode.active(0)
    yield module
    module.SurrogateEngine.close_all()
    h.cvode.active(0)
    h.dt = 0.025


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, reference_dir):
    """An untrained tiny MMoE with the reference's tables and normalisation, saved as a checkpoint."""
    import numpy as np
    import torch

    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint
    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(0)
    rec = read_record(reference_dir / "synaptic_seed1.h5", require=("segments", "synapses", "v_1ms"))
    model = MMoE.from_config("tiny", n_segments=642, n_channels=1278)
    v = np.asarray(rec["v_1ms"], np.float64)
    model.set_normalization(v.mean(1), v.std(1))
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pt"
    save_checkpoint(path, model, segments=rec["segments"], synapses=rec["synapses"])
    return path


@pytest.fixture
def netpyne_sim():
    """NetPyNE's ``sim``, cleared afterwards (engines closed, cells and their init handlers dropped)."""
    import torch

    torch.set_num_threads(1)
    from netpyne import sim

    from lfdeep_neuron.cosim import SurrogateEngine

    yield sim
    SurrogateEngine.close_all()
    if hasattr(sim, "net"):
        sim.clearAll()
    # NetPyNE's clearAll empties the cells but keeps their FInitializeHandlers (sim.fih), whose
    # initV would then fail in any later h.finitialize of this process (other test modules).
    sim.fih = []
