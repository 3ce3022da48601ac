"""Compile and load the project's NMODL mechanisms (``mod/*.mod``).

The mod files are compiled once with ``nrnivmodl`` into a cache directory
keyed by the SHA-256 of their contents (and of the NEURON version), so an
edited mod file gets a fresh build and an unchanged one is never rebuilt.
Concurrent processes (``mpiexec`` ranks, worker pools, pytest-xdist) are safe:
the first takes an exclusive file lock and builds into a temporary directory
that is renamed into place when complete; the others wait on the lock and
then load the finished build.

Cache location: ``$LFDEEP_CACHE_DIR/mechanisms`` or
``~/.cache/lfdeep_neuron/mechanisms``.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["mod_dir", "mod_hash", "cache_root", "build", "load", "coreneuron_mod_files"]

_LOADED: Path | None = None


class MechanismBuildError(RuntimeError):
    """nrnivmodl failed; the message carries its output."""


def mod_dir() -> Path:
    """The directory holding the project's ``*.mod`` files.

    ``$LFDEEP_MOD_DIR`` overrides; otherwise the NMODL installed with the package
    (``lfdeep_neuron/mod``, from a wheel or ``pip install .``), else ``mod/`` of the
    checkout (editable install).
    """
    from lfdeep_neuron import resources

    env = os.environ.get("LFDEEP_MOD_DIR")
    if env:
        d = Path(env)
        if not d.is_dir() or not list(d.glob("*.mod")):
            raise FileNotFoundError(f"no NMODL files (*.mod) in {d} ($LFDEEP_MOD_DIR)")
        return d
    d = resources.find("mod", "*.mod")
    if d is None:
        looked = " and ".join(str(c) for c in resources.candidates("mod"))
        raise FileNotFoundError(
            f"no NMODL files (*.mod) found in {looked}: the lfdeep-neuron installation is incomplete "
            "(reinstall it, or set LFDEEP_MOD_DIR to a folder with the .mod files)")
    return d


def mod_hash(directory: Path | None = None, files=None) -> str:
    """SHA-256 (16 hex digits) over the names and contents of the mod files (or of ``files``)."""
    import neuron

    directory = directory or mod_dir()
    digest = hashlib.sha256()
    digest.update(f"neuron={neuron.__version__};arch={platform.machine()}".encode())
    for f in sorted(directory.glob("*.mod") if files is None else files):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("LFDEEP_CACHE_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "lfdeep_neuron"
    return root / "mechanisms"


def _library_in(build_dir: Path) -> Path | None:
    hits = sorted(build_dir.glob("*/.libs/libnrnmech.so")) + sorted(build_dir.glob("*/libnrnmech.so"))
    return hits[0] if hits else None


def _nrnivmodl() -> str:
    """NEURON's ``nrnivmodl``: next to this interpreter, else in the environment that holds the
    ``neuron`` package (``<prefix>/bin``: an environment layered on another one), else on PATH."""
    import importlib.util

    candidates = [Path(sys.executable).parent / "nrnivmodl"]
    spec = importlib.util.find_spec("neuron")
    if spec is not None and spec.origin:
        # <prefix>/lib/pythonX.Y/site-packages/neuron/__init__.py -> <prefix>/bin/nrnivmodl
        candidates.append(Path(spec.origin).resolve().parents[4] / "bin" / "nrnivmodl")
    for exe in candidates:
        if exe.is_file():
            return str(exe)
    found = shutil.which("nrnivmodl")
    if not found:
        raise MechanismBuildError("nrnivmodl not found next to "
                                  f"{sys.executable}, in {candidates[-1].parent} or on PATH: "
                                  "is NEURON installed in this environment?")
    return found


def coreneuron_mod_files(directory: Path | None = None) -> list[Path]:
    """The mod files that also compile for CoreNEURON: those without VERBATIM blocks.

    These are the Hay channels, calcium dynamics and synapses (all a detailed cell needs); the
    co-simulation intake ``SurrogateCell`` and ``VecStim`` use VERBATIM C and are NEURON-only.
    """
    directory = directory or mod_dir()
    return sorted(f for f in directory.glob("*.mod") if "VERBATIM" not in f.read_text())


def build(directory: Path | None = None, quiet: bool = True, coreneuron: bool = False) -> Path:
    """Compile the mod files if needed; return the build directory.

    Holds an exclusive lock on ``<cache>/<hash>.lock`` while building, so only
    one process compiles and the others wait for it. With ``coreneuron=True``
    the files of :func:`coreneuron_mod_files` are compiled with
    ``nrnivmodl -coreneuron`` (both NEURON's and CoreNEURON's libraries; a
    few minutes) into a cache entry of their own.
    """
    directory = directory or mod_dir()
    if coreneuron:   # keyed by the files it compiles: editing a NEURON-only mod file does not rebuild it
        key = mod_hash(directory, coreneuron_mod_files(directory)) + "-coreneuron"
    else:
        key = mod_hash(directory)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if _library_in(target):
        return target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _library_in(target):          # another process built it meanwhile
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp", dir=root))
            files = coreneuron_mod_files(directory) if coreneuron else directory.glob("*.mod")
            for f in files:
                shutil.copy2(f, tmp / f.name)
            cmd = [_nrnivmodl(), "-coreneuron", "."] if coreneuron else [_nrnivmodl()]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0 or not _library_in(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                raise MechanismBuildError(
                    f"nrnivmodl failed in {directory} (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            if not quiet:
                print(proc.stdout)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def load(coreneuron: bool = False) -> Path:
    """Build if necessary and load the mechanisms into this process, once.

    Returns the build directory. Calling it again is a no-op. If mechanisms of
    the same names were already loaded from elsewhere, NEURON would refuse a
    second registration; this function therefore loads exactly one build per
    process. ``coreneuron=True`` loads the CoreNEURON build instead (the Hay
    cell only, see :func:`coreneuron_mod_files`) and points CoreNEURON at its
    library (``CORENEURONLIB``); it must come before anything else loads
    mechanisms, and later plain ``load()`` calls return it.
    """
    global _LOADED
    if _LOADED is not None:
        if coreneuron and not str(_LOADED).endswith("-coreneuron"):
            raise MechanismBuildError(
                f"mechanisms were already loaded from {_LOADED} (NEURON-only build); load the "
                "CoreNEURON build first, before any cell is made, in a fresh process")
        return _LOADED
    target = build(coreneuron=coreneuron)
    from neuron import h

    lib = _library_in(target)
    if coreneuron:
        core = sorted(target.glob("*/libcorenrnmech.so"))
        if not core:
            raise MechanismBuildError(f"no libcorenrnmech.so in the CoreNEURON build {target}")
        os.environ["CORENEURONLIB"] = str(core[0])
    if not h.nrn_load_dll(str(lib)):
        raise MechanismBuildError(f"NEURON could not load {lib}")
    _LOADED = target
    return target
