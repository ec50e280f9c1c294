"""torchrun that a stop signal ends cleanly: `python -m retrofit.train.stoppable_torchrun [torchrun args]`.

Plain torchrun turns SIGTERM into an exception in its elastic agent: the agent forwards the signal
to the ranks, waits for them and then re-raises, so the launch prints a `SignalException`
traceback and exits 1 even when every rank saved a full checkpoint and exited 0 (train.py's
answer to SIGTERM / SIGUSR1, see docs/training.md#preemption).

This launcher runs torchrun in-process (`torch.distributed.run.main`) but keeps SIGTERM and
SIGUSR1 for itself: it hands them to the ranks (its child processes) and lets the agent go on
watching them. When every rank exits 0, torchrun returns normally and one line says the run was
stopped; the exit status is then 0, the convention train.py follows for a stop that saved (a
scheduler requeues on the signal it sent, not on the status). A rank that fails still ends the
usual way: torchrun's failure summary (without its traceback), exit status 1. SIGINT, SIGHUP and
SIGQUIT stay torchrun's.
A `--signals-to-handle` on the command line wins over the one added here. The ranks are found in
/proc (Linux); elsewhere this is plain torchrun.

`shells/_submit.sh --local` launches through it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1")
# torchrun's default list without the signals this launcher forwards itself.
TORCHRUN_SIGNALS = "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"


def child_pids(parent: int | None = None) -> list[int]:
    """The pids of the processes whose parent is `parent` (default: this one), from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


class StopForwarder:
    """Hands SIGTERM / SIGUSR1 to the ranks instead of letting torchrun's agent raise on them."""

    def __init__(self):
        self.received: str | None = None
        for name in FORWARDED_SIGNALS:
            signal.signal(getattr(signal, name), self.on_signal)

    def on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received = self.received or name
        ranks = child_pids()
        if not ranks:  # no rank started yet: nothing can save, so stop here
            print(f"stoppable_torchrun: received {name} before any rank started; nothing was trained", file=sys.stderr,
                  flush=True)
            raise SystemExit(128 + signum)
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # it ended meanwhile
                pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not Path("/proc").is_dir():  # no way to find the ranks (not Linux): plain torchrun
        torchrun_main(argv)
        return 0
    forwarder = StopForwarder()
    try:
        torchrun_main([TORCHRUN_SIGNALS, *argv])
    except ChildFailedError as exc:  # torchrun's failure summary (which rank, exit code), without the traceback
        print(f"stoppable_torchrun: {exc}", file=sys.stderr, flush=True)
        return 1
    if forwarder.received:
        print(
            f"stoppable_torchrun: stopped by {forwarder.received}; every rank exited 0 (train.py saves a full checkpoint"
            " first: --resume_path=auto continues the run)",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
