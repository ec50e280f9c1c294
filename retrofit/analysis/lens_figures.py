"""Figures of inspect_recurrence.py: the per-iteration readout heatmap and the latent trajectories' PCA.

numpy + matplotlib only (the tables come in as arrays, see retrofit/evaluate/logit_lens.py). Both
figures show at most `MAX_SEQUENCES_SHOWN` sequences and the heatmap at most `MAX_TOKENS_SHOWN`
tokens of each, so a long row stays legible; the JSON table holds everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrofit.analysis.plotting import apply_style, plt, save_figure

MAX_SEQUENCES_SHOWN = 4
MAX_TOKENS_SHOWN = 64
# Top-1 tokens are written into the cells only when cells are large enough to read.
ANNOTATE_MAX_TOKENS = 40
ANNOTATE_MAX_ITERATIONS = 16
KL_FLOOR = 1e-6  # the colour scale's floor: KL is exactly 0 at the last iteration


@dataclass
class LensPanel:
    """What the figures need of one sequence (R iterations, L tokens)."""

    title: str
    tokens: list[str]  # the input tokens, decoded
    top1: list[list[str]]  # (R, L) top-1 token per iteration, decoded
    entropy: np.ndarray  # (R, L)
    kl_to_final: np.ndarray  # (R, L)
    states: np.ndarray  # (R, L, h)


def short_label(text: str, width: int) -> str:
    """A token as a tick or cell label: whitespace made visible, cut to `width` characters."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u00b7")
    # Byte tokens of an untrained or byte-level vocabulary decode to control characters no font has.
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= width else shown[: width - 1] + "\u2026"


def pca_2d(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (R, L, h) states on their first two principal components (fit over all R * L
    states): returns (R, L, 2) coordinates and the two components' fractions of the variance."""
    R, L, h = states.shape
    flat = states.reshape(R * L, h).astype(np.float64)
    centred = flat - flat.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    if components.shape[0] < 2:  # a single state or h = 1: pad with a zero direction
        components = np.vstack([components, np.zeros((2 - components.shape[0], h))])
    variance = singular**2
    explained = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    explained = np.pad(explained, (0, 2 - len(explained)))
    return (centred @ components.T).reshape(R, L, 2), explained


def _heatmap_axis(fig, ax, values, cmap: str, label: str, panel: LensPanel, shown: int, annotate: bool):
    R = values.shape[0]
    image = ax.imshow(values[:, :shown], aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                      extent=(-0.5, shown - 0.5, 0.5, R + 0.5))
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
    bar.set_label(label, fontsize=7)
    bar.formatter.set_useOffset(False)  # entropies near log(V) differ in the 4th digit: show them whole
    ax.set_ylabel("Iteration")
    ax.set_yticks(range(1, R + 1) if R <= 16 else np.linspace(1, R, 5).round().astype(int))
    ax.grid(False)
    if annotate:
        for i in range(R):
            for t in range(shown):
                ax.text(t, i + 1, short_label(panel.top1[i][t], 4), ha="center", va="center", fontsize=5, color="white")


def heatmap_figure(panels: list[LensPanel]):
    """Per sequence two panels, tokens across and iterations up: log10 KL(p_R || p_i) with the
    top-1 token written in (when the grid is small), and the entropy of p_i."""
    apply_style(font_size=9)
    panels = panels[:MAX_SEQUENCES_SHOWN]
    longest = min(MAX_TOKENS_SHOWN, max(len(p.tokens) for p in panels))
    R = panels[0].entropy.shape[0]
    width = max(6.0, 0.2 * longest + 2.5)
    height_per_axis = max(1.6, 0.16 * R + 0.9)
    fig, axes = plt.subplots(2 * len(panels), 1, figsize=(width, height_per_axis * 2 * len(panels)), squeeze=False)
    for n, panel in enumerate(panels):
        shown = min(MAX_TOKENS_SHOWN, len(panel.tokens))
        annotate = shown <= ANNOTATE_MAX_TOKENS and R <= ANNOTATE_MAX_ITERATIONS
        kl_ax, entropy_ax = axes[2 * n, 0], axes[2 * n + 1, 0]
        kl = np.log10(np.maximum(panel.kl_to_final, KL_FLOOR))
        _heatmap_axis(fig, kl_ax, kl, "viridis", "log10 KL to final (nats)", panel, shown, annotate)
        _heatmap_axis(fig, entropy_ax, panel.entropy, "magma", "entropy (nats)", panel, shown, False)
        cut = f", first {shown} of {len(panel.tokens)} tokens" if shown < len(panel.tokens) else ""
        kl_ax.set_title(f"{panel.title}{cut}: KL(p_final || p_i), top-1 token in each cell" if annotate
                        else f"{panel.title}{cut}: KL(p_final || p_i)", fontsize=9)
        entropy_ax.set_title(f"{panel.title}: entropy of p_i", fontsize=9)
        for ax in (kl_ax, entropy_ax):
            ax.set_xlim(-0.5, shown - 0.5)
            if shown <= MAX_TOKENS_SHOWN:
                ax.set_xticks(range(shown))
                ax.set_xticklabels([short_label(t, 8) for t in panel.tokens[:shown]], rotation=90, fontsize=6)
        entropy_ax.set_xlabel("Input token (the readout predicts the token after it)")
    fig.tight_layout()
    return fig


def pca_figure(panels: list[LensPanel]):
    """Per sequence, the states s_1..s_R of every token projected on the sequence's first two
    principal components: one line per token (colour = position), o = s_1, x = s_R."""
    apply_style(font_size=9)
    panels = panels[:MAX_SEQUENCES_SHOWN]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 0.8, 4.0), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis")
    longest = max(len(p.tokens) for p in panels)
    for ax, panel in zip(axes[0], panels):
        coords, explained = pca_2d(panel.states)
        L = coords.shape[1]
        for t in range(L):
            color = cmap(t / max(longest - 1, 1))
            ax.plot(coords[:, t, 0], coords[:, t, 1], color=color, linewidth=0.8, alpha=0.8)
            ax.plot(coords[0, t, 0], coords[0, t, 1], "o", color=color, markersize=2.5)
            ax.plot(coords[-1, t, 0], coords[-1, t, 1], "x", color=color, markersize=3.5)
        ax.set_title(f"{panel.title} ({L} tokens, {coords.shape[0]} iterations)", fontsize=9)
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)")
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(longest - 1, 1)))
    fig.colorbar(scale, ax=list(axes[0]), pad=0.02, fraction=0.03).set_label("Token position")
    return fig


def write_figures(panels: list[LensPanel], out_dir: str | Path) -> list[Path]:
    """heatmap.png and pca.png in `out_dir` (each written atomically)."""
    written = save_figure(heatmap_figure(panels), out_dir, "heatmap", formats=("png",))
    written += save_figure(pca_figure(panels), out_dir, "pca", formats=("png",))
    return written
