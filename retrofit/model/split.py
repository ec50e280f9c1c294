"""Choose which base layers become prelude, recurrent block and coda, from how much each changes the
hidden state (`choose_split.py` is the command line).

Two measurements from one pass over sample data, no gradient:

- block influence of layer i (Men et al., 2024, "ShortGPT"): 1 - cos(h_i, h_{i+1}), averaged over
  real tokens; h_i is the residual stream entering layer i (h_0 the embedding output), h_{i+1} the
  stream leaving it. A layer that barely turns the stream has low influence.
- angular distance of the contiguous block of layers i..j (Gromov et al., 2024, "The Unreasonable
  Ineffectiveness of the Deeper Layers"): arccos(cos(h_i, h_{j+1})) / pi, averaged over real tokens.
  Gromov et al. drop the block with the smallest distance; the model then loses least.

A split keeps N layers as three contiguous groups in base order, prelude | recurrent block | coda,
of a given shape (p, k, c); the layers in the gaps are dropped. A freshly converted model with the
identity adapter at recurrence 1 is exactly the base without the dropped layers, so a split is
scored by the cost of its drops: the sum, over every maximal run of dropped layers, of that run's
angular distance. The recommended split has the lowest score. The paper-style split of the same
shape (first p layers, the k before the last c, last c: the paper's TinyLlama recipe) is reported
beside it, as is the worst split considered.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class SplitError(ValueError):
    """Bad input to the split tool; the message names the bad value."""


# ----------------------------------------------------------------------------------------------
# Sample data: a parquet folder / file, a datasets.save_to_disk folder, or a text file
# ----------------------------------------------------------------------------------------------


def load_sample_rows(path: str | os.PathLike, tokenizer, num_sequences: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_sequences` rows of at most `max_length` tokens, right-padded, with their mask.

    - a parquet file or folder (this project's packed shards): the `input_ids` column (and
      `attention_mask` when present), else a `text` column tokenized here; first rows in file order;
    - a `datasets.save_to_disk` folder (it has dataset_info.json or dataset_dict.json): `input_ids`
      or `text` (its `train` split for a DatasetDict);
    - any other file: read as UTF-8 text, tokenized as one stream and cut into rows of max_length.
    """
    path = Path(path)
    if num_sequences < 1:
        raise SplitError(f"--num_sequences must be >= 1, got {num_sequences}")
    if max_length < 2:
        raise SplitError(f"--max_length must be >= 2, got {max_length}")
    if not path.exists():
        raise SplitError(f"--data {path} does not exist (give a parquet folder, a save_to_disk folder or a text file)")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        rows = rows_from_saved_dataset(path, tokenizer, num_sequences)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        rows = rows_from_parquet(path, tokenizer, num_sequences)
    elif path.is_dir():
        raise SplitError(f"--data {path} is a folder without *.parquet files or a save_to_disk dataset")
    else:
        rows = rows_from_text_file(path, tokenizer, num_sequences, max_length)
    rows = [r[:max_length] for r in rows if len(r) >= 2][:num_sequences]
    if not rows:
        raise SplitError(f"--data {path} holds no sequence of at least 2 tokens")
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _tokenize(tokenizer, texts: list[str], where: str) -> list[list[int]]:
    if tokenizer is None:
        raise SplitError(f"{where} holds text but the model has no tokenizer; give token rows (input_ids) instead")
    return [tokenizer(t)["input_ids"] for t in texts if t]


