"""A wheel built out of tree carries the NMODL and the default model (only) and works from anywhere.

The wheel is built from the checkout with the environment's own setuptools (``pip wheel
--no-build-isolation``, no network) into a temporary folder and installed with ``--no-deps
--no-index`` into a fresh virtual environment. That environment reuses the project environment's
third-party packages (torch, NEURON, NetPyNE, ...) through a ``.pth`` line naming its
site-packages -- a plain path entry, so the project's own editable install of lfdeep-neuron (a
finder hook activated by another ``.pth`` file there) is *not* active: ``lfdeep_neuron`` can only
come from the wheel, which the test asserts. Everything then runs from a folder outside the
checkout: ``lfdeep-neuron demo --quick``, a HayL5PC and a SurrogateL5PC.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent("""
    import json, sys
    import lfdeep_neuron
    from lfdeep_neuron import mechanisms
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate
    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC
    from lfdeep_neuron.hay import HayL5PC

    out = {"package": lfdeep_neuron.__file__, "mod_dir": str(mechanisms.mod_dir()),
           "checkpoint": str(bundled_checkpoint())}
    morphology = sys.argv[1] if len(sys.argv) > 1 else None
    if morphology:
        hay = HayL5PC(morphology)
        out["hay_segments"] = len(hay.segments)
    model = load_surrogate(bundled_checkpoint())
    cell = SurrogateL5PC(model)
    out["surrogate_segments"] = len(cell.engine.segments["name"])
    out["mechanisms"] = str(mechanisms.load())
    print("PROBE " + json.dumps(out))
""")


def _tree_state() -> dict:
    """What a build could leave in the checkout: build/ and *.egg-info folders (with mtimes)."""
    return {p.name: p.stat().st_mtime_ns for p in REPO.iterdir()
            if p.name == "build" or p.name.endswith(".egg-info") or p.name == "dist"}


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(venv python, venv bin, wheel path): the wheel built out of tree and installed in a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    before = _tree_state()
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp / "dist")], cwd=tmp, env=env)
    assert _tree_state() == before, "building the wheel wrote build/ or *.egg-info into the checkout"
    wheels = sorted((tmp / "dist").glob("lfdeep_neuron-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "_lfdeep_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
          str(wheels[0])], cwd=tmp, env=env)
    return py, venv, wheels[0], env


def test_wheel_carries_nmodl_and_models(wheel_env):
    _, _, wheel, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    mods = {f"lfdeep_neuron/mod/{p.name}" for p in (REPO / "mod").glob("*.mod")}
    assert mods and mods <= names, sorted(mods - names)
    default = (REPO / "models" / "DEFAULT").read_text().strip()
    # the models folder: the pointer, the card and the one checkpoint the pointer names, nothing else
    models = {n for n in names if n.startswith("lfdeep_neuron/models/") and not n.endswith(".py")}
    assert models == {f"lfdeep_neuron/models/{n}" for n in ("DEFAULT", "MODEL_CARD.md", default)}, sorted(models)
    assert [n for n in names if n.endswith(".pt")] == [f"lfdeep_neuron/models/{default}"]
    assert not any(n.startswith(("tests/", "examples/", "mod/", "models/")) for n in names)
    size = wheel.stat().st_size
    print(f"wheel {wheel.name}: {size / 1e6:.2f} MB ({size} bytes)")
    assert size <= 5_000_000, f"wheel {size} bytes > 5 MB"


def test_installed_wheel_runs_demo_and_builds_both_cells(wheel_env, tmp_path):
    py, venv, _, env = wheel_env
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert REPO not in outside.parents
    # the demo, from a folder outside the checkout, through the installed console script
    demo = _run([str(venv / "bin" / "lfdeep-neuron"), "demo", "--quick", "--out", "demo_out"],
                cwd=outside, env=env)
    assert "8 cells on 1 rank(s)" in demo.stdout and "(399 forward passes on rank 0)" in demo.stdout, demo.stdout
    n_spikes = int(demo.stdout.split(" spikes, ")[0].split()[-1])
    assert n_spikes > 0, demo.stdout                        # the quick demo shows spikes too
    assert (outside / "demo_out" / "network.npz").is_file() and (outside / "demo_out" / "demo.png").is_file()
    # both cells from the installed package
    morphology = REPO.parent / "shared" / "hay" / "cell1.asc"
    probe = outside / "probe.py"
    probe.write_text(PROBE)
    args = [str(morphology)] if morphology.is_file() else []
    proc = _run([str(py), str(probe), *args], cwd=outside, env=env)
    out = json.loads(proc.stdout.split("PROBE ", 1)[1])
    site = venv.resolve()
    for key in ("package", "mod_dir", "checkpoint"):
        assert site in Path(out[key]).resolve().parents, f"{key} {out[key]} does not come from the wheel"
    assert out["surrogate_segments"] == 642
    if not morphology.is_file():
        pytest.skip(f"SurrogateL5PC built from the wheel; HayL5PC not: Hay morphology not found at {morphology} "
                    "(third-party data, not in the repo)")
    assert out["hay_segments"] == 642


def test_bundled_checkpoint_names_where_it_looked(wheel_env, tmp_path):
    """A wheel installed without its models raises one clear error naming the folders searched."""
    py, venv, _, env = wheel_env
    models = next(venv.rglob("lfdeep_neuron/models"))
    hidden = models.with_name("models.hidden")
    models.rename(hidden)
    try:
        proc = subprocess.run([str(venv / "bin" / "lfdeep-neuron"), "demo", "--quick", "--out", "o"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        hidden.rename(models)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no bundled surrogate checkpoint" in lines[0] and str(models) in lines[0]
    assert not (tmp_path / "o").exists()
