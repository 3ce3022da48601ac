"""The ``lfdeep-neuron`` command's help and its checkpoint arguments.

* ``lfdeep-neuron -h`` says what the tool is and lists every subcommand;
* every option of every subcommand has help text that shows its default (or says it is required, or is a
  switch); ``train -h`` is grouped (data, model, optimisation, output) and has a short usage line;
* checkpoint options take a pointer file (``models/DEFAULT``) as the checkpoint it names, and a bad path
  gives one accurate line: "does not exist", "is not a regular file", "not a readable torch checkpoint";
* ``train --data synthetic`` without ``--arch`` names the command once.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfdeep_neuron import cli

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "models" / "DEFAULT"


def _cli(*args, cwd=None):
    """(exit status, stdout, stderr) of ``lfdeep-neuron ARGS`` in a subprocess (80-column help)."""
    env = dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lfdeep_neuron.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser([name])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_top_level_help_says_what_the_tool_is_and_lists_the_commands():
    code, out, _ = _cli("--help")
    assert code == 0
    assert "The ``lfdeep-neuron`` command." not in out
    assert "surrogates of the Hay layer-5 pyramidal cell" in out and "NetPyNE" in out
    for name, (_, help_text) in cli.SUBCOMMANDS.items():
        assert f"    {name}" in out and help_text in " ".join(out.split()), name


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    sub = _subparser(name)
    assert sub.formatter_class is cli.HelpFormatter
    formatter = sub._get_formatter()
    missing = []
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        shown = formatter._get_help_string(action) if action.help else ""
        if not action.help or not action.help.strip():
            missing.append(f"{action.option_strings}: no help")
        elif not (action.nargs == 0 or action.required or "default" in shown or "required" in shown):
            missing.append(f"{action.option_strings}: no default shown")
    assert not missing, f"lfdeep-neuron {name}: {missing}"


def test_defaults_are_shown_once():
    help_text = " ".join(_subparser("evaluate").format_help().split())
    assert "(default: test)" in help_text and "(default: cpu)" in help_text
    assert help_text.count("default: 2.0") == 1 and "(default: None)" not in help_text
    train = " ".join(_subparser("train").format_help().split())
    assert "(default: 5000)" in train and "(default: None)" not in train and "(default: False)" not in train


def test_train_help_is_grouped_and_short():
    code, out, _ = _cli("train", "--help")
    assert code == 0
    print(f"train --help: {len(out.splitlines())} lines at 80 columns")
    assert out.splitlines()[0] == ("usage: lfdeep-neuron train --data DATA --out CKPT (--recipe NAME | --arch ARCH) "
                                   "[options]")
    sub = _subparser("train")
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in sub._action_groups}
    for title in ("data", "model", "optimisation", "output"):
        assert title + ":" in out and groups.get(title), title
    assert "--data" in groups["data"] and "--arch" in groups["model"] and "--lr" in groups["optimisation"]
    assert "--out" in groups["output"]
    untitled = [o for o in groups.get("options", []) if o not in ("-h", "--debug")]
    assert not untitled, f"train options outside a group: {untitled}"
    assert len(out.splitlines()) <= 150


def test_checkpoint_pointer_file_is_the_checkpoint_it_names(tmp_path):
    import torch

    from lfdeep_neuron.surrogate.checkpoint import (checkpoint_argument, load_checkpoint, load_surrogate,
                                                    resolve_checkpoint, write_spike_waveform)

    real = REPO / "models" / DEFAULT.read_text().strip()
    assert resolve_checkpoint(DEFAULT) == real and checkpoint_argument(str(DEFAULT)) == str(real)
    assert load_surrogate(DEFAULT).meta["path"] == str(real)
    # a pointer elsewhere (absolute or relative name, pointer to pointer); writing goes to the checkpoint
    (tmp_path / "m.pt").write_bytes(real.read_bytes())
    (tmp_path / "CURRENT").write_text("m.pt\n")
    (tmp_path / "ALIAS").write_text(str(tmp_path / "CURRENT"))
    assert resolve_checkpoint(tmp_path / "ALIAS") == tmp_path / "m.pt"
    write_spike_waveform(tmp_path / "CURRENT", None)
    assert (tmp_path / "CURRENT").read_text() == "m.pt\n" and "spike_waveform" not in load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(load_checkpoint(tmp_path / "m.pt")["state_dict"]["towers.b2"],
                       load_checkpoint(real)["state_dict"]["towers.b2"])
    # through the command: evaluate gets past the checkpoint and stops at the (empty) data folder
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli("evaluate", "--model", DEFAULT, "--data", empty, "--out", tmp_path / "ev", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{empty}: no simulation records" in err and "torch" not in err and "exist" not in err, err
    assert not (tmp_path / "ev").exists()


def _bad_paths(tmp_path: Path) -> list:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("just some notes, not a checkpoint\n")
    pointer = tmp_path / "DEFAULT"
    pointer.write_text("gone.pt\n")
    return [(tmp_path / "nosuch.pt", "surrogate checkpoint {p} does not exist"),
            (Path(os.devnull), "surrogate checkpoint {p} is not a regular file (a character device)"),
            (folder, "surrogate checkpoint {p} is not a regular file (a directory)"),
            (text, "{p} is not a readable torch checkpoint"),
            (pointer, "{p} names the surrogate checkpoint 'gone.pt', which does not exist")]


@pytest.mark.parametrize("command", ["evaluate", "rollout", "waveform", "train"])
def test_bad_checkpoint_paths_give_one_accurate_line(tmp_path, command):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "out"
    rest = {"evaluate": ["--data", empty, "--out", out], "rollout": ["--inputs", empty, "--out", out],
            "waveform": ["--data", empty, "--out", out],
            "train": ["--data", "synthetic", "--arch", "mh", "--config", "tiny", "--out", out, "--steps", "1"]}
    flag = "--init" if command == "train" else "--model"
    cases = _bad_paths(tmp_path)
    if command != "evaluate":            # every message once (evaluate); the others on the commonest two
        cases = [cases[1], cases[4]]
    for path, message in cases:
        code, stdout, err = _cli(command, flag, path, *rest[command])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (path, err)
        line = lines[0].replace(f" (see lfdeep-neuron {command} -h)", "")     # argparse's usage hint
        assert line.startswith(f"lfdeep-neuron {command}: error: ") and line.count("lfdeep-neuron") == 1, line
        assert message.format(p=path) in lines[0], lines[0]
        assert not out.exists()


def test_train_without_arch_names_the_command_once(tmp_path):
    code, _, err = _cli("train", "--data", "synthetic", "--out", tmp_path / "m.pt")
    assert code == 2
    assert err.strip() == "lfdeep-neuron train: error: --arch is required (or in the recipe)", err
    code, _, err = _cli("train", "--data", "synthetic", "--arch", "mh", "--out", tmp_path / "m.pt",
                        "--history-drop", "2")
    assert code == 2 and err.count("lfdeep-neuron train") == 1 and "--history-drop must be in [0, 1]" in err, err
    assert not (tmp_path / "m.pt").exists()