def rows_from_parquet(path: Path, tokenizer, num_sequences: int) -> list[list[int]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    rows: list[list[int]] = []
    for file in files:
        try:
            reader = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises several types for a foreign or corrupt file
            raise SplitError(f"{file} is not a readable parquet file ({type(err).__name__})") from None
        names = reader.schema_arrow.names
        column = "input_ids" if "input_ids" in names else "text" if "text" in names else None
        if column is None:
            raise SplitError(f"{file} has neither an input_ids nor a text column (columns: {', '.join(names)})")
        wanted = [column] + (["attention_mask"] if column == "input_ids" and "attention_mask" in names else [])
        for batch in reader.iter_batches(batch_size=256, columns=wanted):
            data = batch.to_pydict()
            if column == "text":
                rows += _tokenize(tokenizer, data["text"], str(file))
            elif "attention_mask" in data:
                rows += [[t for t, m in zip(r, mk) if m] for r, mk in zip(data["input_ids"], data["attention_mask"])]
            else:
                rows += data["input_ids"]
            if any(token is None for row in rows for token in row):
                raise SplitError(f"{file}: column {column!r} holds null values; re-create the data without them")
            if len(rows) >= num_sequences:
                return rows
    return rows


def rows_from_saved_dataset(path: Path, tokenizer, num_sequences: int) -> list[list[int]]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise SplitError(f"{path} is a DatasetDict without a train split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    dataset = dataset.select(range(min(num_sequences, len(dataset))))
    if "input_ids" in dataset.column_names:
        return [list(r) for r in dataset["input_ids"]]
    if "text" in dataset.column_names:
        return _tokenize(tokenizer, list(dataset["text"]), str(path))
    raise SplitError(f"{path} has neither an input_ids nor a text column (columns: {', '.join(dataset.column_names)})")


def rows_from_text_file(path: Path, tokenizer, num_sequences: int, max_length: int) -> list[list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SplitError(f"--data {path} is neither parquet nor UTF-8 text") from None
    if tokenizer is None:
        raise SplitError(f"{path} holds text but the model has no tokenizer")
    # Tokenized as one stream, in chunks so a large file is not one huge call.
    stream: list[int] = []
    for start in range(0, len(text), 100_000):
        stream += tokenizer(text[start : start + 100_000], add_special_tokens=False)["input_ids"]
        if len(stream) >= num_sequences * max_length:
            break
    return [stream[i : i + max_length] for i in range(0, len(stream), max_length)][:num_sequences]


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerStatistics:
    """cos_sum[i, j] = sum over real tokens of cos(h_i, h_j), h_0 = embedding, h_L = last layer's
    output; angle_sum the same for arccos(cos) / pi; `tokens` real tokens counted."""

    num_layers: int
    cos_sum: torch.Tensor
    angle_sum: torch.Tensor
    tokens: int = 0

    def block_influence(self) -> list[float]:
        """1 - mean cos(input, output) of every layer."""
        return [1.0 - float(self.cos_sum[i, i + 1]) / self.tokens for i in range(self.num_layers)]

    def angular_distance(self, first: int, last: int) -> float:
        """Mean arccos(cos(input of layer `first`, output of layer `last`)) / pi, in [0, 1]."""
        return float(self.angle_sum[first, last + 1]) / self.tokens

    def as_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "block_influence": self.block_influence(),
            "angular_distance": {f"{i}-{j}": self.angular_distance(i, j)
                                 for i in range(self.num_layers) for j in range(i, self.num_layers)},
        }


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(embedding, decoder layers) of a HF causal LM (Llama, Mistral, Qwen2/3, OLMo-2 all use model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SplitError(f"{type(model).__name__} has no model.layers list of decoder layers")
    return model.get_input_embeddings(), layers


@torch.no_grad()
def measure(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8,
            progress: bool = True) -> LayerStatistics:
    """One pass over the rows, no gradient: every hidden state h_0..h_L of every batch is captured
    with hooks and reduced at once to the (L+1) x (L+1) sums of cos and angle over real tokens."""
    from retrofit.progress import progress_bar

    embedding, layers = decoder_layers(model)
    num_layers = len(layers)
    stats = LayerStatistics(num_layers, torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64),
                            torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64))
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [embedding.register_forward_hook(keep)] + [layer.register_forward_hook(keep) for layer in layers]
    device = next(model.parameters()).device
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for start in progress_bar(starts, desc="measuring layers", unit="batch", enabled=progress):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            captured.clear()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if len(captured) != num_layers + 1:
                raise SplitError(f"expected {num_layers + 1} hidden states per forward, captured {len(captured)}")
            real = mask.bool().reshape(-1)
            # (L+1, tokens, hidden), unit vectors in float32 (bf16 models included)
            states = torch.stack([h.reshape(-1, h.shape[-1])[real].float() for h in captured])
            states = torch.nn.functional.normalize(states, dim=-1)
            cos = torch.einsum("ith,jth->tij", states, states).clamp(-1.0, 1.0)
            stats.cos_sum += cos.sum(0).double().cpu()
            stats.angle_sum += (torch.arccos(cos) / math.pi).sum(0).double().cpu()
            stats.tokens += int(real.sum())
    finally:
        for hook in hooks:
            hook.remove()
    return stats


# ----------------------------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    prelude: tuple[int, ...]
    core: tuple[int, ...]
    coda: tuple[int, ...]
    dropped: tuple[int, ...]
    score: float = field(default=0.0, compare=False)

    def flags(self) -> str:
        return f"--prelude_idx {span(self.prelude)} --core_idx {span(self.core)} --coda_idx {span(self.coda)}"

    def as_dict(self) -> dict:
        return {"prelude": list(self.prelude), "core": list(self.core), "coda": list(self.coda),
                "dropped": list(self.dropped), "score": self.score, "flags": self.flags()}


def span(indices) -> str:
    """[4, 5, 6] -> '4-6', [2] -> '2', [] -> ''; contiguous groups only (as the tool makes them)."""
    indices = list(indices)
    if not indices:
        return ""
    return str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"


def paper_shape(keep: int) -> tuple[int, int, int]:
    """(p, k, c) for N kept layers with the paper's proportions: p = c = round(N / 4), k = the rest.
    Gives the paper's (2,4,2) for 8, (4,6,4) for 14 and (4,8,4) for 16."""
    if keep < 3:
        raise SplitError(f"--keep must be >= 3 (one layer each for prelude, recurrent block and coda), got {keep}")
    p = max(1, math.floor(keep / 4 + 0.5))
    return p, keep - 2 * p, p


def dropped_runs(dropped: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive dropped layers as (first, last)."""
    runs: list[tuple[int, int]] = []
    for i in dropped:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def score(stats: LayerStatistics, dropped: tuple[int, ...]) -> float:
    """What dropping these layers costs: the summed angular distance of every dropped run."""
    return sum(stats.angular_distance(first, last) for first, last in dropped_runs(dropped))


def candidate_splits(num_layers: int, shape: tuple[int, int, int]) -> list[tuple[tuple[int, ...], ...]]:
    """Every placement of three contiguous groups of sizes `shape`, in order, with the gaps
    (before, between, after) dropped: C(L - N + 3, 3) candidates."""
    p, k, c = shape
    free = num_layers - (p + k + c)
    if min(shape) < 1:
        raise SplitError(f"every group needs at least one layer, got shape {shape}")
    if free < 0:
        raise SplitError(f"shape {p},{k},{c} keeps {p + k + c} layers but the base has only {num_layers}")
    out = []
    for gaps in itertools.product(range(free + 1), repeat=3):
        if sum(gaps) > free:
            continue
        start = gaps[0]
        prelude = tuple(range(start, start + p))
        core = tuple(range(prelude[-1] + 1 + gaps[1], prelude[-1] + 1 + gaps[1] + k))
        coda = tuple(range(core[-1] + 1 + gaps[2], core[-1] + 1 + gaps[2] + c))
        out.append((prelude, core, coda))
    return out


def make_split(num_layers: int, prelude, core, coda, stats: LayerStatistics) -> Split:
    kept = set(prelude) | set(core) | set(coda)
    dropped = tuple(i for i in range(num_layers) if i not in kept)
    return Split(tuple(prelude), tuple(core), tuple(coda), dropped, score(stats, dropped))


def paper_style_split(num_layers: int, shape: tuple[int, int, int], stats: LayerStatistics) -> Split:
    """The paper's TinyLlama recipe for this shape: first p layers, the k right before the last c, last c."""
    p, k, c = shape
    return make_split(num_layers, range(p), range(num_layers - c - k, num_layers - c),
                      range(num_layers - c, num_layers), stats)


def rank_splits(stats: LayerStatistics, shape: tuple[int, int, int]) -> list[Split]:
    """All candidate splits, best (lowest score) first; ties keep the earlier placement."""
    splits = [make_split(stats.num_layers, *groups, stats) for groups in candidate_splits(stats.num_layers, shape)]
    return sorted(splits, key=lambda s: s.score)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def layer_table(stats: LayerStatistics) -> str:
    influence = stats.block_influence()
    lines = ["layer  block influence  angular distance", "-----  ---------------  ----------------"]
    for i in range(stats.num_layers):
        lines.append(f"{i:5d}  {influence[i]:15.4f}  {stats.angular_distance(i, i):16.4f}")
    return "\n".join(lines)


def splits_table(ranked: list[Split], paper: Split, top: int = 5) -> str:
    def row(label: str, s: Split) -> str:
        return (f"{label:<12} {span(s.prelude):>8} {span(s.core):>9} {span(s.coda):>8}  "
                f"{','.join(map(str, s.dropped)) or '-':<20} {s.score:8.4f}")

    lines = [f"{'split':<12} {'prelude':>8} {'recurrent':>9} {'coda':>8}  {'dropped':<20} {'score':>8}"]
    for i, s in enumerate(ranked[:top]):
        lines.append(row("recommended" if i == 0 else f"#{i + 1}", s))
    lines.append(row("paper-style", paper))
    lines.append(row(f"worst (#{len(ranked)})", ranked[-1]))
    return "\n".join(lines)


def plot(stats: LayerStatistics, ranked: list[Split], paper: Split, out: str | os.PathLike) -> Path:
    """Block influence per layer (kept / dropped by the recommendation) and the angular distance of
    every block (start layer x block length), written as PNG or PDF by the file's extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf"):
        raise SplitError(f"--plot {out}: use a .png or .pdf file name")
    best = ranked[0]
    L = stats.num_layers
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    influence = stats.block_influence()
    colors = ["tab:blue" if i in best.prelude else "tab:red" if i in best.core else "tab:green" if i in best.coda
              else "lightgray" for i in range(L)]
    ax1.bar(range(L), influence, color=colors)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("block influence 1 - cos(in, out)")
    ax1.set_title(f"recommended: prelude {span(best.prelude)} | recurrent {span(best.core)} | coda {span(best.coda)}",
                  fontsize=9)
    from matplotlib.patches import Patch

    ax1.legend(handles=[Patch(color=c, label=n) for c, n in (("tab:blue", "prelude"), ("tab:red", "recurrent"),
                                                            ("tab:green", "coda"), ("lightgray", "dropped"))], fontsize=8)
    grid = torch.full((L, L), float("nan"))
    for i in range(L):
        for n in range(1, L - i + 1):
            grid[n - 1, i] = stats.angular_distance(i, i + n - 1)
    image = ax2.imshow(grid.numpy(), origin="lower", aspect="auto", cmap="viridis",
                       extent=(-0.5, L - 0.5, 0.5, L + 0.5))
    ax2.set_xlabel("first layer of the block")
    ax2.set_ylabel("block length")
    ax2.set_title("angular distance arccos(cos(in, out)) / pi", fontsize=9)
    fig.colorbar(image, ax=ax2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def report(stats: LayerStatistics, shape: tuple[int, int, int], ranked: list[Split], paper: Split) -> dict:
    return {"shape": list(shape), "statistics": stats.as_dict(), "recommended": ranked[0].as_dict(),
            "paper_style": paper.as_dict(), "worst": ranked[-1].as_dict(), "candidates": len(ranked),
            "ranking": [s.as_dict() for s in ranked]}


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path
