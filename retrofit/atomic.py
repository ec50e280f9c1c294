"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Both helpers write under a hidden temporary name beside the target (the same file system, so the
final rename is atomic) and rename into place. Replacing an existing folder first renames the old
one aside and deletes it only after the new one is in place, so there is never a moment without a
complete copy, and a failed rename puts the old one back: nothing the user had is lost.

Temporary names are `.{name}.tmp-XXXX` (being written) and `.{name}.old-XXXX` (the copy being
replaced): a job killed mid-write leaves only hidden folders with these tags, which
`retrofit.train.run_claim.remove_stale_temporaries` clears. Files and folders get the permissions a
plain `open()` / `mkdir()` would give (the umask's), not the owner-only ones of `tempfile`.

Standard library only (plotting and the data tools use it without torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temporary(path: str | Path) -> bool:
    """True for a leftover of an interrupted atomic write (see the module docstring)."""
    name = Path(path).name
    return name.startswith(".") and (TMP_TAG in name or OLD_TAG in name)


def remove_leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (only those for the target `name`
    when given) and return their paths. Call it only when no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if is_temporary(path) and (name is None or path.name.startswith(f".{name}.")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed to `path`.

    `suffix` keeps an extension on the temporary name for writers that infer the format from it
    (matplotlib's `savefig`). On an exception the temporary file is removed, `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically; returns `path`."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def write_json_atomic(path: str | Path, data, **dump_kwargs) -> Path:
    """`json.dump` to `path` atomically (`dump_kwargs` go to `json.dumps`, e.g. indent=2)."""
    return write_file_atomic(path, json.dumps(data, **dump_kwargs))


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`
    (`replace_directory`). On an exception it is removed and `target` is untouched.

    Whether an existing `target` may be replaced is the caller's decision (each CLI has its own
    refusal message and flag): check before entering.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        yield tmp
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(new_dir: str | Path, target: str | Path) -> None:
    """Move the folder `new_dir` to `target` (same file system). An existing `target` is renamed
    aside first and deleted only after the new one is in place; if that rename fails, it is put
    back."""
    new_dir, target = Path(new_dir), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new_dir, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_TAG}", dir=target.parent))
    old.rmdir()  # only the unique name is needed
    os.replace(target, old)
    try:
        os.replace(new_dir, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
