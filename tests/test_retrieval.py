"""Retrieval: a real usearch index over real text, embedded by a real ONNX model."""

import json
import signal
import subprocess
import sys
import time

import pytest

from attar.runtime import retrieval
from attar.runtime.retrieval import Index, IndexError_, add_documents, build_index, format_hits

FACTS = [
    ("danube", "Danube", "The Danube is the second-longest river in Europe. It flows through Vienna, Bratislava "
                         "and Budapest before reaching the Black Sea."),
    ("everest", "Mount Everest", "Mount Everest is the highest mountain on Earth, in the Himalayas on the border "
                                 "between Nepal and China, 8,849 metres tall."),
    ("python", "Python (language)", "Python is a programming language created by Guido van Rossum, first released "
                                    "in 1991."),
    ("photo", "Photosynthesis", "Photosynthesis is how green plants turn sunlight, water and carbon dioxide into "
                                "sugar and oxygen."),
    ("jazz", "Jazz", "Jazz is a music genre that originated in New Orleans in the late 19th century, with roots "
                     "in blues and ragtime."),
    ("mars", "Mars", "Mars is the fourth planet from the Sun; its red colour comes from iron oxide on its surface."),
]
QUERIES = {
    "Which river flows through Budapest?": "danube",
    "Who created the Python programming language?": "python",
    "How tall is the highest mountain in the world?": "everest",
    "Where did jazz music come from?": "jazz",
    "Why is the red planet red?": "mars",
}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps({"id": i, "title": t, "text": x}) for i, t, x in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idx")
    build_index(write_jsonl(tmp / "corpus.jsonl", FACTS), tmp / "index", progress=False)
    return tmp / "index"


def test_known_queries_find_their_passage(index_dir):
    index = Index.open(index_dir)
    assert len(index) == len(FACTS)
    for query, expected in QUERIES.items():
        assert index.search(query, k=1)[0].id == expected, query


def test_web_search_format(index_dir):
    tool = retrieval.web_search_tool(Index.open(index_dir))
    text = tool("Which river flows through Budapest?")
    assert text.startswith("\nRetrieved documents:\n\n===== Document 0, similarity: 0.")
    assert text.count("===== Document") == 3
    assert "Danube\nThe Danube is" in text
    assert format_hits([]) == "No documents found."


def test_folder_corpus_is_chunked(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "long_note.md").write_text(" ".join(f"word{i}" for i in range(250)))
    (docs / "skip.bin").write_bytes(b"\x00")
    rows = list(retrieval.read_corpus(docs))
    assert [r["id"] for r in rows] == ["long_note.md#0", "long_note.md#1", "long_note.md#2"]
    assert len(rows[0]["text"].split()) == 100 and rows[0]["title"] == "long note"


def test_incremental_add(tmp_path):
    build_index(write_jsonl(tmp_path / "a.jsonl", FACTS[:3]), tmp_path / "idx", progress=False)
    manifest = add_documents(tmp_path / "idx", write_jsonl(tmp_path / "b.jsonl", FACTS[2:]), progress=False)
    assert manifest["count"] == len(FACTS)  # the overlapping passage is not added twice
    assert Index.open(tmp_path / "idx").search("Why is the red planet red?", 1)[0].id == "mars"


def test_killed_build_resumes_with_every_passage_once(tmp_path, monkeypatch):
    rows = [(f"p{i}", f"Topic {i}", f"Passage number {i} talks about item {i} and nothing else.") for i in range(600)]
    corpus = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "idx"
    code = ("import sys; from attar.runtime import retrieval as r; r.CHECKPOINT_EVERY = 64; "
            "r.build_index(sys.argv[1], sys.argv[2], batch_size=16)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(corpus), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "vectors.usearch").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(IndexError_, match="is incomplete"):  # never searched as if it were whole
        Index.open(out)
    manifest = build_index(corpus, out, progress=False)  # resume
    assert manifest["count"] == 600 and manifest["complete"]
    index = Index.open(out)
    keys = index.vectors.keys if hasattr(index.vectors, "keys") else None
    assert len(index) == 600 and (keys is None or len(set(keys.tolist() if hasattr(keys, "tolist") else list(keys))) == 600)
    assert index.search("Passage number 417 talks about item 417", 1)[0].id == "p417"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "attar.runtime.cli", "index", *args], capture_output=True, text=True)


def test_cli_search_and_errors(tmp_path, index_dir):
    ok = run_cli("search", str(index_dir), "Who created the Python programming language?", "-k", "1")
    assert ok.returncode == 0 and "Guido van Rossum" in ok.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args, message in [
        (["build", str(empty), "-o", str(tmp_path / "e")], "the corpus is empty"),
        (["build", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "m")], "corpus not found"),
        (["build", str(write_jsonl(tmp_path / "x.jsonl", FACTS)), "-o", str(index_dir)], "already exists"),
        (["search", str(tmp_path), "q"], "not an attar index"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 1, args
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "ok"}\nnot json\n')
    proc = run_cli("build", str(bad), "-o", str(tmp_path / "b"))
    assert proc.returncode == 1 and "bad.jsonl:2" in proc.stderr
    # A build that indexed nothing leaves nothing behind, so search cannot accept a half index.
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()


def test_search_refuses_an_incomplete_index(tmp_path, index_dir):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(index_dir, half)
    manifest = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    proc = run_cli("search", str(half), "q")
    assert proc.returncode == 1 and "is incomplete" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_index_and_wrong_embedder(tmp_path, index_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    (broken / "vectors.usearch").write_bytes(b"garbage" * 10)
    with pytest.raises(IndexError_, match="corrupt vector file"):
        Index.open(broken)
    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["embedder"] = "e5-base-v2"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match="built with embedder 'e5-base-v2'"):
        Index.open(other)
    # The original index is untouched and still answers.
    assert Index.open(index_dir).search("Why is the red planet red?", 1)[0].id == "mars"
