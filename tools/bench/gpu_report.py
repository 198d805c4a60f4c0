"""The GPU benchmark's results as they come: every finished row is written at once, so a run stopped at any point
leaves what it measured.

Three files in the output folder, each complete after every row: benchmark-gpu.jsonl (one row a line, appended),
benchmark-gpu.json (header, facts and rows; replaced atomically) and benchmark-gpu.md (the same as a table).
No torch here: the parent process that watches the budget reads and writes these too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "benchmark-gpu"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Report:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.json_path = self.folder / f"{NAME}.json"
        self.md_path = self.folder / f"{NAME}.md"
        self.jsonl_path = self.folder / f"{NAME}.jsonl"
        self.data = json.loads(self.json_path.read_text()) if self.json_path.is_file() else None

    @classmethod
    def create(cls, folder: Path, header: dict) -> Report:
        folder.mkdir(parents=True, exist_ok=True)
        report = cls(folder)
        report.data = {**header, "facts": {}, "rows": []}
        report.jsonl_path.write_text("")
        report._save()
        return report

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def row(self, step: str) -> dict | None:
        return next((row for row in self.rows if row["step"] == step), None)

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl_path.open("a") as jsonl:
            jsonl.write(json.dumps(row) + "\n")
        self._save()

    def set_facts(self, **facts) -> None:
        self.data["facts"].update(facts)
        self._save()

    def _save(self) -> None:
        _replace(self.json_path, json.dumps(self.data, indent=2) + "\n")
        _replace(self.md_path, markdown(self.data) + "\n")


def _fact_lines(data: dict) -> list[str]:
    facts = data.get("facts", {})
    lines = [
        f"GPU benchmark ({data.get('shapes', '?')} shapes), {data.get('date', '')}, budget {data['budget_s']:.0f} s"
    ]
    if "device" in facts:
        lines.append(f"device: {facts['device']}; stack: {facts.get('stack', '?')}")
    if "write_weights_s" in facts:
        lines.append(
            f"random weights: {facts.get('weights_gib', float('nan')):.2f} GiB written in {facts['write_weights_s']:.1f}"
            f" s ({facts.get('weights_built_on', '?')})"
        )
    if "matmul_tflops" in facts:
        lines.append(f"measured matrix rate ({facts.get('matmul_what', '')}): {facts['matmul_tflops']:.3g} TFLOP/s")
    return lines


def markdown(data: dict) -> str:
    lines = _fact_lines(data)
    lines += ["", "| # | measure | result | status | step s |", "|---|---|---|---|---|"]
    for row in sorted(data["rows"], key=lambda row: row["id"]):  # "1" < "2a" < ... < "6c": the steps' order
        status = row["status"] if not row.get("reason") else f"{row['status']}: {row['reason']}"
        seconds = f"{row['seconds']:.1f}" if row.get("seconds") is not None else ""
        lines.append(f"| {row['id']} | {row['title']} | {row.get('summary', '')} | {status} | {seconds} |")
    return "\n".join(lines)
