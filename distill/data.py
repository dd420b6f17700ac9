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
from typing import Callable

from attar.distill.scoring import kind_of


@dataclass
class Question:
    id: str
    question: str
    answer: str
    kind: str  # "numeric", "math" or "factual": how answers are scored


MAX_QUESTION_FILE = 256 << 20  # a question file is read whole (the paper's are one JSON document)


def load_questions(path: str | os.PathLike, limit: int | None = None) -> list[Question]:
    """The paper's JSON files ({"metadata", "examples": [...]}) or JSONL ({"id", "question", "answer"})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"question file not found: {path}")
    if path.stat().st_size > MAX_QUESTION_FILE:
        raise ValueError(f"{path}: larger than {MAX_QUESTION_FILE >> 20} MiB; split it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
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


def check_messages(messages: object) -> None:
    """A conversation as attar stores it: a list of {"role", "content"} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError("each message needs a role (system, user or assistant) and text content")


MAX_LINE_BYTES = 64 << 20  # a record longer than this is refused, not read


def read_jsonl(path: str | os.PathLike, check: Callable[[dict], None] | None = None) -> list[dict]:
    """The records of a JSONL file (gzip-compressed if its name ends in .gz), read line by line;
    a line that is not a JSON object, or that `check` refuses (a ValueError), is a ValueError
    naming the file and line."""
    path = Path(path)
    rows = []
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            line_no = 0
            while line := f.readline(MAX_LINE_BYTES + 1):
                line_no += 1
                if len(line) > MAX_LINE_BYTES:
                    raise ValueError(f"{path}:{line_no}: line longer than {MAX_LINE_BYTES >> 20} MiB")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    raise ValueError(f"{path}:{line_no}: not a JSON record") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{line_no}: a record must be a JSON object")
                if check is not None:
                    try:
                        check(row)
                    except ValueError as exc:
                        raise ValueError(f"{path}:{line_no}: {exc}") from None
                rows.append(row)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    return rows


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def claim_folder(folder: str | os.PathLike, made_by: dict, what: str, record: str = "made_by.json",
                 outputs: tuple[str, ...] = ()) -> None:
    """Key a resumable job's output folder by what produces it. The first run writes `record`;
    a later run with other settings is refused, so results of two models (or question sets)
    are never mixed in one folder. A folder that holds `outputs` but no record is refused too."""
    folder = Path(folder)
    file = folder / record
    if file.is_file():
        try:
            old = json.loads(file.read_text())
        except (OSError, ValueError):
            raise ValueError(f"{file}: unreadable; this folder's {what} cannot be matched to their run") from None
        changed = [k for k in made_by if old.get(k) != made_by[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"{folder} holds {what} made with {k} {old.get(k)!r}, not {made_by[k]!r}; "
                             "use another --out (or delete the folder)")
        return
    if any((folder / name).exists() for name in outputs):
        raise ValueError(f"{folder} holds {what} with no record of what made them; use another --out")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(file, json.dumps(made_by, indent=2).encode())


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
