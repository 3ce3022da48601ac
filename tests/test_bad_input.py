"""Bad input, everywhere the same: one line on stderr naming the file and the problem, exit 2, nothing left.

Every case runs the real ``lfdeep-neuron`` command in a subprocess on a small bad input (missing or
garbage morphology, a text file given as HDF5, an HDF5 file of the wrong layout, random bytes or a
truncated copy as checkpoint, an empty data folder, zero or negative sizes) and asserts: exit status
2; stderr is exactly one line, ``lfdeep-neuron <command>: error: ...``, naming the file (or option)
and the problem; no traceback; and the output the command would have written does not exist. The
last cases go through the Python API of SurrogateL5PC and the NetPyNE glue (unknown section,
negative weight) and expect :class:`lfdeep_neuron.errors.InputError` naming the section / weight.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_HAY = REPO.parent / "shared" / "hay"
REFERENCE = SHARED_HAY / "reference" / "synaptic_seed1.h5"
MORPHOLOGY = SHARED_HAY / "cell1.asc"


def _bundled() -> Path:
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint

    return bundled_checkpoint()


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """The bad inputs (and a few good ones to pair them with), made once."""
    import h5py

    d = tmp_path_factory.mktemp("bad_inputs")
    files = {"dir": d, "missing_asc": d / "no_such_cell.asc", "garbage_asc": d / "garbage.asc",
             "text_h5": d / "notes.h5", "layout_h5": d / "wrong_layout.h5", "random_pt": d / "random.pt",
             "truncated_pt": d / "truncated.pt", "empty_dir": d / "empty_data"}
    files["garbage_asc"].write_text("this is not a morphology\n(1 2 3\n")
    files["text_h5"].write_text("just some text, not HDF5\n")
    with h5py.File(files["layout_h5"], "w") as f:
        f["something_else"] = [1.0, 2.0, 3.0]
    files["random_pt"].write_bytes(os.urandom(4096))
    data = _bundled().read_bytes()
    files["truncated_pt"].write_bytes(data[: len(data) // 2])
    files["empty_dir"].mkdir()
    files["partial_dir"] = d / "partial_data"          # a folder holding simulation 0 only
    files["partial_dir"].mkdir()
    if REFERENCE.is_file():
        (files["partial_dir"] / "sim_000000.h5").symlink_to(REFERENCE)
    return files


def _need(path: Path, what: str) -> None:
    if not path.is_file():
        pytest.skip(f"{what} not found at {path} (third-party Hay data, not in the repo)")


# (id, argv builder, words the one line must contain (a tuple: any of them), output that must not exist, needs)
# argv builders get (bad files, output folder) and return the argument list after `lfdeep-neuron`.
CASES = [
    ("replay-missing-morphology",
     lambda b, o: ["replay", "--morphology", b["missing_asc"], "--inputs", REFERENCE, "--out", o / "r.h5"],
     ["no_such_cell.asc", "does not exist"], "r.h5", ("reference",)),
    ("replay-garbage-morphology",
     lambda b, o: ["replay", "--morphology", b["garbage_asc"], "--inputs", REFERENCE, "--out", o / "r.h5"],
     ["garbage.asc"], "r.h5", ("reference",)),
    ("generate-missing-morphology",
     lambda b, o: ["generate", "--morphology", b["missing_asc"], "--out", o / "ds", "--n-sims", "1",
                   "--duration-ms", "10", "--no-progress"],
     ["no_such_cell.asc"], "ds", ()),
    ("generate-garbage-morphology",
     lambda b, o: ["generate", "--morphology", b["garbage_asc"], "--out", o / "ds", "--n-sims", "1",
                   "--duration-ms", "10", "--no-progress"],
     ["garbage.asc"], "ds", ()),
    ("replay-text-as-hdf5",
     lambda b, o: ["replay", "--morphology", MORPHOLOGY, "--inputs", b["text_h5"], "--out", o / "r.h5"],
     ["notes.h5", "HDF5"], "r.h5", ("morphology",)),
    ("compare-text-as-hdf5",
     lambda b, o: ["compare", "--pred", b["text_h5"], "--true", REFERENCE, "--json", o / "c.json"],
     ["notes.h5", "HDF5"], "c.json", ("reference",)),
    ("rollout-text-as-hdf5",
     lambda b, o: ["rollout", "--model", _bundled(), "--inputs", b["text_h5"], "--out", o / "r.h5"],
     ["notes.h5", "HDF5"], "r.h5", ()),
    ("replay-wrong-layout",
     lambda b, o: ["replay", "--morphology", MORPHOLOGY, "--inputs", b["layout_h5"], "--out", o / "r.h5"],
     ["wrong_layout.h5"], "r.h5", ("morphology",)),
    ("compare-wrong-layout",
     lambda b, o: ["compare", "--pred", REFERENCE, "--true", b["layout_h5"], "--json", o / "c.json"],
     ["wrong_layout.h5", "layout"], "c.json", ("reference",)),
    ("rollout-wrong-layout",
     lambda b, o: ["rollout", "--model", _bundled(), "--inputs", b["layout_h5"], "--out", o / "r.h5"],
     ["wrong_layout.h5"], "r.h5", ()),
    ("rollout-random-checkpoint",
     lambda b, o: ["rollout", "--model", b["random_pt"], "--inputs", REFERENCE, "--out", o / "r.h5"],
     ["random.pt", "not a readable torch checkpoint"], "r.h5", ("reference",)),
    ("rollout-truncated-checkpoint",
     lambda b, o: ["rollout", "--model", b["truncated_pt"], "--inputs", REFERENCE, "--out", o / "r.h5"],
     ["truncated.pt", "corrupt or truncated"], "r.h5", ("reference",)),
    ("evaluate-random-checkpoint",
     lambda b, o: ["evaluate", "--model", b["random_pt"], "--data", b["empty_dir"], "--out", o / "ev",
                   "--no-progress"],
     ["random.pt", "not a readable torch checkpoint"], "ev", ()),
    ("evaluate-truncated-checkpoint",
     lambda b, o: ["evaluate", "--model", b["truncated_pt"], "--data", b["empty_dir"], "--out", o / "ev",
                   "--no-progress"],
     ["truncated.pt", "corrupt or truncated"], "ev", ()),
    ("evaluate-empty-data",
     lambda b, o: ["evaluate", "--model", _bundled(), "--data", b["empty_dir"], "--out", o / "ev", "--no-progress"],
     ["empty_data"], "ev", ()),
    ("train-empty-data",
     lambda b, o: ["train", "--data", b["empty_dir"], "--arch", "mh", "--config", "tiny", "--out", o / "t" / "m.pt",
                   "--steps", "1"],
     ["empty_data"], "t", ()),
    ("train-first-beyond-the-folder",
     lambda b, o: ["train", "--data", f"{b['partial_dir']}:first=3", "--arch", "mh", "--config", "tiny",
                   "--out", o / "t" / "m.pt", "--steps", "1"],
     ["partial_data:first=3: only 1 of its simulations 0..2"], "t", ("reference",)),
    ("train-zero-threads",
     lambda b, o: ["train", "--data", b["empty_dir"], "--arch", "mh", "--config", "tiny", "--out", o / "t" / "m.pt",
                   "--threads", "0"],
     ["--threads", "0"], "t", ()),
    ("generate-zero-sims",
     lambda b, o: ["generate", "--morphology", MORPHOLOGY, "--out", o / "ds", "--n-sims", "0",
                   "--duration-ms", "10", "--no-progress"],
     [("n-sims", "n_sims"), "0"], "ds", ("morphology",)),
    ("generate-negative-duration",
     lambda b, o: ["generate", "--morphology", MORPHOLOGY, "--out", o / "ds", "--n-sims", "1",
                   "--duration-ms", "-5", "--no-progress"],
     ["duration", "-5"], "ds", ("morphology",)),
    ("rollout-negative-duration",
     lambda b, o: ["rollout", "--model", _bundled(), "--inputs", REFERENCE, "--out", o / "r.h5",
                   "--duration-ms", "-5"],
     ["duration", "-5"], "r.h5", ("reference",)),
    ("demo-zero-cells",
     lambda b, o: ["demo", "--n-cells", "0", "--out", o / "demo"],
     ["--n-cells", "0"], "demo", ()),
]


def _lfdeep(args, cwd, timeout_s: float = 90.0):
    """Run ``lfdeep-neuron ARGS``; a command that does not stop on bad input within ``timeout_s`` fails
    (and its whole process group, worker processes included, is killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LFDEEP_HAY_MORPHOLOGY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lfdeep_neuron.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"lfdeep-neuron {args[0]} did not stop within {timeout_s:g} s on bad input; stderr tail:\n"
                    f"{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input_one_line_exit_2_nothing_left(case, bad, tmp_path):
    name, argv, words, output, needs = case
    if "reference" in needs:
        _need(REFERENCE, "reference record")
    if "morphology" in needs:
        _need(MORPHOLOGY, "Hay morphology")
    out = tmp_path / "out"
    out.mkdir()
    args = argv(bad, out)
    proc = _lfdeep(args, cwd=tmp_path)
    command = args[0]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith(f"lfdeep-neuron {command}: error: "), lines[0]
    for word in words:                      # a tuple: any of its spellings
        spellings = word if isinstance(word, tuple) else (word,)
        assert any(w in lines[0] for w in spellings), f"{word!r} not in: {lines[0]}"
    assert not (out / output).exists(), f"{name} left {out / output} behind"
    assert sorted(p.name for p in out.iterdir()) == [], f"{name} left {sorted(out.iterdir())}"


def test_debug_flag_shows_the_traceback(bad, tmp_path):
    args = ["rollout", "--model", bad["random_pt"], "--inputs", bad["text_h5"], "--out", tmp_path / "r.h5"]
    for argv in (["--debug", *args], [*args, "--debug"]):
        proc = _lfdeep(argv, cwd=tmp_path)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-2000:]
        assert "CorruptCheckpointError" in proc.stderr
    assert not (tmp_path / "r.h5").exists()


