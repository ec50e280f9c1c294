"""Claiming a run folder before training: one process at a time (a lock held for the run's life,
stale locks from dead processes detected and reported), a previous run refused unless
--overwrite=true, and --overwrite never deleting an input that a flag names.

The run folder's names (checkpoints, metrics) are in `run_folder.py`; what a checkpoint holds and
how it is saved and resumed is `checkpoint.py`'s."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from retrofit.atomic import OLD_TAG, remove_leftovers
from retrofit.errors import ConfigError
from retrofit.train import distributed as dist_utils
from retrofit.train.checkpoint import check_training_state_dir
from retrofit.train.config import TrainConfig
from retrofit.train.run_folder import METRICS_FILE, RUN_OUTPUT_RE
from retrofit.train.run_record import RUN_FILE

LOCK_FILE = ".run.lock"


def process_start_time(pid: int) -> float | None:
    """When process `pid` of this host started (seconds since the epoch, from /proc), or None if
    it is not running. With the pid it tells a live holder from a recycled pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return round(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 1)


def _describe_holder(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class RunFolderLock:
    """One process (the main rank of one job) trains in a run folder at a time.

    `{run_dir}/.run.lock` is held with flock(2) for the run's life and names its holder (pid, host,
    process start time). The kernel drops a flock when its process dies, so a lock file found
    unlocked was left by a dead run: it is taken over and reported. Where the file system has no
    flock (some NFS / Lustre mounts), the file is created exclusively instead and a holder on this
    host whose pid no longer runs with the recorded start time counts as dead. Released (the file
    deleted) when the run ends; a lock of this process is re-entrant (in-process resumes, tests)."""

    _held: dict[Path, "RunFolderLock"] = {}

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.stale_note: str | None = None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunFolderLock":
        """The held lock, or ConfigError naming the process that holds it."""
        key = Path(run_dir).resolve()
        if key in cls._held:
            return cls._held[key]
        lock = cls(Path(run_dir))
        lock._take()
        cls._held[key] = lock
        return lock

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start_time(os.getpid())}

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict):
        raise ConfigError(
            f"{self.run_dir} is in use by another training process ({_describe_holder(holder)}); wait for it to end"
            f" or choose another --run_name (if that process is gone, delete {self.path})"
        )

    def _take(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._refuse(self._read_holder())
                if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                    return self._take_without_flock()
                raise
            try:  # the holder before us may have deleted the file while we waited: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        previous = self._read_holder()
        if previous:
            self.stale_note = f"took over the lock of a run that died without releasing it ({_describe_holder(previous)})"
        self._write_me(fd)

    def _write_me(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._me()).encode(), 0)
        os.fsync(fd)

    def _holder_is_alive(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot look into another host's processes: assume it still runs
        pid = holder.get("pid")
        started = process_start_time(pid) if isinstance(pid, int) else None
        return started is not None and (holder.get("started") is None or abs(started - holder["started"]) < 2)

    def _take_without_flock(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if self._holder_is_alive(holder):
                    self._refuse(holder)
                self.stale_note = f"took over the lock of a run that died without releasing it ({_describe_holder(holder)})"
                self.path.unlink(missing_ok=True)
                continue
            self._write_me(fd)
            self.fd = fd
            return
        self._refuse(self._read_holder())

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then re-checks the inode and retries
        os.close(self.fd)  # drops the flock
        self.fd = None
        RunFolderLock._held.pop(self.run_dir.resolve(), None)


def release_run_dir(cfg: TrainConfig) -> None:
    """Release this process's lock on the run folder (train.py's main() calls it however the run ends)."""
    lock = RunFolderLock._held.get(cfg.run_dir.resolve())
    if lock is not None:
        lock.release()


def _is_within(path: str | Path, folder: Path) -> bool:
    """True if `path` lies in `folder`, as written or with symlinks resolved (a path through a
    symlinked checkpoint breaks when the link goes, a resolved one when its target goes)."""
    for a, b in ((Path(os.path.abspath(path)), Path(os.path.abspath(folder))), (Path(path).resolve(), folder.resolve())):
        if a == b or b in a.parents:
            return True
    return False


def previous_run_outputs(run_dir: Path) -> list[Path]:
    """What an earlier run left in `run_dir` (checkpoints, model-only saves, metrics)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if RUN_OUTPUT_RE.match(p.name))


def input_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(--flag, value) for every string setting, nested groups included: whatever a flag names
    (base model, data, teacher, resume path, ...) is an input --overwrite must not delete."""
    found = []

    def walk(tree: dict, prefix: str):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value and key not in ("run_name", "out_path"):
                found.append((f"--{prefix}{key}", value))

    walk(dataclasses.asdict(cfg), "")
    return found


def delete_previous_run(cfg: TrainConfig, outputs: list[Path]) -> None:
    """--overwrite=true: every target is checked first (no input inside, renamable), moved aside
    under a hidden name (all or none: a failed move puts the others back), then deleted. A symlinked
    output loses only the link, never what it points to."""
    for flag, value in input_paths(cfg):
        inside = next((p for p in outputs if _is_within(value, p)), None)
        if inside is not None:
            raise ConfigError(
                f"--overwrite=true would delete {flag}={value} (inside {inside}); copy it out of {cfg.run_dir} first"
            )
    moved: list[tuple[Path, Path]] = []
    try:
        for path in outputs:
            aside = path.with_name(f".{path.name}{OLD_TAG}{os.getpid()}")
            os.replace(path, aside)
            moved.append((path, aside))
    except OSError as exc:
        for moved_path, aside in reversed(moved):
            os.replace(aside, moved_path)
        raise ConfigError(
            f"--overwrite=true cannot delete {path} ({exc.strerror or exc}); nothing was deleted"
        ) from None
    for _, aside in moved:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)  # what cannot go stays hidden, cleared as a leftover
        else:
            aside.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what a job killed mid-save left in the run folder (hidden `.tmp-` / `.old-` folders of
    `retrofit.atomic`), and what --overwrite=true could not delete; call it with the folder locked."""
    return remove_leftovers(run_dir)


def prepare_run_dir(cfg: TrainConfig) -> str | None:
    """Main rank: check that the folder is writable, lock it for this run (RunFolderLock), refuse
    to train over a previous run unless asked, clear it for --overwrite=true. Returns a message for
    the log, or raises ConfigError."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to --out_path={cfg.out_path} ({exc.strerror or exc}): choose a writable folder"
        ) from None
    lock = RunFolderLock.acquire(run_dir)
    messages = [lock.stale_note] if lock.stale_note else []
    lock.stale_note = None
    try:
        for name in (METRICS_FILE, RUN_FILE):  # written every step / at start: a folder there ends the run late
            if (run_dir / name).exists() and not (run_dir / name).is_file() and not cfg.overwrite:
                raise ConfigError(f"{run_dir / name} is not a file; move it out of the run folder (or pass --overwrite=true)")
        outputs = previous_run_outputs(run_dir)
        if outputs and cfg.resume_path is None:
            names = ", ".join(p.name for p in outputs[:4]) + (", ..." if len(outputs) > 4 else "")
            if not cfg.overwrite:
                raise ConfigError(
                    f"{run_dir} already holds a run ({names}); continue it with --resume_path=auto, or pass"
                    " --overwrite=true to delete it and start again (or choose another --run_name)"
                )
            delete_previous_run(cfg, outputs)
            messages.append(f"--overwrite=true: deleted the previous run in {run_dir} ({names})")
    except BaseException:
        lock.release()
        raise
    remove_stale_temporaries(run_dir)  # the folder is ours now: no other process writes there
    return "\n".join(messages) or None


def claim_run_dir(cfg: TrainConfig, env) -> str | None:
    """Every rank: the main rank inspects (and for --overwrite clears) the run folder, every rank
    gets its verdict, so all of them stop with the same error. A --resume_path that is no
    checkpoint fails here, before any work. Returns a message for the log."""
    verdict = None
    if env.is_main:
        try:
            verdict = ("ok", prepare_run_dir(cfg))
        except ConfigError as exc:
            verdict = ("error", str(exc))
    kind, text = dist_utils.broadcast_object(verdict)
    if kind == "error":
        raise ConfigError(text)
    if cfg.resume_path not in (None, "auto"):
        check_training_state_dir(cfg.resume_path)
    return text
