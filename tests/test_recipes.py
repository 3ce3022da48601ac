"""Recipes as a base plus overrides: every bundled recipe resolves to the settings it had as a full copy."""
from __future__ import annotations

import json
import tomllib
import subprocess
import sys
from pathlib import Path

import pytest

from lfdeep_neuron.errors import InputError
from lfdeep_neuron.surrogate.train import RECIPES_DIR, load_recipe, merge_recipe, parse_args

FIXTURE = Path(__file__).resolve().parent / "data" / "recipes_resolved.json"
DATA = "synthetic:segments=4,sims=4,duration=600,seed=3"


def _resolved(name: str) -> dict:
    options, model, _ = load_recipe(name)
    return {**options, "model": model}


def test_every_bundled_recipe_resolves_to_its_recorded_settings():
    """tests/data/recipes_resolved.json: each recipe's dict as loaded before recipes could name a base."""
    expected = json.loads(FIXTURE.read_text())
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert names == sorted(expected), "a bundled recipe was added or removed: record its settings in the fixture"
    for name in names:
        assert json.dumps(_resolved(name), sort_keys=True) == json.dumps(expected[name], sort_keys=True), name


def test_bundled_recipes_state_only_what_differs():
    """Every recipe but the two roots names a base and repeats none of its base's resolved values."""
    roots = set()
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        if "base" not in raw:
            roots.add(path.stem)
            continue
        base = _resolved(raw.pop("base"))
        for key, value in raw.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    assert base.get(key, {}).get(k, object()) != v, f"{path.name}: [{key}] {k} repeats its base"
            else:
                assert base.get(key, object()) != value, f"{path.name}: {key} repeats its base"
    assert roots == {"spike_lstm_mh", "spike_lstm_mmoe"}


def test_merge_is_deep_and_overrides_win():
    base = {"a": 1, "model": {"channels": [64], "spike_history": True}, "b": [1, 2]}
    over = {"a": 2, "model": {"channels": [128], "dropout": 0.2}, "b": [3]}
    assert merge_recipe(base, over) == {"a": 2, "b": [3],
                                        "model": {"channels": [128], "spike_history": True, "dropout": 0.2}}
    assert base["model"] == {"channels": [64], "spike_history": True}          # inputs left as they were


def test_user_recipe_on_a_bundled_or_local_base(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "spike_lstm_mh_history_128_16k_own"\nsteps = 10\n[model]\ndropout = 0.1\n')
    args = parse_args(["--recipe", str(mine), "--data", DATA, "--out", "x.pt"])
    assert args.steps == 10 and args.history_own_threshold == -1.62 and args.recipe == str(mine)
    assert args.model == {"channels": [128], "spike_history": True, "dropout": 0.1}
    # a base in the recipe's own folder comes before a bundled one of the same name; flags still win
    (tmp_path / "spike_lstm_mh.toml").write_text('arch = "mmoe"\nsteps = 5\n')
    mine.write_text('base = "spike_lstm_mh"\nlr = 0.5\n')
    args = parse_args(["--recipe", str(mine), "--data", DATA, "--out", "x.pt", "--steps", "3"])
    assert (args.arch, args.steps, args.lr, args.model) == ("mmoe", 3, 0.5, {})


def test_bad_bases_are_one_line_errors_naming_the_files(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('base = "b"\nsteps = 3\n')
    b.write_text('base = "a.toml"\narch = "mh"\n')
    with pytest.raises(InputError) as err:
        parse_args(["--recipe", str(a), "--data", DATA, "--out", "x.pt"])
    msg = str(err.value)
    assert "\n" not in msg and "cycle" in msg and str(a) in msg and str(b) in msg, msg
    a.write_text('base = "a"\n')
    with pytest.raises(InputError, match=r"a.toml: recipe bases form a cycle \(a.toml -> a.toml"):
        parse_args(["--recipe", str(a), "--data", DATA, "--out", "x.pt"])
    a.write_text('base = "nosuch"\n')
    with pytest.raises(InputError, match=r"a.toml: base recipe 'nosuch' not found"):
        parse_args(["--recipe", str(a), "--data", DATA, "--out", "x.pt"])
    a.write_text('base = 3\n')
    with pytest.raises(InputError, match=r"a.toml: 'base' must be the name of another recipe"):
        parse_args(["--recipe", str(a), "--data", DATA, "--out", "x.pt"])
    # an unknown key is reported in the file that holds it, base or not
    a.write_text('base = "b"\n')
    b.write_text('arch = "mh"\nstpes = 3\n')
    with pytest.raises(InputError, match=r"b.toml: unknown recipe keys \['stpes'\]"):
        parse_args(["--recipe", str(a), "--data", DATA, "--out", "x.pt"])
    # through the command: one line, exit 2
    b.write_text('base = "a"\n')
    proc = subprocess.run([sys.executable, "-m", "lfdeep_neuron.cli", "train", "--recipe", str(a), "--data", DATA,
                           "--out", str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "cycle" in proc.stderr
    assert not (tmp_path / "o.pt").exists()
