"""Every command the README, docs/ and the launchers' usage lines show runs as written.

Fast checks, on the text: each documented command's flags exist in that script's parser (argparse,
train.py's jsonargparse with dotted flags, or the shell script's option list), and each relative
path it names exists in the repository or was written by an earlier command on the same page.
The slow check runs docs/first_hour.md's workflow on a small quickstart's outputs, with stderr free
of prompts, tracebacks and warnings a user cannot act on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import ROOT
from test_quickstart import SMALL  # docs/first_hour.md's small version: the suite's shrunken quickstart

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USAGE_FILES = [ROOT / "generate.py", *sorted((ROOT / "shells").glob("*.sh"))]

# Flags of train.py reached only through its --config YAML or jsonargparse's own handling.
JSONARGPARSE_BUILTIN = {"--help", "-h", "--config", "--print_config"}
# Outputs that a command writes, by flag: a later path under one of them "follows from" that step.
OUTPUT_FLAGS = ("--save_name", "--out_dir", "--output_dir", "--dataset_save_dir", "--save_path", "--save_dir")
# Placeholders the docs use for what the reader brings (their own data, models, runs on a cluster).
PLACEHOLDER = re.compile(r"\$|<|\.\.\.|path/to|^/|^~|[*?{]")


def ansi_c_unquoted(line: str) -> str:
    """bash's $'...' strings (the prompts with a newline) rewritten as plain shell quoting."""
    return re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                  lambda m: shlex.quote(m.group(1).encode().decode("unicode_escape")), line)


def complete(command: str) -> bool:
    """No quote left open (a `python -c "..."` spans several lines) and no continuation pending."""
    try:
        shlex.split(ansi_c_unquoted(command), comments=True)
    except ValueError:
        return False
    return not command.rstrip().endswith("\\")


def fenced_commands(page: Path) -> list[str]:
    """The shell commands of a page's ```bash blocks: continuation lines joined, one per entry."""
    commands, block = [], None
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() == "```bash" else None
            continue
        if block is not None:
            block.append(line)
            joined = "\n".join(block)
            if complete(joined):
                block = []
                joined = re.sub(r"\\\n\s*", " ", joined).strip()
                if joined and not joined.startswith("#"):
                    commands.append(joined)
    return commands


def usage_commands(path: Path) -> list[str]:
    """Example commands in a script's header comments/docstring (`#   bash shells/...`, `    python ...`)."""
    text = path.read_text()
    if path.suffix == ".py":
        text = text.split('"""')[1] if text.startswith('"""') else ""
        lines = [line.strip() for line in text.splitlines()]
    else:
        header = text.split("\nset -euo pipefail", 1)[0]
        lines = [line[1:].strip() for line in header.splitlines() if line.startswith("#")]
    commands, parts = [], []
    for line in lines:
        if parts or re.match(r"(bash shells/|python \S+\.py )", line):
            parts.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                commands.append(" ".join(parts))
                parts = []
    return [c for c in commands if "[" not in c.split(" ", 2)[-1][:1]]  # synopsis lines ([OPTIONS]) are not examples


