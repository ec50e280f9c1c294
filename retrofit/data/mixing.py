"""Mix packed datasets: how many rows each source gives (`plan_mix`), in which seeded order
(`mix_order`), and gathering them (`gather_rows`). mix_datasets.py writes the mix as shards."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from retrofit.data.rows import DataError
from retrofit.data.shards import normalize_packed_table


@dataclass
class MixRequest:
    """How much of one source goes into a mix: `rows` (an int, or "all") or `fraction` (this
    source's share of the final mix, 0 < f <= 1)."""

    path: str
    rows: int | str | None = None
    fraction: float | None = None
    available: int = field(default=0)

    def describe(self) -> str:
        return f"fraction {self.fraction:g}" if self.fraction is not None else f"rows {self.rows}"


def parse_mix_spec(spec: str) -> MixRequest:
    """`PATH:ROWS`, `PATH:all`, `PATH:0.25` or `PATH:25%` (a number with a '.' or '%' is a fraction)."""
    path, sep, amount = spec.rpartition(":")
    if not sep or not path or not amount:
        raise DataError(f"mix source {spec!r} is not PATH:ROWS, PATH:all or PATH:FRACTION")
    try:
        if amount == "all":
            return MixRequest(path, rows="all")
        if amount.endswith("%"):
            return MixRequest(path, fraction=float(amount[:-1]) / 100)
        if "." in amount or "e" in amount.lower():
            return MixRequest(path, fraction=float(amount))
        return MixRequest(path, rows=int(amount))
    except ValueError:
        raise DataError(f"mix source {spec!r}: {amount!r} is not a row count, 'all' or a fraction") from None


def plan_mix(requests: list[MixRequest], total_rows: int | None = None) -> list[int]:
    """Rows to take from each source. Row counts are taken as given; fractions are shares of the
    final mix: with fixed-count sources of R rows and fractions summing to F < 1 the mix has
    R / (1 - F) rows; if every source is a fraction (summing to 1) the mix is `total_rows`, or
    the largest mix that no source runs short of. Errors name the source that is short."""
    if not requests:
        raise DataError("a mix needs at least one source")
    fixed = 0
    for req in requests:
        if req.fraction is None:
            if req.rows == "all":
                req.rows = req.available
            if not isinstance(req.rows, int) or req.rows < 0:
                raise DataError(f"mix source {req.path}: rows={req.rows!r} must be a count >= 0 or 'all'")
            if req.rows > req.available:
                raise DataError(f"mix source {req.path}: asks for {req.rows:,} rows but has {req.available:,}")
            fixed += req.rows
        elif isinstance(req.fraction, bool) or not isinstance(req.fraction, int | float) or not 0 < req.fraction <= 1:
            raise DataError(f"mix source {req.path}: fraction {req.fraction!r} must be in (0, 1]")
    fractions = [r for r in requests if r.fraction is not None]
    frac_sum = sum(r.fraction for r in fractions)
    if not fractions:
        total = fixed
    elif len(fractions) == len(requests):
        if abs(frac_sum - 1) > 1e-6:
            raise DataError(f"the fractions sum to {frac_sum:g}; as shares of the mix they must sum to 1")
        total = total_rows or int(min(r.available / r.fraction for r in fractions) + 1e-9)
    else:
        if total_rows is not None:
            raise DataError("--total_rows only applies when every source is given as a fraction")
        if frac_sum >= 1:
            raise DataError(
                f"the fractions sum to {frac_sum:g} but other sources have fixed rows; they must sum below 1"
            )
        total = round(fixed / (1 - frac_sum))
    # Largest-remainder rounding of the fractional shares to whole rows.
    frac_total = total - fixed
    exact = [r.fraction / frac_sum * frac_total if fractions else 0.0 for r in fractions]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: frac_total - sum(counts)]:
        counts[i] += 1
    by_source, it = [], iter(counts)
    for req in requests:
        n = req.rows if req.fraction is None else next(it)
        if n > req.available:
            raise DataError(
                f"mix source {req.path}: the mix needs {n:,} rows ({req.describe()}) but it has {req.available:,}"
            )
        by_source.append(n)
    if sum(by_source) == 0:
        raise DataError("the mix is empty")
    return by_source


def mix_order(counts: list[int], sizes: list[int], seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) of every row of the mix in its shuffled order: a seeded sample of counts[i]
    rows of source i without replacement, then one seeded shuffle of all of them."""
    rng = np.random.default_rng(seed)
    source = np.concatenate([np.full(n, i, dtype=np.int32) for i, n in enumerate(counts)])
    row = np.concatenate(
        [
            np.arange(size, dtype=np.int64) if n == size else rng.choice(size, n, replace=False)
            for n, size in zip(counts, sizes)
        ]
    )
    perm = rng.permutation(len(source))
    return source[perm], row[perm]


def gather_rows(
    tables: list[pa.Table], source: np.ndarray, row: np.ndarray, with_loss_mask: bool | None = None
) -> pa.Table:
    """Rows (source[i], row[i]) of the given tables, in that order, as normalized packed rows."""
    parts, positions = [], []
    for i, table in enumerate(tables):
        where = np.nonzero(source == i)[0]
        if len(where):
            parts.append(normalize_packed_table(table.take(pa.array(row[where])), f"source {i}", with_loss_mask))
            positions.append(where)
    combined = pa.concat_tables(parts)
    back = np.empty(len(source), dtype=np.int64)
    back[np.concatenate(positions)] = np.arange(len(source))
    return combined.take(pa.array(back))
