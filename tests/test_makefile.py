"""The Makefile's set-up rules on a stock system: a half-made .venv is replaced, not reused,
and an active environment is told before it is changed. Stub Pythons stand in for the real
ones (no network, no install)."""
import os
import shutil
import stat
import subprocess

from conftest import ROOT

# A stand-in for `python3` and for .venv/bin/python: `-m venv DIR` makes DIR/bin/python (this
# same script), `-m pip ...` succeeds and is logged, anything else fails.
STUB = """#!/bin/sh
echo "$0 $*" >> "$STUB_LOG"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
if [ "$1 $2" = "-m pip" ]; then exit 0; fi
exit 1
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def make(folder, *targets, **env):
    clean = {"PATH": f"{folder / 'bin'}:/usr/bin:/bin", "HOME": str(folder), "STUB_LOG": str(folder / "log"),
             **env}
    return subprocess.run(["make", "--no-print-directory", *targets], cwd=folder, env=clean,
                          capture_output=True, text=True, timeout=60)


def project(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "python3", STUB)
    return tmp_path


def test_a_venv_without_pip_is_made_again(tmp_path):
    folder = project(tmp_path)
    # what `python3 -m venv` leaves where python3-venv is missing: a python, no pip
    (folder / ".venv" / "bin").mkdir(parents=True)
    executable(folder / ".venv" / "bin" / "python", "#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    done = make(folder, "install")
    assert done.returncode == 0, done.stderr
    assert "no working pip" in done.stderr and done.stderr.count("\n") == 1
    log = (folder / "log").read_text()
    assert "-m venv .venv" in log and "-m pip install --quiet --requirement requirements.txt" in log
    assert (folder / ".venv" / "installed").exists()
    # a working .venv is kept: the second run neither remakes nor reinstalls
    os.remove(folder / "log")
    again = make(folder, "install")
    assert again.returncode == 0 and not (folder / "log").exists()


def test_a_failed_venv_leaves_nothing_behind(tmp_path):
    folder = project(tmp_path)
    executable(folder / "bin" / "python3", "#!/bin/sh\nmkdir -p .venv/bin && touch .venv/bin/python && exit 1\n")
    done = make(folder, "install")
    assert done.returncode == 2 and "python3-venv" in done.stderr
    assert not (folder / ".venv").exists()


def test_an_active_environment_is_told_before_it_is_changed(tmp_path):
    folder = project(tmp_path)
    executable(folder / "bin" / "python", STUB)
    done = make(folder, "install", VIRTUAL_ENV=str(tmp_path / "env"))
    assert done.returncode == 0
    assert done.stderr.startswith("note: installing requirements.txt into the active environment")
    assert "-m pip install" in (folder / "log").read_text()
