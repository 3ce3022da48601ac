"""Packaging for lfdeep-neuron.

torch is declared without an upper bound; on CPU-only machines install the
CPU wheel first (``pip install torch==2.13.0``, which the Makefile does) so
that pip never pulls the multi-GB CUDA build to satisfy this requirement.

Package data: the repository keeps the NMODL sources (``mod/``) and the
bundled surrogates (``models/``) at its top level; the build maps them into
the package as ``lfdeep_neuron/mod`` and ``lfdeep_neuron/models``
(:mod:`lfdeep_neuron.resources` finds either place). Of the checkpoints only
the default, the one ``models/DEFAULT`` names, goes into the wheel and the
sdist (a build without it fails); others in ``models/`` stay in the repository.

Out-of-tree builds: setuptools' intermediate folders (``build/``,
``*.egg-info``) go to a temporary directory that is removed when the build
process ends, so ``pip wheel .`` / ``pip install .`` / ``python -m build``
leave the source tree as it was.
"""
import atexit
import shutil
import tempfile
from pathlib import Path

from setuptools import find_packages, setup


def _default_checkpoint() -> str:
    """The file name ``models/DEFAULT`` holds (the one checkpoint the package ships)."""
    pointer = Path(__file__).resolve().parent / "models" / "DEFAULT"
    name = pointer.read_text().strip()
    if not name or "/" in name or not (pointer.parent / name).is_file():
        raise SystemExit(f"{pointer}: must name a checkpoint file in models/, got {name!r}")
    return name


_SCRATCH = tempfile.mkdtemp(prefix="lfdeep-neuron-build-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

setup(
    name="lfdeep-neuron",
    version="0.1.0",
    description=("Multitask deep-learning surrogates of the Hay L5 pyramidal cell, "
                 "co-simulated inside NEURON and NetPyNE networks"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["lfdeep_neuron", "lfdeep_neuron.*"])
    + ["lfdeep_neuron.mod", "lfdeep_neuron.models"],
    package_dir={"lfdeep_neuron.mod": "mod", "lfdeep_neuron.models": "models"},
    package_data={"lfdeep_neuron.mod": ["*.mod"],
                  "lfdeep_neuron.models": ["DEFAULT", "*.md", _default_checkpoint()],
                  "lfdeep_neuron.surrogate": ["recipes/*.toml"]},
    include_package_data=False,
    options={"build": {"build_base": f"{_SCRATCH}/build"},
             "egg_info": {"egg_base": _SCRATCH}},
    install_requires=[
        "neuron>=9.0",
        "netpyne>=1.1",
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "mpi4py>=4.0",
        "mpich>=4.0; platform_system=='Linux'",
        "lfpykit>=0.5",
        "h5py>=3.8",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={"dev": ["pytest>=8"]},
    entry_points={"console_scripts": ["lfdeep-neuron=lfdeep_neuron.cli:main"]},
)
