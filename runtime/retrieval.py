"""An on-device retrieval index behind the agent's `web_search` tool.

An index is a folder:
    manifest.json     embedder, dimension, count, format version
    passages.sqlite   every passage (key, id, title, text, embedded flag)
    vectors.usearch   HNSW graph over the embedded passages (f16 or i8)
    tokenizer.json    the embedder's tokenizer, so the index works offline

Building is two resumable phases: passages go into SQLite (INSERT OR IGNORE on id), then
pending passages are embedded in batches. At each checkpoint the vector file is saved to a
temp file and renamed, *then* the batch is marked embedded; on resume, keys already in the
vector file are skipped, so every passage ends up indexed exactly once whenever a build dies.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from attar.runtime.modeldir import ModelError, inside

# Load onnxruntime before usearch: importing them in the other order segfaults (usearch 2.26,
# onnxruntime 1.32), and usearch is imported lazily below.
import onnxruntime  # noqa: F401

FORMAT_VERSION = 1
WORDS_PER_PASSAGE = 100  # the DPR convention
CHECKPOINT_EVERY = 2048  # passages between saves of the vector file


class IndexError_(Exception):
    """A bad corpus or a broken index; the message is one line for the user."""


@dataclass
class Hit:
    id: str
    title: str
    text: str
    similarity: float


# -- corpus reading ---------------------------------------------------------------------------


MAX_LINE_BYTES = 64 << 20  # a JSONL line longer than this is refused, not read whole
READ_BLOCK = 1 << 20  # text files are read in blocks of this many characters


def read_corpus(path: str | os.PathLike) -> Iterator[dict]:
    """Passages from a JSONL file ({"id", "title", "text"}) or a folder of .txt/.md files, read as
    a stream: a long text becomes passages of WORDS_PER_PASSAGE words (ids `ID#N`), so memory
    stays bounded by a passage, not by a file. A folder is walked without following links: a
    linked file or folder is skipped and said to be (copy it into the folder to include it)."""
    path = Path(path)
    if not path.exists():
        raise IndexError_(f"corpus not found: {path}")
    if path.is_dir():
        yield from _read_folder(path)
        return
    if not path.is_file():
        raise IndexError_(f"corpus is not a regular file: {path}")
    with open(path, "rb") as f:
        line_no = 0
        while line := f.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise IndexError_(f"{path}:{line_no}: line longer than {MAX_LINE_BYTES >> 20} MiB")
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                doc_id, title, text = str(row["id"]), str(row.get("title", "")), row["text"]
                if not isinstance(text, str) or not doc_id:
                    raise TypeError
            except UnicodeDecodeError:
                raise IndexError_(f"{path}:{line_no}: not UTF-8 text") from None
            except (ValueError, KeyError, TypeError, AttributeError):
                raise IndexError_(f"{path}:{line_no}: expected a JSON object with \"id\" and \"text\"") from None
            yield from _passages(doc_id, title, [text], numbered=False)


def _passages(doc_id: str, title: str, blocks: Iterable[str], numbered: bool = True) -> Iterator[dict]:
    """A document as passages of WORDS_PER_PASSAGE words, `ID#N`; with `numbered=False` a document
    of one passage keeps its id as is. The first passage waits until it is known whether a second
    follows; every other one is yielded as soon as it is whole."""
    texts = _word_chunks(blocks)
    first = next(texts, None)
    if first is None:
        return
    second = next(texts, None)
    if second is None:
        yield {"id": f"{doc_id}#0" if numbered else doc_id, "title": title, "text": first}
        return
    for n, text in enumerate(itertools.chain([first, second], texts)):
        yield {"id": f"{doc_id}#{n}", "title": title, "text": text}


def _word_chunks(blocks: Iterable[str]) -> Iterator[str]:
    words: list[str] = []
    for block in blocks:
        for match in re.finditer(r"\S+", block):
            words.append(match.group())
            if len(words) == WORDS_PER_PASSAGE:
                yield " ".join(words)
                words = []
    if words:
        yield " ".join(words)


def _read_folder(root: Path) -> Iterator[dict]:
    skipped: list[str] = []
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into linked folders
        here = Path(folder)
        skipped += [str((here / d).relative_to(root)) + "/" for d in dirs if (here / d).is_symlink()]
        dirs.sort()
        for name in sorted(files):
            file = here / name
            if file.suffix.lower() not in (".txt", ".md"):
                continue
            if file.is_symlink() or not file.is_file():  # a link, a device, a FIFO: never opened
                skipped.append(str(file.relative_to(root)))
                continue
            rel = file.relative_to(root).as_posix()
            yield from _passages(rel, file.stem.replace("_", " "), _blocks(file))
    if skipped:
        print(f"skipped {len(skipped)} linked or special file(s) in {root} (links are not followed; copy a "
              f"file into the folder to index it): {', '.join(skipped[:5])}", file=sys.stderr)


def _blocks(file: Path) -> Iterator[str]:
    """A text file in blocks of whole words (a word cut by a block boundary is carried over)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        carry = ""
        while block := f.read(READ_BLOCK):
            block = carry + block
            cut = max(block.rfind(" "), block.rfind("\n"))
            carry, block = (block[cut:], block[:cut]) if cut > 0 else ("", block)
            yield block
        yield carry


