"""The README and docs/ are claims users act on: links and section citations resolve, the repository
stands alone, the quickstart's stated time agrees everywhere, and the headline table matches the data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import PAPER_DATA, ROOT

TEXT_SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".ini", ".txt", ".toml", ".example", ""}
SKIP_DIRS = {".git", ".venv", "runs", "outputs", "figs", "logs", "__pycache__", ".pytest_cache", ".helpers"}


def repository_text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 1_000_000:
            files.append(path)
    return files


def markdown_files() -> list[Path]:
    return [p for p in repository_text_files() if p.suffix == ".md"]


def heading_anchors(markdown: Path) -> dict[str, str]:
    """GitHub's anchor slug -> heading text, for every heading outside code blocks."""
    anchors, in_code = {}, False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            title = m.group(1).strip()
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            anchors[slug] = title
    return anchors


def test_repository_stands_alone():
    """Nothing points at material outside the clone (the project's background folder)."""
    needles = ["../" + "shared", "shared/" + "paper_data", "REFERENCE" + ".md", "REFERENCE" + " §"]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in repository_text_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if any(n in line for n in needles)]
    assert not hits, "\n".join(hits)


def test_markdown_links_resolve():
    """Every relative link in README.md, docs/ and the other READMEs names an existing file and heading."""
    broken = []
    for md in markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (md.parent / file_part).resolve() if file_part else md
            if not path.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_code_citations_of_docs_resolve():
    """`docs/PAGE.md, Section` / `docs/PAGE.md (Section)` in code name an existing page and heading."""
    cited, broken = 0, []
    for path in repository_text_files():
        if path.suffix == ".md":
            continue
        for line in path.read_text(errors="replace").splitlines():
            for page, sections in re.findall(r"docs/([a-z_]+)\.md(?:, | \()?([^)\n]*)", line):
                cited += 1
                doc = ROOT / "docs" / f"{page}.md"
                if not doc.is_file():
                    broken.append(f"{path.relative_to(ROOT)}: docs/{page}.md does not exist")
                    continue
                titles = set(heading_anchors(doc).values())
                for section in filter(None, (s.strip() for s in sections.split(";"))):
                    if section[:1].isupper() or section in titles:
                        if section not in titles:
                            broken.append(f"{path.relative_to(ROOT)}: docs/{page}.md has no section {section!r}")
    assert cited >= 15, f"only {cited} citations of docs/ found: did the pattern change?"
    assert not broken, "\n".join(broken)


def test_readme_front_page():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    # .ci/run greps the fresh-machine test command; the quickstart command is the other one users copy.
    test_command = [line for line in lines if re.match(r"^python3 -m venv \.venv && .*pytest", line)]
    assert test_command == ["python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install"
                            " -r requirements-dev.txt && .venv/bin/python -m pytest -q tests"]
    assert ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -r requirements.txt"
            " && bash shells/quickstart.sh") in lines
    for page in ("model", "data", "training", "evaluation", "analysis", "cluster"):
        assert f"(docs/{page}.md)" in readme, f"README does not link docs/{page}.md"


def test_quickstart_time_agrees_with_measured_table():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / "shells" / "quickstart.sh").read_text()
    stated_readme = re.findall(r"Quickstart\n\nThe whole pipeline.*?about (\d+) minutes", readme, flags=re.S)
    stated_script = re.findall(r"defaults take about (\d+) minutes", script)
    assert stated_readme and stated_script and stated_readme == stated_script, (stated_readme, stated_script)
    total = int(re.search(r"\| \*\*total\*\* \| \| \*\*(\d+)\*\* \|", readme).group(1))
    rows = re.findall(r"^\| [a-z_, ]+ \| .+ \| (\d+) \|$", readme, flags=re.M)
    assert sum(map(int, rows)) == total, "the stage times do not add up to the total"
    assert abs(total / 60 - int(stated_readme[0])) <= 1, f"measured {total} s, stated about {stated_readme[0]} minutes"