def split_commands(line: str) -> list[list[str]]:
    """One documented line -> its simple commands as argv lists (&&, ;, | and & separate them)."""
    lexer = shlex.shlex(ansi_c_unquoted(line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    argvs, argv = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            argvs.append(argv)
            argv = []
        else:
            argv.append(token)
    argvs.append(argv)
    return [a for a in argvs if a]


class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


@cache
def argparse_flags(script: str) -> frozenset[str]:
    """The option strings of a Python script's parser: its main() is run until it parses."""
    import jsonargparse

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"doc_checked_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    saved = {cls: (cls.parse_args, cls.parse_known_args) for cls in (argparse.ArgumentParser, jsonargparse.ArgumentParser)}
    sys.path.insert(0, str(path.parent))  # as `python bench/x.py` has it: bench scripts import bench/_common.py
    try:
        for cls in saved:
            cls.parse_args = cls.parse_known_args = capture
        spec.loader.exec_module(module)
        entry = getattr(module, "main", None) or module.parse_args
        entry([])
    except _Parser as captured:
        parser = captured.parser
    else:
        raise AssertionError(f"{script}: main([]) returned without parsing arguments")
    finally:
        sys.path.remove(str(path.parent))
        for cls, (parse, parse_known) in saved.items():
            cls.parse_args, cls.parse_known_args = parse, parse_known
    flags = set(parser._option_string_actions)
    if isinstance(parser, jsonargparse.ArgumentParser):
        flags |= JSONARGPARSE_BUILTIN
    return frozenset(flags)


@cache
def shell_options(script: str) -> frozenset[str]:
    """The options a shell script's `case` patterns accept (`--name) ...`, `-h|--help) ...`);
    an experiment launcher (tinyllama.sh, ...) takes _submit.sh's and --list."""
    text = (ROOT / script).read_text()
    if "experiments_main" in text:
        return shell_options("shells/_submit.sh") | {"--list", "--help", "-h"}
    patterns = re.findall(r"^\s*(-[-\w]+(?:\s*\|\s*-[-\w]+)*)\)", text, flags=re.M)
    return frozenset(o.strip() for pattern in patterns for o in pattern.split("|"))


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("-") and a not in ("-", "--")]


def check_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(script, [unknown flags]) for a python/bash command of this repository; (None, []) otherwise."""
    if argv[0] in ("source", "cp", "cd", "export", "kill", "CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"):
        argv = argv[1:] if argv[0].startswith("CUDA_") else []
    if not argv:
        return None, []
    program = Path(argv[0]).name
    if program in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        script, args = argv[1], argv[2:]
        known = argparse_flags(script)
        return script, [f for f in flags_of(args) if f not in known]
    if program == "bash" and len(argv) > 1 and argv[1].startswith("shells/"):
        script, args = argv[1], argv[2:]
        if script == "shells/generate.sh":  # MODEL_DIR PROMPT, then generate.py's flags
            return script, check_command(["python", "generate.py", *args[2:]])[1]
        if "--" in args:  # launcher options, then the job's own flags (train.py's, or a command)
            after = args[args.index("--") + 1:]
            args = args[: args.index("--")]
            extra = after if after and after[0].startswith("-") else []
            unknown = [f for f in flags_of(extra) if f not in argparse_flags("train.py")]
            if after and not after[0].startswith("-"):
                unknown += check_command(after)[1]
        else:
            unknown = []
        known = shell_options(script)
        return script, unknown + [f for f in flags_of(args) if f not in known]
    return None, []


def documented_commands() -> list[tuple[str, str]]:
    found = [(page.relative_to(ROOT).as_posix(), line) for page in DOC_PAGES for line in fenced_commands(page)]
    found += [(path.relative_to(ROOT).as_posix(), line) for path in USAGE_FILES for line in usage_commands(path)]
    return found


def test_documented_flags_exist_in_the_scripts_parsers():
    checked, problems = 0, []
    for where, line in documented_commands():
        for argv in split_commands(line):
            script, unknown = check_command(argv)
            if script is None:
                continue
            checked += 1
            if not (ROOT / script).is_file():
                problems.append(f"{where}: {script} does not exist: {line}")
            elif unknown:
                problems.append(f"{where}: {script} has no {', '.join(unknown)}: {line}")
    assert checked >= 40, f"only {checked} documented commands found: did the extraction break?"
    assert not problems, "\n".join(problems)


def is_local_path(value: str) -> bool:
    """A relative path of this repository's layout; not a placeholder, a URL or a Hub id (owner/name)."""
    if "/" not in value or PLACEHOLDER.search(value) or not re.fullmatch(r"[\w.\-/]+", value):
        return False
    first = value.split("/")[0]
    hub_id = value.count("/") == 1 and not (ROOT / first).exists() and first not in ("runs", "models", "data")
    return not hub_id


def path_tokens(argv: list[str]) -> list[str]:
    """Relative paths a command names, as arguments or flag values."""
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a for a in argv[1:]]
    return [v.rstrip("/") for v in values if is_local_path(v)]


def outputs_of(argv: list[str]) -> list[str]:
    """What a documented command writes (relative paths), for the paths later commands name."""
    outs, args = [], argv[1:]
    if args[:1] == ["-c"] and len(args) > 1:  # inline Python: the relative paths it writes to, quoted
        return re.findall(r"'(runs/[\w./-]+)'", args[1])
    for i, a in enumerate(args):
        flag, _, value = a.partition("=")
        if flag in OUTPUT_FLAGS:
            outs.append(value or (args[i + 1] if i + 1 < len(args) else ""))
    named = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
    if "--out_path" in named:  # train.py writes OUT_PATH/RUN_NAME (and so creates OUT_PATH)
        outs += [named["--out_path"], f"{named['--out_path']}/{named.get('--run_name', '')}"]
    if args and args[0] == "shells/quickstart.sh":
        outs.append(args[1] if len(args) > 1 else "runs/quickstart")
    return [o.rstrip("/") for o in outs if o]


# Pages whose examples name the reader's own inputs (downloaded bases, a cluster's data folders):
# those relative roots are where the page's earlier steps (or the reader) put them.
READER_INPUTS = ("models/", "data/", "outputs/", "downloaded_run", "figs", "plots", "split.png", "mix.yaml", "runs.json")


