"""Progress bars for long work (packing, parquet writing, the depth sweep, training): tqdm on
stderr, drawn only when stderr is a terminal and the caller did not turn them off (`--no_progress`
/ `--progress=false`), so logs, pipes and tests never see carriage-return noise and what scripts
print on stdout stays as parsers expect it.
"""

from __future__ import annotations

import sys


def progress_shown(enabled: bool = True) -> bool:
    """True when a bar should be drawn: enabled and stderr is an interactive terminal."""
    try:
        return bool(enabled) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress_bar(iterable=None, *, enabled: bool = True, **tqdm_kwargs):
    """`tqdm(iterable, **tqdm_kwargs)` on stderr, disabled unless `progress_shown(enabled)`."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not progress_shown(enabled), **tqdm_kwargs)
