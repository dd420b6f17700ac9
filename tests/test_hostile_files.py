"""Hostile and malformed files, a class per input kind (corpus, GGUF, model folder, data file,
question). Each case is made here and goes through the CLI as a user's would: it must end in a
one-line error (the last line of stderr, no traceback) and a non-zero exit, change nothing outside
its target, and stay within a memory bound."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from conftest import TRAJECTORY

ATTAR = [sys.executable, "-m", "attar.runtime.cli"]
# Runs a command as its only child and reports that child's peak RSS (MiB) on its last line.
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr); sys.exit(rc)")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        lines = proc.stderr.rstrip().splitlines()
        self.rc, self.stdout, self.peak_mb = proc.returncode, proc.stdout, int(lines[-1])
        self.stderr = "\n".join(lines[:-1])


def attar(*args, cwd=None, timeout=300, env=None) -> Run:
    proc = subprocess.run([sys.executable, "-c", PEAK, *ATTAR, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})
    return Run(proc)


def refused(run: Run, *words: str, peak_mb: int = 1500) -> str:
    """The run failed with one line that says why (and names what it should); returns that line."""
    assert run.rc != 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), run.stderr
    for word in words:
        assert word in last, last
    assert run.peak_mb < peak_mb, f"peak RSS {run.peak_mb} MiB"
    return last


def tree(folder: Path) -> dict:
    """Every entry below `folder` (hidden ones too), with size and mtime: what 'unchanged' means."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


# -- corpus ----------------------------------------------------------------------------------------