def test_documented_paths_exist_or_follow_from_an_earlier_step():
    problems = []
    # Every page may build on the README's steps (the quickstart's runs/quickstart above all).
    from_readme = [out for line in fenced_commands(ROOT / "README.md") for argv in split_commands(line)
                   for out in outputs_of(argv)]
    assert "runs/quickstart" in from_readme
    for page in DOC_PAGES:
        written: list[str] = list(from_readme)
        for line in fenced_commands(page):
            for argv in split_commands(line):
                if Path(argv[0]).name not in ("python", "python3", "bash"):
                    continue
                outputs = outputs_of(argv)
                for path in path_tokens(argv):
                    if (ROOT / path).exists() or path in outputs or path.startswith(READER_INPUTS):
                        continue
                    if any(path == w or path.startswith(w + "/") for w in written):
                        continue
                    problems.append(f"{page.relative_to(ROOT)}: {path} neither exists nor follows from an earlier "
                                    f"command on the page: {line}")
                written += outputs
    assert not problems, "\n".join(problems)


def test_first_hour_page_is_linked_and_starts_from_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/first_hour.md)" in readme
    commands = fenced_commands(ROOT / "docs" / "first_hour.md")
    assert any("bash shells/quickstart.sh" in c for c in commands)
    scripts = [check_command(argv)[0] for c in commands for argv in split_commands(c)]
    for stage in ("convert_pretrained_model/convert.py", "train.py", "multi_recurrence_eval.py", "shells/eval.sh",
                  "generate.py", "shells/generate.sh", "plot_evals.py"):
        assert stage in scripts, stage


# What a command's stderr must never show: a question waiting for an answer, a crash, or a warning
# the user can do nothing about (Python warnings, dynamo graph breaks, transformers' type mismatch).
# lm-eval's own WARNING lines name settings the user chose (--limit, num_fewshot) and are allowed.
UNACTIONABLE = [r"\[y/N\]", r"Traceback \(most recent call last\)", r"\b[A-Z]\w*Warning: ", r"Graph break",
                r"You are using a model of type"]



@pytest.mark.slow  # the quickstart, then every stage of the page through bash: several minutes
@pytest.mark.timeout(2400)  # more than pytest.ini's 600 s: a busy 2-core machine takes 10-20 minutes
def test_first_hour_commands_run_as_written(tmp_path):
    """docs/first_hour.md's commands, as written, in a copy of the repository whose runs/quickstart is
    a shrunken quickstart's output (rows of 64 tokens, so --max_length=128 becomes 64 there)."""
    work = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info", "figs")
    shutil.copytree(ROOT, work, ignore=ignore, symlinks=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **SMALL, "PYTHON": sys.executable, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(work), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    env.pop("OMP_WAIT_POLICY", None)  # the scripts set it themselves
    commands = fenced_commands(work / "docs" / "first_hour.md")
    setup = [c for c in commands if c.startswith(("python3 -m venv", "source "))]
    assert len(setup) == 2  # the venv (this test's interpreter stands in for it)
    for command in commands:
        if command in setup:
            continue
        # The shrunken quickstart packs 64-token rows; the page trains on the full one's 128.
        command = command.replace("--max_length=128", "--max_length=64")
        run = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=900)
        assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        bad = [line for line in run.stderr.splitlines() if any(re.search(p, line) for p in UNACTIONABLE)]
        assert not bad, f"{command}\nstderr:\n" + "\n".join(bad)
    plots = work / "runs" / "first_hour" / "plots"
    assert {p.name for p in plots.glob("*.png")} == {f"quickstart_gsm8k_cot_sean_vs_{x}.png" for x in ("num_rec", "chkpt", "FLOPs")}


def test_launchers_share_one_interpreter_rule(tmp_path):
    """PYTHON if set, else the repository's .venv/bin/python, else python3: the same for every
    launcher, since they all take it from shells/_common.sh."""
    shells = tmp_path / "repo" / "shells"
    shutil.copytree(ROOT / "shells", shells)
    probe = 'source shells/_common.sh; use_repo_python; passive_openmp_wait; echo "$PYTHON $OMP_WAIT_POLICY"'
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OMP_WAIT_POLICY")}

    def resolved(**extra):
        return subprocess.run(["bash", "-c", probe], cwd=shells.parent, env={**env, **extra}, capture_output=True,
                              text=True, check=True).stdout.split()

    assert resolved() == [shutil.which("python3"), "PASSIVE"]
    venv_python = shells.parent / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    assert resolved() == [str(venv_python), "PASSIVE"]
    assert resolved(PYTHON="/opt/py", OMP_WAIT_POLICY="ACTIVE") == ["/opt/py", "ACTIVE"]
    for launcher in ("eval.sh", "generate.sh", "quickstart.sh"):
        text = (ROOT / "shells" / launcher).read_text()
        assert "use_repo_python" in text and "passive_openmp_wait" in text, launcher
        assert not re.search(r"^[^#]*\.venv/bin/python", text, flags=re.M), f"{launcher} has its own rule"


def test_generate_sh_without_a_prompt_is_a_one_line_usage_error():
    run = subprocess.run(["bash", str(ROOT / "shells" / "generate.sh"), "runs/x"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: usage: bash shells/generate.sh")
