"""benchmarks/gpu.sh runs on a GPU machine lent for minutes: a typo in one of its commands costs a
part of that time. Every command of every part is checked here on the CPU: the paths it names
exist, each script's flags parse (its argparse parser, run up to the end of parsing), and each
test file collects."""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised in place of running a script once its command line has parsed."""


def commands(part: str) -> list[list[str]]:
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), part],
        env={**os.environ, "DRY": "1"},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def parses(script: Path, argv: list[str], monkeypatch) -> None:
    """Run `script` as __main__ with `argv` up to its first parse_args / parse_known_args."""
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []  # parse_args calls parse_known_args: only the outer call stops the script

    def stop_after(parse):
        def wrapped(self, *a, **kw):
            if inside:
                return parse(self, *a, **kw)
            inside.append(parse)
            try:
                parse(self, *a, **kw)  # bad flags exit here with argparse's message
            finally:
                inside.clear()
            raise Parsed

        return wrapped

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after(parse_args))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop_after(parse_known_args))
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(Parsed):
        runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("part", ["speed", "speed2", "arms", "train", "peer"])
def test_every_command_of_gpu_sh_names_real_files_and_parses(part, monkeypatch):
    cmds = commands(part)
    assert cmds, f"gpu.sh {part} printed no commands"
    for cmd in cmds:
        assert cmd[0] == "python3", cmd
        for arg in cmd:
            if arg.endswith((".py", ".yaml")) and not arg.startswith("/"):
                assert (ROOT / arg).is_file(), f"gpu.sh {part}: {arg} does not exist"
        if cmd[1:3] == ["-m", "pytest"]:  # the files collect and its -k selects some of their tests
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "--collect-only", *cmd[3:]],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            assert run.returncode == 0, f"gpu.sh {part}: {' '.join(cmd)}\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
            selected = re.search(r"\b[1-9]\d* tests? collected|\b[1-9]\d*/\d+ tests collected", run.stdout)
            assert selected, f"gpu.sh {part}: {' '.join(cmd)} selects no test\n{run.stdout[-500:]}"
        else:
            parses(ROOT / cmd[1], cmd[2:], monkeypatch)


def test_the_check_catches_a_misspelt_flag(monkeypatch, capsys):
    """The parse check fails on a flag the script does not have (what it is there to catch)."""
    with pytest.raises(SystemExit) as exit_:
        parses(ROOT / "benchmarks" / "train_step.py", ["--device", "cuda", "--compiled", "default"], monkeypatch)
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        parses(ROOT / "benchmarks" / "train_step.py", ["--compile-modes", "fast"], monkeypatch)
    assert "unknown fast" in capsys.readouterr().err
