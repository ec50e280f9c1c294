"""The original train.py's misleading flag names keep working: the same TrainConfig as the new
names, and one warning line naming the new flag (retrofit/train/flag_renames.py)."""

from __future__ import annotations

import pytest

from retrofit.train.config import parse_config

# (the original's spelling, the new one)
SPELLINGS = [
    (["--no_amp=false"], ["--bf16_autocast=true"]),
    (["--no_amp=True"], ["--bf16_autocast=false"]),
    (["--no_amp", "false"], ["--bf16_autocast=true"]),
    (["--fix_num_steps=true"], ["--single_iteration=true"]),
    (["--use_ellis_adam.use_ellis_adam=true", "--use_ellis_adam.eps=1e-5", "--use_ellis_adam.atan_adam", "false"],
     ["--ellis_adam.enabled=true", "--ellis_adam.eps=1e-5", "--ellis_adam.atan_adam=false"]),
]


@pytest.mark.parametrize("old,new", SPELLINGS)
def test_old_and_new_spelling_give_the_same_config(old, new, capsys):
    assert parse_config(old + ["--seed=3"]) == parse_config(new + ["--seed=3"])


def test_defaults_and_new_names_say_what_they_do():
    default = parse_config([])
    assert not default.bf16_autocast and not default.single_iteration and not default.ellis_adam.enabled
    assert parse_config(["--no_amp=false"]).bf16_autocast  # the paper's launchers: autocast on
    assert parse_config(["--use_ellis_adam.use_ellis_adam=true"]).optimizer_kind == "ellis_adam"


def test_old_spelling_prints_one_warning_line_naming_the_new_flag(capsys):
    parse_config(["--no_amp=false", "--fix_num_steps=true", "--use_ellis_adam.use_ellis_adam=true"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines)
    assert "--no_amp" in lines[0] and "--bf16_autocast" in lines[0]
    assert "--single_iteration" in lines[1] and "--ellis_adam.enabled" in lines[2]
    parse_config(["--bf16_autocast=true", "--single_iteration=true", "--ellis_adam.enabled=true"])
    assert capsys.readouterr().err == ""  # the new names warn about nothing


def test_an_inverted_flag_with_a_non_boolean_value_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--no_amp=maybe"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --no_amp=maybe: expected true or false"
