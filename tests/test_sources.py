"""Every source file compiles with warnings as errors: an invalid escape such as ``\\p`` in a
non-raw docstring is a SyntaxWarning today (an error in a future Python), and a valid one such as
``\\b`` in ``\\beta`` silently turns the math into a control character."""

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for folder in ("otfuse", "tests", "benchmarks", "scripts")
    for p in (ROOT / folder).rglob("*.py")
)
CONTROL = {"\b", "\f", "\v", "\a"}  # what \b, \f, \v, \a in a non-raw string become


def _problem(path: Path) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            code = compile(path.read_text(), str(path), "exec")
        except SyntaxError as error:
            return f"{path.relative_to(ROOT)}: {error.msg}"
    if any(isinstance(c, str) and CONTROL & set(c) for c in code.co_consts):
        return f"{path.relative_to(ROOT)}: a control character in a module-level string"
    return None


def test_sources_compile_without_escape_warnings_or_control_characters():
    assert len(SOURCES) > 50
    assert [p for p in map(_problem, SOURCES) if p] == []
