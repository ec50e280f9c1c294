"""paper_plots/plot.py draws every figure from the shipped paper data (paper_plots/data/); the schedule figure's numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from conftest import PAPER_DATA, ROOT


def _load(name: str, path: Path):
    """Import a script by path under a unique name (paper_plots/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


paper_plot = _load("paper_plots_plot", ROOT / "paper_plots" / "plot.py")
scheduling_options = _load("paper_plots_scheduling_options", ROOT / "paper_plots" / "scheduling_options.py")


EXPECTED = [f"{family}_{task}_flops_and_recurrence" for family in ("tinyllama", "llama", "olmo")
            for task in ("gsm8k", "math")] + [
    "final_checkpoint_bars", "data_mix_vs_step", "data_mix_vs_recurrence", "pretrained_vs_random",
    "curriculum_shape", "extend_prelude_coda", "loop_whole_model", "scheduling_options"]


def test_paper_plots_writes_every_figure(tmp_path, capsys):
    """From a clone, with no --data_dir: the default is the shipped copy of the authors' results."""
    assert paper_plot.DEFAULT_DATA_DIR == PAPER_DATA
    out = tmp_path / "figs"
    assert paper_plot.main(["--out_dir", str(out), "--format", "png"]) == 0
    printed = capsys.readouterr().out.split()
    written = [Path(p) for p in printed]
    assert sorted(p.name for p in written) == sorted(f"{name}.png" for name in EXPECTED)
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, path
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temp files left


def test_paper_plots_bad_data_dir(tmp_path, capsys):
    assert paper_plot.main(["--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert paper_plot.main(["--data_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "holds none of the paper's files" in capsys.readouterr().err


def test_clean_label():
    assert paper_plot.clean_label("TinyLlama-1.1b-3T\nStatic Depth - Two Phase") == "TinyLlama static depth - Two Phase"
    assert paper_plot.clean_label("Olmo-2-step1907359\nStatic Depth") == "Olmo static depth"
    assert paper_plot.clean_label("4,6,4 75 sqrt (Train Recurrence=8)") == "4,6,4 (Train Recurrence=8)"


def test_scheduling_options_curves_and_figure(tmp_path):
    # 8 steps, curriculum over 50% (4 steps) to 4. linear: ceil(4 t / 4) = t, then 4.
    # 1-sqrt: ceil(4 (1 - sqrt(1 - t/4))) = ceil(0.54), ceil(1.17), ceil(2) = 1, 2, 2, then 4.
    from retrofit.analysis.plotting import schedule_curves

    curves = schedule_curves(max_steps=8, warmup=0.5, max_mean_rec=4)
    assert curves["linear"] == ([1, 2, 3, 4, 4, 4, 4, 4], 26)
    assert curves["1-sqrt"] == ([1, 2, 2, 4, 4, 4, 4, 4], 25)
    assert scheduling_options.main(["--out_dir", str(tmp_path), "--max_steps", "400", "--format", "pdf"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["scheduling_options.pdf"]
    assert (tmp_path / "scheduling_options.pdf").read_bytes().startswith(b"%PDF")