class TestCorpus:
    def test_links_out_of_the_folder_are_not_followed(self, tmp_path):
        secret = tmp_path / "secret.txt"
        secret.write_text("the launch code is swordfish-4711 and nobody may read it")
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "more.txt").write_text("swordfish-4711 again, in a linked folder")
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "notes.txt").write_text("rivers flow into the sea " * 20)
        (corpus / "leak.txt").symlink_to(secret)
        (corpus / "linked_dir").symlink_to(outside, target_is_directory=True)
        os.mkfifo(corpus / "pipe.txt")  # opening it would block forever
        run = attar("index", "build", corpus, "-o", tmp_path / "index", timeout=240)
        assert run.rc == 0, run.stderr
        assert "skipped 3 linked or special file(s)" in run.stderr and "leak.txt" in run.stderr
        hits = attar("index", "search", tmp_path / "index", "swordfish launch code", "-k", "5")
        assert "swordfish" not in hits.stdout and "notes" in hits.stdout

    def test_a_bad_line_anywhere_adds_nothing(self, tmp_path):
        corpus = tmp_path / "c.jsonl"
        good = [json.dumps({"id": f"p{i}", "text": f"passage number {i}"}) for i in range(5)]
        corpus.write_text("\n".join(good[:3] + ['{"id": "x", "text": ', *good[3:]]) + "\n")
        refused(attar("index", "build", corpus, "-o", tmp_path / "index"), "c.jsonl:4")
        assert not (tmp_path / "index").exists()

    def test_non_utf8_corpus(self, tmp_path):
        corpus = tmp_path / "latin1.jsonl"
        corpus.write_bytes(json.dumps({"id": "a", "text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
        refused(attar("index", "build", corpus, "-o", tmp_path / "index"), "latin1.jsonl:1", "UTF-8")
        assert not (tmp_path / "index").exists()

    def test_a_failed_add_leaves_the_index_as_it_was(self, tmp_path):
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage {i} about rivers"}) + "\n"
                                  for i in range(4)))
        assert attar("index", "build", corpus, "-o", tmp_path / "index").rc == 0
        before = json.loads((tmp_path / "index" / "manifest.json").read_text())
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"id": "new1", "text": "fine"}) + "\n" + json.dumps({"text": "no id"}) + "\n")
        refused(attar("index", "add", tmp_path / "index", bad), "bad.jsonl:2")
        after = json.loads((tmp_path / "index" / "manifest.json").read_text())
        assert after["complete"] and after["count"] == before["count"]
        dupes = tmp_path / "dupes.jsonl"
        dupes.write_text(json.dumps({"id": "p1", "text": "a changed p1"}) + "\n")
        run = attar("index", "add", tmp_path / "index", dupes)
        assert run.rc == 0 and "skipped 1 passage(s) whose id is already in the index" in run.stderr

    @pytest.mark.parametrize("case, words", [
        ("tokenizer-link", ["outside"]),
        ("manifest-dim", ["corrupt manifest"]),
        ("manifest-huge", ["corrupt manifest"]),
        ("tokenizer-garbage", ["tokenizer"]),
    ])
    def test_a_tampered_index_is_refused_in_one_line(self, tmp_path, case, words):
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(json.dumps({"id": "a", "text": "rivers flow into the sea"}) + "\n")
        index = tmp_path / "index"
        assert attar("index", "build", corpus, "-o", index).rc == 0
        (tmp_path / "secret").write_text("not a tokenizer")
        manifest = json.loads((index / "manifest.json").read_text())
        if case == "tokenizer-link":
            (index / "tokenizer.json").unlink()
            (index / "tokenizer.json").symlink_to(tmp_path / "secret")
        elif case == "manifest-dim":
            (index / "manifest.json").write_text(json.dumps({**manifest, "dim": 10 ** 9}))
        elif case == "manifest-huge":
            (index / "manifest.json").write_text(json.dumps({**manifest, "pad": "x" * (2 << 20)}))
        else:
            (index / "tokenizer.json").write_text("{\"model\": 12}")
        refused(attar("index", "search", index, "rivers"), *words)

    def test_one_huge_passage_is_read_as_a_stream(self, tmp_path):
        corpus = tmp_path / "huge.jsonl"
        words = ("lorem ipsum dolor sit amet consectetur " * 1_400_000).strip()  # ~50 MB, one passage
        corpus.write_text(json.dumps({"id": "big", "text": words}) + "\n")
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size (pytest's, here).
        code = ("import re, sys; from attar.runtime.retrieval import read_corpus; "
                "n = sum(1 for _ in read_corpus(sys.argv[1])); "
                "print(n, int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")
        out = subprocess.run([sys.executable, "-c", code, str(corpus)], capture_output=True, text=True, check=True)
        passages, peak_mb = map(int, out.stdout.split())
        assert passages == 84_000  # 8.4 M words in passages of 100
        assert peak_mb < 600, f"peak RSS {peak_mb} MiB reading a 50 MB passage"


# -- GGUF -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from attar.runtime.models import gguf_path

    reader = GGUFReader(gguf_path("smollm2-135m", log=lambda m: None))
    return {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer.")}


def write_gguf(path: Path, tok: dict, context: int = 256, layers: int = 1, tokenizer: str = "gpt2",
               bad_shape: str | None = None, heads: int = 4) -> Path:
    """A small float32 llama GGUF; `bad_shape` names a tensor written with a wrong shape."""
    rng = np.random.default_rng(0)
    hidden, kv, ffn, vocab = 64, 2, 128, len(tok["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers), w.add_context_length(context), w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn), w.add_head_count(heads), w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer), w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"]), w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_chat_template(tok["tokenizer.chat_template"])

    def tensor(name: str, *shape: int) -> None:
        if name == bad_shape:
            shape = (shape[0] + 3, *shape[1:])
        w.add_tensor(name, rng.normal(0, 0.05, shape).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    head_dim = hidden // heads
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv * head_dim, hidden)),
                            ("attn_v", (kv * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", *shape)
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
    tensor("output_norm.weight", hidden)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


class TestGGUF:
    @pytest.mark.parametrize("case, words", [
        ("context", ["context_length", "134217728"]),
        ("shape", ["blk.0.ffn_up.weight", "shape"]),
        ("sentencepiece", ["sentencepiece"]),
        ("heads", ["inconsistent"]),
        ("truncated", ["cannot read"]),
        ("not-gguf", ["cannot read"]),
    ])
    def test_malformed_gguf_is_refused_in_one_line(self, tmp_path, tok, case, words):
        source = tmp_path / "m.gguf"
        if case == "context":
            write_gguf(source, tok, context=2 ** 27)
        elif case == "shape":
            write_gguf(source, tok, bad_shape="blk.0.ffn_up.weight")
        elif case == "sentencepiece":
            write_gguf(source, tok, tokenizer="llama")
        elif case == "heads":
            write_gguf(source, tok, heads=3)
        elif case == "truncated":
            data = write_gguf(tmp_path / "whole.gguf", tok).read_bytes()
            source.write_bytes(data[:len(data) // 2])
        else:
            source.write_bytes(os.urandom(4096))
        out = tmp_path / "out" / "model"
        refused(attar("export", source, "-o", out), *words, peak_mb=1000)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    def test_an_adapter_name_cannot_write_outside_the_output(self, tmp_path, tok):
        source = write_gguf(tmp_path / "m.gguf", tok)
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        before = tree(tmp_path)
        refused(attar("export", source, "-o", tmp_path / "out" / "m", "--lora", f"../../../evil={adapter}"),
                "adapter name")
        assert tree(tmp_path) == before

    def test_a_killed_export_leaves_no_work_folder(self, tmp_path):
        from attar.runtime.models import gguf_path

        out = tmp_path / "exports" / "smol"
        (tmp_path / "exports").mkdir()
        stale = tmp_path / "exports" / ".smol.partial-999999-dead"  # from a process long gone
        stale.mkdir()
        proc = subprocess.Popen([*ATTAR, "export", str(gguf_path("smollm2-135m", log=lambda m: None)), "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.name.startswith(".smol.partial-") and p != stale
                                                      for p in (tmp_path / "exports").iterdir()):
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the import
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        assert list((tmp_path / "exports").iterdir()) == []  # its own work folder and the stale one are gone

    def test_a_changed_cached_gguf_is_not_trusted(self, tmp_path):
        from attar.runtime.models import CATALOG, _verified, gguf_path

        model = CATALOG["smollm2-135m"]
        copy = tmp_path / "copy.gguf"
        shutil.copy(gguf_path("smollm2-135m", log=lambda m: None), copy)
        assert _verified(copy, model) and (tmp_path / "copy.gguf.verified").is_file()
        with open(copy, "r+b") as f:  # same size, one byte changed
            f.seek(10_000_000)
            byte = f.read(1)
            f.seek(10_000_000)
            f.write(bytes([byte[0] ^ 1]))
        assert not _verified(copy, model)
        with open(copy, "r+b") as f:
            f.truncate(1000)
        assert not _verified(copy, model)


# -- model folder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_export(tmp_path_factory):
    from attar.runtime.models import pull

    return pull("smollm2-135m", log=lambda m: None, check=False)


def hostile_copy(src: Path, dst: Path) -> Path:
    """A model folder that links to the real weights (cheap) but has its own metadata files."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".onnx.data"):
            os.link(f, dst / f.name) if f.stat().st_dev == dst.stat().st_dev else shutil.copy(f, dst / f.name)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


class TestModelFolder:
    def edit_config(self, folder: Path, edit) -> None:
        config = json.loads((folder / "genai_config.json").read_text())
        edit(config)
        (folder / "genai_config.json").write_text(json.dumps(config))

    @pytest.mark.parametrize("case, words", [
        ("decoder-outside", ["outside the model folder"]),
        ("adapter-outside", ["adapter names must be plain names"]),
        ("layers", ["num_hidden_layers"]),
        ("not-json", ["genai_config.json", "not valid JSON"]),
        ("no-tokenizer", ["tokenizer.json is missing"]),
        ("tokenizer-link", ["outside the model folder"]),
        ("eos", ["eos_token_id"]),
        ("weights-outside", ["escapes model directory"]),  # the engine loads the graph from memory
    ])
    def test_malformed_folder_is_refused_in_one_line(self, tmp_path, smol_export, case, words):
        folder = hostile_copy(smol_export, tmp_path / "model")
        (tmp_path / "secret").write_text("not a model")
        if case == "decoder-outside":
            self.edit_config(folder, lambda c: c["model"]["decoder"].update(filename="../secret"))
        elif case == "adapter-outside":
            (folder / "attar.json").write_text(json.dumps({"adapters": ["../../../outside/evil"],
                                                           "default_adapter": "../../../outside/evil"}))
        elif case == "layers":
            self.edit_config(folder, lambda c: c["model"]["decoder"].update(num_hidden_layers=10 ** 9))
        elif case == "not-json":
            (folder / "genai_config.json").write_text("{\"model\": ")
        elif case == "no-tokenizer":
            (folder / "tokenizer.json").unlink()
        elif case == "tokenizer-link":
            (folder / "tokenizer.json").unlink()
            (folder / "tokenizer.json").symlink_to(tmp_path / "secret")
        elif case == "weights-outside":
            import onnx

            for file in folder.glob("*.onnx"):  # the int8 graph too, where the folder was pulled with one
                graph = onnx.load(str(file), load_external_data=False)
                for tensor in graph.graph.initializer:
                    for entry in tensor.external_data:
                        if entry.key == "location":
                            entry.value = "../secret"
                onnx.save(graph, str(file))
        else:
            self.edit_config(folder, lambda c: c["model"].update(eos_token_id="</s>"))
        before = tree(tmp_path)
        refused(attar("chat", "--local", "--model", folder, "What is 2+2?"), *words)
        assert tree(tmp_path) == before

    def test_a_hostile_chat_template_is_stopped(self, tmp_path, smol_export):
        folder = hostile_copy(smol_export, tmp_path / "model")
        loop = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = loop
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink()
        began = time.monotonic()
        refused(attar("chat", "--local", "--model", folder, "What is 2+2?"), "chat template")
        assert time.monotonic() - began < 60

    def test_rm_of_a_linked_model_folder_removes_the_link_only(self, tmp_path, smol_export):
        cache = tmp_path / "cache"
        (cache / "models").mkdir(parents=True)
        target = tmp_path / "kept"
        target.mkdir()
        (target / "genai_config.json").write_text("{}")
        (cache / "models" / "smollm2-135m").symlink_to(target, target_is_directory=True)
        run = attar("rm", "smollm2-135m", env={"ATTAR_CACHE": str(cache)})
        assert run.rc == 0, run.stderr
        assert not (cache / "models" / "smollm2-135m").exists() and (target / "genai_config.json").is_file()


# -- data files -------------------------------------------------------------------------------------


class TestDataFile:
    def test_a_gzip_bomb_is_refused_without_inflating_it(self, tmp_path):
        bomb = tmp_path / "traj.jsonl.gz"
        with gzip.open(bomb, "wb", compresslevel=9) as f:
            f.write(b'{"id": "' + b"a" * (100 << 20))  # 100 MB in one line: ~100 KB on disk
        assert bomb.stat().st_size < 1 << 20
        refused(attar("distill", "filter", bomb, "--out", tmp_path / "sft"), "traj.jsonl.gz:1", "longer than",
                peak_mb=600)
        assert not (tmp_path / "sft").exists()

    @pytest.mark.parametrize("row, words", [
        ({"id": 1, "question": "q"}, ["traj.jsonl:2", "'correct'"]),
        ({**{"id": 1, "question": "q", "correct": True, "finished_by": "final_answer", "parse_errors": 0,
             "exec_errors": 0}, "messages": [{"role": "wizard", "content": "x"}]}, ["traj.jsonl:2", "role"]),
        ([1, 2, 3], ["traj.jsonl:2", "JSON object"]),
    ])
    def test_malformed_trajectories_name_file_and_line(self, tmp_path, row, words):
        good = {"id": 0, "question": "q", "answer": "5", "correct": True, "finished_by": "final_answer",
                "parse_errors": 0, "exec_errors": 0, "messages": TRAJECTORY, "teacher": "t", "cot": None}
        data = tmp_path / "traj.jsonl"
        data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        refused(attar("distill", "filter", data, "--out", tmp_path / "sft"), *words)

    @pytest.mark.parametrize("case, words", [("latin-1", ["q.json", "UTF-8"]), ("huge", ["q.json", "larger than"]),
                                             ("not-json", ["q.json", "expected JSON"])])
    def test_malformed_question_files(self, tmp_path, case, words):
        questions = tmp_path / "q.json"
        if case == "latin-1":
            questions.write_bytes('{"examples": [{"question": "caf\u00e9?", "answer": "1"}]}'.encode("latin-1"))
        elif case == "huge":
            with open(questions, "wb") as f:
                f.truncate(300 << 20)  # sparse: 300 MB that take no disk
        else:
            questions.write_text('{"examples": [')
        refused(attar("distill", "eval", "--model", "smollm2-135m", "--questions", questions, "--out", tmp_path / "e"),
                *words, peak_mb=600)

    def test_results_of_another_model_are_not_mixed_in(self, tmp_path):
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps({"id": "1", "question": "What is 2+2?", "answer": "4"}) + "\n")
        out = tmp_path / "eval"
        out.mkdir()
        (out / "made_by.json").write_text(json.dumps({"model": "some-other-model"}))
        (out / "predictions.jsonl").write_text(json.dumps({"id": "1", "prediction": "4", "correct": True}) + "\n")
        refused(attar("distill", "eval", "--model", "smollm2-135m", "--questions", questions, "--out", out),
                "made with model", "another --out")
        stray = tmp_path / "stray"
        stray.mkdir()
        (stray / "predictions.jsonl").write_text("{}\n")  # no record of what made it
        refused(attar("distill", "eval", "--model", "smollm2-135m", "--questions", questions, "--out", stray),
                "no record")


# -- questions --------------------------------------------------------------------------------------


class TestQuestion:
    def test_a_question_longer_than_the_context_is_said_to_be(self, tmp_path, smol_export):
        folder = hostile_copy(smol_export, tmp_path / "short-context")
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["context_length"] = 300  # shorter than the system prompt
        (folder / "genai_config.json").write_text(json.dumps(config))
        refused(attar("chat", "--local", "--model", folder, "What is 2+2?"), "too long")
        refused(attar("chat", "--local", "--model", smol_export, "why " * 20_000), "too long")

    def test_a_long_conversation_drops_its_oldest_observations(self):
        from attar.runtime import Agent
        from attar.runtime.executor import Limits
        from attar.runtime.llm import Backend, Generation, PromptTooLong

        class Budget(Backend):
            """Fails like a model whose context holds `chars` characters of conversation."""

            name = "budget"

            def __init__(self, chars: int):
                self.chars, self.step = chars, 0

            def generate(self, messages, stop=(), sampling=None, on_text=None, prefix=""):
                if sum(len(m["content"]) for m in messages) > self.chars:
                    raise PromptTooLong("too long")
                self.step += 1
                code = "final_answer(seen)" if self.step == 4 else "print('x' * 3000)\nseen = 1"
                return Generation(text=f"Thought: go.\nCode:\n```py\n{code}\n```", stopped_by="<end_code>")

        with Agent(Budget(9000), max_steps=6, limits=Limits(timeout_s=5, memory_mb=64)) as agent:
            result = agent.run("Print a lot, then answer.")
        assert result.answer == 1 and agent.memory.tasks[-1].elided >= 1
        kept = agent.memory.messages(agent.memory.tasks[-1].elided)
        assert any("[left out" in m["content"] for m in kept)


def test_a_model_with_another_chat_template_answers(tmp_path, smol_export):
    """Not hostile, only unusual: a model whose template is not ChatML is rendered by its own
    template (in jinja2's sandbox), not refused."""
    from attar.runtime.llm import EngineBackend, Sampling

    folder = hostile_copy(smol_export, tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                               "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    backend = EngineBackend(folder)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert backend.render(messages, "") == "### user:\nName a colour.\n\n### assistant:\n"
    assert backend.generate(messages, sampling=Sampling(max_new_tokens=8)).completion_tokens > 0