# -- the index --------------------------------------------------------------------------------


class Index:
    def __init__(self, path: Path, manifest: dict, db: sqlite3.Connection, vectors, embedder):
        self.path, self.manifest, self.db, self.vectors, self._embedder = path, manifest, db, vectors, embedder

    # opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, view: bool = True, embedder=None) -> "Index":
        """Open for search. `view=True` memory-maps the vectors, so a big index opens at once."""
        from usearch.index import Index as UIndex

        from attar.runtime.embedder import NAME

        path = Path(path)
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise IndexError_(f"index {path} is incomplete (a build or add was interrupted or failed); run the "
                              f"same `attar index build CORPUS -o {path}` or `attar index add {path} CORPUS` again "
                              "to finish it")
        if manifest["embedder"] != NAME:
            raise IndexError_(f"index {path} was built with embedder {manifest['embedder']!r}; "
                              f"this attar embeds with {NAME!r}")
        vectors_file = path / "vectors.usearch"
        try:
            vectors = UIndex.restore(str(vectors_file), view=view) if vectors_file.exists() else None
        except Exception as exc:
            raise IndexError_(f"corrupt vector file {vectors_file}: {exc}") from None
        if vectors_file.exists() and vectors is None:
            raise IndexError_(f"corrupt vector file {vectors_file}")
        db = sqlite3.connect(path / "passages.sqlite", check_same_thread=False)
        return cls(path, manifest, db, vectors, embedder)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = _embedder(self.path)
        return self._embedder

    def __len__(self) -> int:
        return 0 if self.vectors is None else len(self.vectors)

    # searching ---------------------------------------------------------------------------

    def search(self, query: str, k: int = 3) -> list[Hit]:
        if not query or not query.strip():
            return []
        if self.vectors is None or len(self.vectors) == 0:
            return []
        vector = self.embedder.embed([query])[0]
        matches = self.vectors.search(vector, k, exact=False)
        hits = []
        for key, distance in zip(matches.keys.tolist(), matches.distances.tolist()):
            row = self.db.execute("SELECT id, title, text FROM passages WHERE key = ?", (int(key),)).fetchone()
            if row:
                hits.append(Hit(row[0], row[1], row[2], round(1.0 - float(distance), 4)))
        return hits

    def close(self) -> None:
        self.db.close()


def format_hits(hits: list[Hit]) -> str:
    """The seed's web_search format: what trained students saw during distillation."""
    if not hits:
        return "No documents found."
    return "\nRetrieved documents:" + "".join(
        f"\n\n===== Document {i}, similarity: {h.similarity:.2f} =====\n{h.title}\n{h.text}" for i, h in enumerate(hits)
    )


def web_search_tool(index: Index, k: int = 3) -> Callable[[str], str]:
    def web_search(query: str) -> str:
        """Search the knowledge base and return the top 3 passages for the query."""
        return format_hits(index.search(str(query), k))

    return web_search


# -- building ---------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict:
    """An index's manifest, checked: an index folder is untrusted input like any other file."""
    file = _inside(path, "manifest.json")
    if not file.is_file():
        raise IndexError_(f"not an attar index (no manifest.json): {path}")
    try:
        if file.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        manifest = json.loads(file.read_text())
        manifest["embedder"], manifest["dim"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IndexError_(f"corrupt manifest: {file}") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise IndexError_(f"index format {manifest.get('version')} is not supported (expected {FORMAT_VERSION})")
    connectivity = manifest.get("connectivity", 16)
    if (manifest["dim"] != 384 or manifest.get("dtype") not in ("f16", "i8", "f32")
            or not isinstance(connectivity, int) or not 2 <= connectivity <= 256):
        raise IndexError_(f"corrupt manifest: {file} (dim, dtype or connectivity out of range)")
    return manifest


def _inside(path: Path, name: str) -> Path:
    """A file of the index folder, which must not lead out of it."""
    try:
        return inside(path, name, "index file")
    except ModelError as exc:
        raise IndexError_(str(exc)) from None


def _embedder(path: Path):
    """The embedder with the index's own tokenizer, or one line saying what is wrong with it."""
    from attar.runtime.embedder import Embedder

    try:
        return Embedder(tokenizer_path=_inside(path, "tokenizer.json"))
    except IndexError_:
        raise
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        raise IndexError_(f"{path / 'tokenizer.json'}: cannot read the index's tokenizer: {str(exc)[:200]}") from None


def _write_json_atomic(file: Path, data: dict) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, file)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path / "passages.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS passages (key INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, "
               "title TEXT, text TEXT NOT NULL, embedded INTEGER NOT NULL DEFAULT 0)")
    return db