def test_launchers_point_at_existing_scripts():
    """Paths to shells/ and scripts named in the launchers' comments exist (once: convert.sh did not)."""
    missing = []
    for launcher in (ROOT / "shells").rglob("*.sh"):
        for ref in re.findall(r"(?:shells|utils|convert_pretrained_model)/[\w/]+\.(?:sh|py)", launcher.read_text()):
            if not (ROOT / ref).is_file() and not (ROOT / f"{ref}.example").is_file():  # the user's copy
                missing.append(f"{launcher.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)


HEADLINE_FILES = {"TinyLlama-1.1B (4,8,4)": ("tinyllama_gsm8k_ablate_rec_long.jsonl", 50_000),
                  "Llama-3.2-1B (4,6,4)": ("tinyllama_gsm8k_llama_long_4_rec.jsonl", 48_000),
                  "OLMo-2-1B (4,6,4)": ("olmo_50k_steps.jsonl", 48_000)}


@pytest.mark.parametrize("model", list(HEADLINE_FILES))
def test_headline_table_matches_the_shipped_data(model):
    analysis = (ROOT / "docs" / "analysis.md").read_text()
    row = next(line for line in analysis.splitlines() if line.startswith(f"| {model} |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    file_name, step = HEADLINE_FILES[model]
    rows = [json.loads(line) for line in (PAPER_DATA / file_name).read_text().splitlines() if line.strip()]
    # columns: recurrent at test recurrence 1, 8, 32 (trained to 32), then the static model
    for cell, (train_rec, num_rec) in zip(cells, [(32, 1), (32, 8), (32, 32), (1, 1)], strict=True):
        stated = [float(x) for x in cell.split(" / ")]
        # a set: the authors' files repeat a few rows verbatim
        actual = [{100 * r["acc"] for r in rows if r["chkpt"] == step and r["train_rec"] == train_rec
                   and r["num_rec"] == num_rec and r["task"] == task} for task in ("gsm8k_cot_sean", "minerva_math")]
        assert [len(a) for a in actual] == [1, 1], (model, train_rec, num_rec, actual)
        actual = [a.pop() for a in actual]
        assert [round(a, 1) for a in actual] == stated, (model, train_rec, num_rec, actual)


def test_readme_quickstart_figures_are_the_reference_runs():
    """The README's quickstart results and stage times are those of bench/quickstart_summary.md, the
    summary.md of a default `bash shells/quickstart.sh` (tests/test_quickstart.py checks that a
    fresh summary reads the same way)."""
    from utils.quickstart_summary import summary_figures

    readme = (ROOT / "README.md").read_text()
    reference = (ROOT / "bench" / "quickstart_summary.md").read_text()
    figures = summary_figures(reference)
    m = re.search(r"falls from ([\d.]+) at r=1 to ([\d.]+) at r≥(\d+), while the baseline, which kept all 8 layers, "
                  r"reaches ([\d.]+) \(GSM8K-style accuracy (\d+)[-–](\d+)% vs (\d+)%", " ".join(readme.split()))
    assert m, "the README's quickstart result sentence changed: update this test with it"
    stated = [float(x) for x in m.groups()]
    assert stated == [figures["loss_r1"], figures["loss_lowest"], figures["lowest_from_r"], figures["loss_baseline"],
                      *figures["gsm8k_recurrent"], figures["gsm8k_baseline"]]
    seconds = figures["seconds"]
    rows = dict(re.findall(r"^\| ([a-z_, ]+) \| .+ \| (\d+) \|$", readme, flags=re.M))
    expected = {"data, pack, parquet": seconds["data"] + seconds["pack"] + seconds["parquet"],
                **{stage: seconds[stage] for stage in ("pretrain", "convert", "train", "val_loss", "lm_eval")}}
    for stage, value in expected.items():
        assert abs(int(rows[stage]) - value) <= 1, (stage, rows[stage], value)  # the summary rounds each part
    commit = re.search(r"at commit ([0-9a-f]{7,}): its summary is\s+\[bench/quickstart_summary\.md\]", readme)
    assert commit and commit.group(1) in reference, "the README and the reference summary name the same commit"
