"""Fault injection for tests: stop a save at a named phase, as a kill at that moment would.

`RETROFIT_FAULT_AT=PHASE[@N]` kills this process with SIGKILL the N-th time (default: the first)
it reaches PHASE; `RETROFIT_FAULT_ACTION=raise` raises `InjectedFault` instead (a BaseException,
so no `except OSError` / `except Exception` of the code under test swallows it). Unset (always, in
real runs) it costs one dictionary lookup per save.

Phases (KIND is `full` for `checkpoint_{step}`, `model_only` for `model_only_chkpt_{step}`,
`final` for `final_checkpoint`):
- `KIND:temp_written`   the weights / training state are in the hidden temporary folder, nothing else
- `KIND:before_rename`  every file (and a full checkpoint's COMPLETE marker) written, not yet renamed
- `KIND:after_rename`   the folder is in place under its final name; nothing after it has run
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "RETROFIT_FAULT_AT"
ACTION_ENV = "RETROFIT_FAULT_ACTION"
KINDS = ("full", "model_only", "final")
POINTS = ("temp_written", "before_rename", "after_rename")
PHASES = tuple(f"{kind}:{point}" for kind in KINDS for point in POINTS)

_reached: Counter = Counter()


class InjectedFault(BaseException):
    """Raised at the chosen phase when RETROFIT_FAULT_ACTION=raise."""


def parse_fault(value: str) -> tuple[str, int]:
    """`PHASE[@N]` -> (PHASE, N); ValueError naming the bad value."""
    phase, _, count = value.partition("@")
    if phase not in PHASES:
        raise ValueError(f"{FAULT_ENV}={value!r}: the phase must be one of {', '.join(PHASES)}")
    if count and not (count.isdigit() and int(count) >= 1):
        raise ValueError(f"{FAULT_ENV}={value!r}: the count after @ must be a whole number >= 1")
    return phase, int(count or 1)


def fault_point(phase: str) -> None:
    """Kill (or raise) here when RETROFIT_FAULT_AT names this phase and its count is reached."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    target, count = parse_fault(wanted)
    if target != phase:
        return
    _reached[phase] += 1
    if _reached[phase] != count:
        return
    if os.environ.get(ACTION_ENV) == "raise":
        raise InjectedFault(f"{FAULT_ENV}={wanted}")
    os.kill(os.getpid(), signal.SIGKILL)
