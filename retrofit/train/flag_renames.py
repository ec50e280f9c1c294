"""The original train.py's flags whose names said something else than what they do, and their
honest names here. The old spelling keeps working on the command line: it is rewritten to the new
one before parsing, with one warning line per renamed flag (docs/differences.md, "Renamed flags").

- `--no_amp=false` -> `--bf16_autocast=true` (the original's name negates; its default, true, meant
  no autocast)
- `--fix_num_steps=true` -> `--single_iteration=true` (it fixes (n, k) to (0, 1): one iteration)
- `--use_ellis_adam.use_ellis_adam=true` -> `--ellis_adam.enabled=true`, and the group's other
  flags `--use_ellis_adam.X` -> `--ellis_adam.X`
"""

from __future__ import annotations

# old flag -> (new flag, whether the boolean value is inverted)
RENAMED_FLAGS = {
    "--no_amp": ("--bf16_autocast", True),
    "--fix_num_steps": ("--single_iteration", False),
    "--use_ellis_adam.use_ellis_adam": ("--ellis_adam.enabled", False),
}
RENAMED_GROUPS = {"--use_ellis_adam.": "--ellis_adam."}

# the spellings jsonargparse reads as booleans
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class BadRenamedFlag(ValueError):
    """An old-spelling boolean flag whose value is not a boolean (the message is one line)."""


def _new_name(old: str) -> tuple[str, bool, str] | None:
    """(new flag, inverted, its warning line) for an old flag name, or None when `old` was not renamed.
    A group's flags share one warning line."""
    if old in RENAMED_FLAGS:
        new, inverted = RENAMED_FLAGS[old]
        note = f" (inverted: {old}=false is {new}=true)" if inverted else ""
        return new, inverted, f"warning: {old} is deprecated, use {new}{note}"
    for old_group, new_group in RENAMED_GROUPS.items():
        if old.startswith(old_group):
            return new_group + old[len(old_group):], False, f"warning: {old_group}* is deprecated, use {new_group}*"
    return None


def _inverted(flag: str, value: str) -> str:
    if value.lower() in _TRUE_WORDS:
        return "false"
    if value.lower() in _FALSE_WORDS:
        return "true"
    raise BadRenamedFlag(f"{flag}={value}: expected true or false")


def rewrite_renamed_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv with every old spelling replaced by the new one, and one warning line per old flag (or
    old group) used.

    Handles `--old=value` and `--old value`; raises BadRenamedFlag for an inverted flag whose value
    is not a boolean."""
    rewritten, warnings = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value, value = token.partition("=")
        renamed = _new_name(name) if token.startswith("--") else None
        if renamed is None:
            rewritten.append(token)
            i += 1
            continue
        new_name, inverted, warning = renamed
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, has_value, i = argv[i + 1], "=", i + 1  # `--old value`
        if has_value and inverted:
            value = _inverted(name, value)
        rewritten.append(f"{new_name}={value}" if has_value else new_name)
        if warning not in warnings:
            warnings.append(warning)
        i += 1
    return rewritten, warnings
