"""Question files in, JSONL records out: the small I/O layer every distill stage shares.

`JsonlLog` is how long jobs never lose data: one record per line, flushed and fsynced as soon
as it is complete; on reopen, a torn last line (the process died mid-write) is cut off and the
ids already present are skipped, so a rerun redoes nothing finished and duplicates nothing."""

from __future__ import annotations

import gzip
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from attar.distill.scoring import kind_of


@dataclass
class Question:
    id: str
    question: str
    answer: str
    kind: str  # "numeric", "math" or "factual": how answers are scored


def load_questions(path: str | os.PathLike, limit: int | None = None) -> list[Question]:
    """The paper's JSON files ({"metadata", "examples": [...]}) or JSONL ({"id", "question", "answer"})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"question file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            rows, name = [json.loads(line) for line in text.splitlines() if line.strip()], path.stem
        else:
            data = json.loads(text)
            rows = data["examples"]
            info = data.get("metadata", {}).get("dataset_info", {})
            name = info.get("name") or path.stem
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: expected JSON with an \"examples\" list, or JSONL of questions") from None
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise ValueError(f"{path}: example {i} has no \"question\" and \"answer\"")
        kind = row.get("kind") or kind_of(str(row.get("dataset_name") or name))
        out.append(Question(str(row.get("id", i)), str(row["question"]), str(row["answer"]), kind))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


class JsonlLog:
    """Append-only JSONL keyed by "id", safe to kill at any moment and reopen."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        good = 0
        if self.path.exists():
            data = self.path.read_bytes()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                self.records[str(record["id"])] = record
                good += len(line)
            if good < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(good)  # a torn last line from a crash
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def __contains__(self, id_: str) -> bool:
        return str(id_) in self.records

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=repr) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.records[str(record["id"])] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file, gzip-compressed if its name ends in .gz."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
