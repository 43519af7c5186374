"""Every measured number in README.md comes from a committed record or table under results/.

A number here is a decimal (6.50, 27.2) or a duration (405 s, 59 min 18 s) in README.md's prose and
tables, outside code. It is found when results/ (tables, benchmark notes, run records; its hand-written
README excluded) holds the same number, or a longer one that rounds to it. Settings the README quotes
(a VAE's scale, the Python version) are found in the specs and pyproject.toml.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DECIMAL = re.compile(r"(?<![\w.\-/])(\d+\.\d+)(?![\w.]*\d)")
DURATION = re.compile(r"(?<![\w.])(\d[\d,]*)\s?(s|min)\b")
CORPUS_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def prose(markdown: str) -> str:
    """README.md without fenced code blocks, inline code and link targets."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def readme_numbers(markdown: str) -> set[str]:
    text = prose(markdown)
    return {m.group(1) for m in DECIMAL.finditer(text)} | {m.group(1).replace(",", "") for m in DURATION.finditer(text)}


def corpus_numbers(root: Path, settings: tuple[Path, ...] = ()) -> list[float]:
    out = []
    for path in [*root.rglob("*"), *settings]:
        if path.is_file() and path.suffix in {".md", ".csv", ".json", ".tex", ".yaml", ".toml"} \
                and path.name != "README.md":
            out += [float(x) for x in CORPUS_NUMBER.findall(path.read_text(errors="ignore").replace(",", ""))]
    return out


def found(number: str, corpus: list[float]) -> bool:
    decimals = len(number.split(".")[1]) if "." in number else 0
    target = float(number)
    return any(abs(round(y, decimals) - target) < 10 ** -(decimals + 3) for y in corpus)


def test_readme_numbers_come_from_results():
    corpus = corpus_numbers(REPO / "results", (*REPO.glob("experiments/**/*.yaml"), REPO / "pyproject.toml"))
    missing = sorted(n for n in readme_numbers((REPO / "README.md").read_text()) if not found(n, corpus))
    assert not missing, f"numbers in README.md that no committed record or table under results/ holds: {missing}"


def test_the_check_catches_an_invented_number(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| shortcut | 2.34 ± 0.10 |\n")
    (tmp_path / "r.json").write_text('{"value": 6.4987, "train_s": 424.2}')
    corpus = corpus_numbers(tmp_path)
    readme = "Shortcut scores 2.34 and 6.50 (`--set lr=1.5e-3` in code is ignored), trains in 424 s, not 405 s."
    assert sorted(n for n in readme_numbers(readme) if not found(n, corpus)) == ["405"]