def build_index(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    connectivity: int = 16,
    embedder=None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Create OUT from CORPUS, or resume an interrupted build of it. Returns the manifest."""
    from attar.runtime.embedder import NAME, tokenizer_file

    out = Path(out)
    created = not out.exists()
    if out.exists() and (out / "manifest.json").is_file():
        manifest = _read_manifest(out)
        if manifest.get("complete"):
            raise IndexError_(f"index already exists: {out} (use `attar index add` to add documents)")
    elif out.exists() and any(out.iterdir()):
        raise IndexError_(f"output folder exists and is not an attar index: {out}")
    else:
        if dtype not in ("f16", "i8", "f32"):
            raise IndexError_(f"unknown vector type {dtype!r}; choose f16, i8 or f32")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(tokenizer_file(), out / "tokenizer.json")
        manifest = {"version": FORMAT_VERSION, "embedder": NAME, "dim": 384, "metric": "cos", "dtype": dtype,
                    "connectivity": connectivity, "count": 0, "complete": False}
        _write_json_atomic(out / "manifest.json", manifest)
    try:
        return add_documents(out, corpus, embedder=embedder, batch_size=batch_size, progress=progress)
    except IndexError_:
        if created and _read_manifest(out).get("count", 0) == 0:
            shutil.rmtree(out, ignore_errors=True)  # nothing was indexed (an empty or unreadable corpus)
        raise


def add_documents(
    index_dir: str | os.PathLike,
    corpus: str | os.PathLike | Iterable[dict],
    *,
    embedder=None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Add passages (new ids only) to an index and embed everything pending (so it also finishes
    an interrupted build or add)."""
    from tqdm import tqdm
    from usearch.index import Index as UIndex

    index_dir = Path(index_dir)
    manifest = _read_manifest(index_dir)
    db = _connect(index_dir)
    try:
        passages = read_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else corpus
        # The whole corpus is read in one transaction: a bad line anywhere adds nothing at all.
        # Then the index is marked incomplete until every new passage is embedded, so a failure
        # while embedding leaves an index that says so (and resumes), never one that silently
        # misses passages.
        added = duplicates = 0
        with db:
            for chunk in _chunks(passages, 1000):
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO passages (id, title, text) VALUES (:id, :title, :text)", chunk)
                inserted = db.total_changes - before
                added, duplicates = added + inserted, duplicates + len(chunk) - inserted
        if duplicates:
            print(f"skipped {duplicates} passage(s) whose id is already in the index (ids are unique; "
                  "give a changed passage a new id)", file=sys.stderr)
        total = db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
        if total == 0:
            raise IndexError_(f"the corpus is empty: {corpus}")
        if added and manifest.get("complete"):
            manifest["complete"] = False
            _write_json_atomic(index_dir / "manifest.json", manifest)

        vectors_file = index_dir / "vectors.usearch"
        vectors = UIndex(ndim=manifest["dim"], metric="cos", dtype=manifest["dtype"],
                         connectivity=manifest["connectivity"])
        if vectors_file.exists():
            try:
                vectors.load(str(vectors_file))
            except Exception as exc:  # usearch raises RuntimeError and others for a damaged file
                raise IndexError_(f"corrupt vector file {vectors_file}: {str(exc)[:200]}") from None
        if embedder is None:
            embedder = _embedder(index_dir)

        pending = [k for (k,) in db.execute("SELECT key FROM passages WHERE embedded = 0 ORDER BY key")]
        bar = tqdm(total=len(pending), unit="passage", desc="embedding", disable=not progress)
        done_keys: list[int] = []
        began = time.perf_counter()
        for keys in _chunks(pending, batch_size):
            marks = ",".join("?" * len(keys))
            rows = db.execute(f"SELECT key, title, text FROM passages WHERE key IN ({marks}) ORDER BY key", keys)
            rows = [r for r in rows if not vectors.contains(r[0])]  # saved before a crash: skip
            if rows:
                embedded = embedder.embed([f"{title}. {text}" if title else text for _, title, text in rows])
                vectors.add(np.array([r[0] for r in rows], dtype=np.uint64), embedded)
            done_keys += keys
            bar.update(len(keys))
            if len(done_keys) >= CHECKPOINT_EVERY:
                _checkpoint(db, vectors, vectors_file, done_keys)
        _checkpoint(db, vectors, vectors_file, done_keys)
        bar.close()
        # Keys of a crashed run that reached the vector file but not the flag are flagged now.
        with db:
            db.execute("UPDATE passages SET embedded = 1 WHERE embedded = 0")
        manifest.update(count=len(vectors), complete=True, build_seconds=round(time.perf_counter() - began, 1),
                        added=added, duplicates_skipped=duplicates)
        _write_json_atomic(index_dir / "manifest.json", manifest)
        return manifest
    finally:
        db.close()


def _checkpoint(db: sqlite3.Connection, vectors, vectors_file: Path, keys: list[int]) -> None:
    if not keys:
        return
    tmp = vectors_file.with_suffix(".tmp")
    vectors.save(str(tmp))
    os.replace(tmp, vectors_file)
    with db:
        db.executemany("UPDATE passages SET embedded = 1 WHERE key = ?", [(k,) for k in keys])
    keys.clear()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

