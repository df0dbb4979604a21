"""What every benchmark reports besides its numbers: the machine, the load, and where results go
(a JSON file under bench/results/ and a generated section of docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The checkout this package runs from, if it is one; an installed copy has no docs/ to update.
_ROOT = Path(__file__).resolve().parent.parent
DOCS = _ROOT / "docs" / "benchmarks.md"
RESULTS = _ROOT / "bench" / "results"


def in_checkout() -> bool:
    return (_ROOT / "pyproject.toml").is_file() and DOCS.parent.is_dir()


def machine() -> dict[str, object]:
    """CPU model, cores, Python and kernel: enough to tell which machine a result came from."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def machine_slug(info: dict[str, object]) -> str:
    """A file-name-safe name for the machine, e.g. ``amd-epyc-2c``."""
    cpu = re.sub(r"\(.*?\)|\bcpu\b|\bprocessor\b|@.*", " ", str(info["cpu"]).lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu"
    return f"{cpu}-{info['cores']}c"


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (a noisy neighbour shows here)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_line(info: dict[str, object], load_before: list[float], load_after: list[float]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, Linux {info['kernel']}; "
        f"load average (1/5/15 min) {_load_text(load_before)} before, {_load_text(load_after)} after."
    )


def _load_text(values: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in values)


# A table column: the row's key, the title, and a format; "{}" marks a text column (left-aligned).
Column = tuple[str, str, str]


def text_table(rows: list[dict[str, Any]], columns: tuple[Column, ...]) -> str:
    """The rows as aligned text, numbers to the right."""
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = [fmt == "{}" for _, _, fmt in columns]

    def aligned(line: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if is_text else cell.rjust(w) for cell, w, is_text in zip(line, widths, left, strict=True)
        )

    return "\n".join(map(aligned, cells))


def markdown_table(rows: list[dict[str, Any]], columns: tuple[Column, ...]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" if fmt == "{}" else "---:" for _, _, fmt in columns) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def verdict(target: dict[str, Any]) -> str:
    """met, not met, or "-" for a target this run could not measure (``met`` None)."""
    return {True: "met", False: "not met", None: "-"}[target["met"]]


def target_table(targets: list[dict[str, Any]], value: Callable[[Any], str] = str) -> list[str]:
    """Markdown lines of the targets: each goal, what was measured (``value`` formats it), met or not."""
    return [
        "| target | goal | measured | |",
        "|---|---|---:|---|",
        *(f"| {t['target']} | {t['goal']} | {value(t['value'])} | {verdict(t)} |" for t in targets),
    ]


def target_lines(targets: list[dict[str, Any]], value: Callable[[Any], str] = str) -> list[str]:
    """The targets as text lines, for the terminal."""
    return [f"target {t['target']}: {value(t['value'])} (goal {t['goal']}): {verdict(t)}" for t in targets]


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_section(name: str, markdown: str, path: Path = DOCS) -> None:
    """Replace the generated section ``name`` of ``path`` (between its BEGIN/END markers), or
    append it; the hand-written text around the markers is kept."""
    begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        path.write_text(pattern.sub(lambda _: block, text))
    else:
        path.write_text(text.rstrip() + "\n\n" + block + "\n")


def publish(name: str, info: dict, result: object, markdown: str, docs: Path = DOCS) -> None:
    """Write a full run's raw JSON to bench/results/<name>-<machine>.json and its table into the
    generated section ``name`` of ``docs`` (only from a checkout: an installed copy has no docs)."""
    if not in_checkout():
        return
    path = RESULTS / f"{name}-{machine_slug(info)}.json"
    write_json(path, result)
    write_section(name, markdown, path=docs)
    print(f"wrote {path} and {docs}", file=sys.stderr)
