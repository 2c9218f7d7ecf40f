"""Copy the experiments' full-run outputs into docs/results/ and their reports into the README.

    .venv/bin/python scripts/publish_results.py [runs/experiments]

Every ``runs/experiments/NAME/`` (report.md, results.json, PNGs) is copied to ``docs/results/NAME/``,
and the reports replace what stands between the README's markers ``<!-- results:begin -->`` and
``<!-- results:end -->``, with their headings pushed down two levels and image paths rewritten.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ORDER = ("two-models", "many-models", "skill-transfer", "widths", "timing", "transformers", "federated")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def publish(source: Path, docs: Path, readme: Path) -> list[str]:
    """Copy every experiment with a report under ``source`` to ``docs``, then rebuild the README's
    results from every report under ``docs`` (experiments not re-run keep their published report).
    Returns the names copied; raises SystemExit with one line when ``source`` holds no report."""
    copied = [name for name in ORDER if (source / name / "report.md").exists()]
    if not copied:
        raise SystemExit(f"publish_results: no experiment report under {source}")
    for name in copied if source.resolve() != docs.resolve() else ():
        shutil.rmtree(docs / name, ignore_errors=True)
        shutil.copytree(source / name, docs / name)
    sections = []
    for name in ORDER:
        report = docs / name / "report.md"
        if report.exists():
            text = re.sub(r"^(#+)", r"\1##", report.read_text(), flags=re.M)
            text = re.sub(r"\]\(([^)/]+\.png)\)", rf"](docs/results/{name}/\1)", text)
            sections.append(text.strip())
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n\n" + "\n\n".join(sections) + "\n\n" + body[end:])
    return copied


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs/experiments"
    print("published:", ", ".join(publish(source, root / "docs/results", root / "README.md")))