# ---------------------------------------------------------------------------------------------
# Python API: SurrogateL5PC and the NetPyNE glue (in a subprocess: a fresh NEURON and NetPyNE)
# ---------------------------------------------------------------------------------------------

API_PROBE = textwrap.dedent("""
    import json, sys
    from lfdeep_neuron.errors import InputError
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate

    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = {"raised": None}
        except Exception as exc:
            results[name] = {"raised": type(exc).__name__, "input_error": isinstance(exc, InputError),
                             "message": str(exc)}

    ckpt = bundled_checkpoint()
    case = sys.argv[1]
    if case == "cell":
        from neuron import h
        from lfdeep_neuron.cosim import SurrogateL5PC, connect

        cell = SurrogateL5PC(load_surrogate(ckpt))
        stim = h.NetStim()
        attempt("unknown-section", lambda: cell.synapse("apic[999]", 0.5, "exc"))
        attempt("negative-weight", lambda: connect(stim, cell.synapse("apic[36]", 0.5, "exc"), weight=-1.5))
    else:
        from netpyne import sim, specs
        from lfdeep_neuron.cosim.netpyne import add_syn_mechs, surrogate_cell_params

        def network(sec, weight):
            net = specs.NetParams()
            net.cellParams["L5PC"] = surrogate_cell_params(ckpt)
            add_syn_mechs(net)
            net.popParams["L5"] = {"cellType": "L5PC", "numCells": 1}
            net.popParams["bkg"] = {"cellModel": "NetStim", "numCells": 1, "rate": 10, "noise": 0.0}
            net.connParams["bkg->L5"] = {"preConds": {"pop": "bkg"}, "postConds": {"pop": "L5"},
                                         "sec": sec, "loc": 0.5, "synMech": "exc", "weight": weight,
                                         "delay": 1.0}
            cfg = specs.SimConfig()
            cfg.duration = 5
            cfg.verbose = False
            sim.create(netParams=net, simConfig=cfg)

        attempt(case, lambda: network("apic[999]", 1.0) if case == "unknown-section" else network("apic[36]", -1.5))
    print("RESULTS " + json.dumps(results))
""")

API_CASES = [
    ("cell", "unknown-section", ["apic[999]"]),
    ("cell", "negative-weight", ["-1.5", "weight"]),
    ("unknown-section", "unknown-section", ["apic[999]"]),
    ("negative-weight", "negative-weight", ["-1.5", "weight"]),
]


@pytest.fixture(scope="module")
def api_results(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("api")
    probe = d / "probe.py"
    probe.write_text(API_PROBE)
    out = {}
    for mode in ("cell", "unknown-section", "negative-weight"):
        proc = subprocess.run([sys.executable, str(probe), mode], cwd=d, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert "RESULTS " in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
        out[mode] = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    return out


@pytest.mark.parametrize("mode,name,words", API_CASES,
                         ids=[("SurrogateL5PC-" if m == "cell" else "netpyne-") + n for m, n, _ in API_CASES])
def test_python_api_bad_input_raises_input_error(api_results, mode, name, words):
    res = api_results[mode][name]
    assert res["raised"] is not None, f"{mode}/{name}: accepted without a word"
    assert res["input_error"], f"{mode}/{name}: raised {res['raised']}, not an InputError: {res['message']}"
    for word in words:
        assert word in res["message"], f"{word!r} not in: {res['message']}"
