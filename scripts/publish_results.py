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

ORDER = ("two-models", "many-models", "skill-transfer", "widths", "timing", "transformers")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def publish(source: Path, docs: Path, readme: Path) -> None:
    sections = []
    for name in ORDER:
        folder = source / name
        if not (folder / "report.md").exists():
            continue
        target = docs / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        text = (folder / "report.md").read_text()
        text = re.sub(r"^(#+)", r"\1##", text, flags=re.M)
        text = re.sub(r"\]\(([^)/]+\.png)\)", rf"](docs/results/{name}/\1)", text)
        sections.append(text.strip())
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n\n" + "\n\n".join(sections) + "\n\n" + body[end:])


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    publish(Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs/experiments", root / "docs/results", root / "README.md")
