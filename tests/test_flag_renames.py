"""The original train.py's misleading flag names keep working: the same TrainConfig as the new
names, and one warning line naming the new flag (retrofit/train/flag_renames.py)."""

from __future__ import annotations

import pytest

from retrofit.train.config import parse_config
from retrofit.train.flag_renames import rewrite_renamed_flags

OLD = ["--no_amp", "false", "--fix_num_steps=true", "--use_ellis_adam.use_ellis_adam=true", "--use_ellis_adam.eps=1e-5",
       "--use_ellis_adam.atan_adam", "false", "--seed=3"]
NEW = ["--bf16_autocast=true", "--single_iteration=true", "--ellis_adam.enabled=true", "--ellis_adam.eps=1e-5",
       "--ellis_adam.atan_adam=false", "--seed=3"]


def test_old_and_new_spelling_give_the_same_config_and_the_old_one_warns(capsys):
    old = parse_config(OLD)
    lines = capsys.readouterr().err.splitlines()
    new = parse_config(NEW)
    assert capsys.readouterr().err == ""  # the new names warn about nothing
    assert old == new
    assert old.bf16_autocast and old.single_iteration and old.optimizer_kind == "ellis_adam" and old.ellis_adam.eps == 1e-5
    # one line per renamed flag (the group's other flags share one line), naming the new one
    assert lines == [
        "warning: --no_amp is deprecated, use --bf16_autocast (inverted: --no_amp=false is --bf16_autocast=true)",
        "warning: --fix_num_steps is deprecated, use --single_iteration",
        "warning: --use_ellis_adam.use_ellis_adam is deprecated, use --ellis_adam.enabled",
        "warning: --use_ellis_adam.* is deprecated, use --ellis_adam.*",
    ]


def test_defaults_say_what_they_do():
    import torch

    from retrofit.train.parallel import autocast_on

    default = parse_config([])
    assert not default.bf16_autocast and not default.single_iteration and not default.ellis_adam.enabled
    # bf16 autocast: on a GPU with the flag only (the original's --no_amp=false), never on CPU
    autocast = parse_config(["--bf16_autocast=true"])
    assert autocast_on(autocast, torch.device("cuda")) and not autocast_on(default, torch.device("cuda"))
    assert not autocast_on(autocast, torch.device("cpu"))


@pytest.mark.parametrize("old,new", [
    (["--no_amp=True"], ["--bf16_autocast=false"]),
    (["--no_amp=false"], ["--bf16_autocast=true"]),  # the paper's launchers: autocast on
    (["--no_amp", "no"], ["--bf16_autocast=true"]),
    (["--fix_num_steps", "true"], ["--single_iteration=true"]),
    (["--use_ellis_adam.running_init=false"], ["--ellis_adam.running_init=false"]),
    (["--run_name=no_amp", "--muon.use_muon=true"], ["--run_name=no_amp", "--muon.use_muon=true"]),  # others untouched
])
def test_each_spelling_is_rewritten(old, new):
    assert rewrite_renamed_flags(old)[0] == new


def test_an_inverted_flag_with_a_non_boolean_value_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--no_amp=maybe"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --no_amp=maybe: expected true or false"
