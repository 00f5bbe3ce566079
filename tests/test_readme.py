"""The README's commands and the Makefile's recipes: each one parses with its script's own
parser, and no two recipes write into the same run folder or prepared-data folder; the
README's Python snippet runs."""
import contextlib
import io
import re
import shlex
import subprocess

import pytest

import bench
import demo
import evaluate
import prepare_data
import train
from test_video import write_video
from conftest import ROOT

PARSERS = {"prepare_data.py": prepare_data.parse_args, "train.py": train.parse_args,
           "evaluate.py": evaluate.parse_args, "demo.py": demo.parse_args, "bench.py": bench.parse_args}


def readme_commands():
    """Every `python SCRIPT.py ...` or `torchrun ... train.py ...` command in the README's code
    blocks, continuation lines joined and comments dropped -> [(script, argv, torchrun argv)]."""
    text = (ROOT / "README.md").read_text()
    # the Python snippets are code, not command lines
    blocks = [block for language, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S)
              if language != "python"]
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, word in enumerate(words) if word in PARSERS]
            if not scripts or words[0] not in ("python", "torchrun"):
                continue
            at = scripts[0]
            commands.append((words[at], words[at + 1:], words[1:at] if words[0] == "torchrun" else None))
    return commands


def makefile_commands(*targets):
    """The `python SCRIPT.py ...` commands that `make -n -B TARGET` prints -> [(script, argv)]."""
    printed = subprocess.run(["make", "--no-print-directory", "-n", "-B", *targets, "PYTHON=python", "FER=fer2013",
                              "TEXTS=emotions.txt", "GOEMOTIONS=train.tsv"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    commands = []
    for line in printed.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        # the shell's ; || && end one command and start the next
        for word in [*lexer, ";"]:
            if word not in (";", "||", "&&"):
                words.append(word)
                continue
            if words[:1] == ["do"]:
                words = words[1:]
            if len(words) > 1 and words[0] == "python" and words[1] in PARSERS:
                commands.append((words[1], words[2:]))
            words = []
    return commands


@pytest.mark.parametrize("script, argv", makefile_commands("fer", "fer-goemotions", "quickstart"),
                         ids=lambda value: " ".join(value) if isinstance(value, list) else str(value))
def test_each_makefile_recipe_command_parses(script, argv):
    PARSERS[script](argv)


def test_the_fer_recipe_trains_each_run_once_and_scores_it():
    runs = [train.parse_args(argv)[0].run_name for script, argv in makefile_commands("fer") if script == "train.py"]
    assert len(runs) == len(set(runs)) == 9
    scoring = subprocess.run(["make", "-n", "fer-eval", "PYTHON=python"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert all(re.search(rf"\b{run}\b", scoring) for run in runs)


def test_the_readme_has_commands_for_every_script():
    assert {script for script, _, _ in readme_commands()} == set(PARSERS)


@pytest.mark.parametrize("script, argv, launcher", readme_commands(),
                         ids=lambda value: " ".join(value) if isinstance(value, list) else str(value))
def test_each_readme_command_parses(script, argv, launcher):
    PARSERS[script](argv)
    if launcher is not None:
        from torch.distributed.run import get_args_parser
        get_args_parser().parse_args([*launcher, "train.py", *argv])


def test_no_two_readme_recipes_write_the_same_folder():
    runs = []
    prepared = []
    for script, argv, launcher in readme_commands():
        # the other nodes of one torchrun job (--node_rank 1, 2, ...) write nothing: node 0 writes the run
        node = launcher[launcher.index("--node_rank") + 1] if launcher and "--node_rank" in launcher else "0"
        if script == "train.py" and "--resume" not in argv and node == "0":
            args, _ = train.parse_args(argv)
            runs.append((args.out, args.run_name))
        if script == "prepare_data.py":
            args, _ = prepare_data.parse_args(argv)
            prepared.append(args.out)
    assert runs and len(runs) == len(set(runs)), runs
    assert prepared and len(prepared) == len(set(prepared)), prepared


def test_the_python_snippet_runs(runs, tmp_path, monkeypatch):
    # where a clone has them: its runs under checkpoints/ and the test photo under tests/
    section = (ROOT / "README.md").read_text().split("## The Python API and batch mode")[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").symlink_to(runs)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    # the video it names: two seconds of two faces, and a line in the second half
    write_video(tmp_path / "talk.mp4", seconds=2)
    (tmp_path / "talk.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nso proud of you\n")
    printed = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(printed):
        exec(snippet, scope)
    result, results = scope["result"], scope["results"]
    assert printed.getvalue().startswith(result.label) and len(result.faces) == 1
    assert [r.inputs for r in results] == [["image"], ["text"]]
    frames = printed.getvalue().splitlines()[1:]
    assert len(frames) == 10 and frames[-1].startswith("1.8 so proud of you [(1, '"), frames
