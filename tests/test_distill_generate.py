"""Teacher trajectories against a real OpenAI-compatible server: llama-cpp-python's server on
loopback, serving the default model's GGUF."""

import json
import socket
import subprocess
import sys
import time

import pytest

from attar.distill.data import JsonlLog, load_questions

QUESTIONS = [{"id": f"q{i}", "question": f"What is {a} plus {b}?", "answer": str(a + b)}
             for i, (a, b) in enumerate([(2, 3), (10, 7), (40, 2)])]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("llama_cpp.server")
    from attar.runtime.models import gguf_path as default_gguf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf("smollm2-135m")),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2",
                             "--model_alias", "smol"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:  # a llama.cpp built for another CPU dies of SIGILL here
            pytest.fail(f"the llama.cpp server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def generate(url, questions, out, *extra):
    return subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "generate", "--questions", str(questions),
                           "--teacher", url, "--teacher-model", "smol", "--completions", "--out", str(out),
                           "--max-steps", "1", "--max-new-tokens", "48", "--concurrency", "2", *extra],
                           capture_output=True, text=True, timeout=900)


def test_generate_with_ftp_and_resume(server, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    first = generate(server, questions, out, "--limit", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["q0", "q1"]
    for r in records:
        assert r["teacher"] == "smol" and r["cot"]
        first_turn = r["messages"][2]
        assert first_turn["role"] == "assistant"
        if r["ftp"]:  # the prefix is in the trajectory (the student learns to write it) ...
            assert r["ftp"].startswith("Thought: ") and first_turn["content"].startswith(r["ftp"])
        # ... but the stored prompt is the short student prompt, not the teacher's long one.
        assert "Here are two examples" not in r["messages"][0]["content"]
        assert "final_answer(answer: Any) -> Any" in r["messages"][0]["content"]
    # A crash mid-write leaves a torn line; the rerun drops it, keeps the rest, does only what is left.
    with open(out / "trajectories.jsonl", "a") as f:
        f.write('{"id": "q2", "question": "torn')
    second = generate(server, questions, out)
    assert second.returncode == 0, second.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["q0", "q1", "q2"]
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["trajectories"] == 3 and summary["failed"] == 0

    sft = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "filter", str(out)],
                         capture_output=True, text=True)
    assert sft.returncode == 0 and (out / "agent_sft.jsonl").exists() and (out / "cot_sft.jsonl").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teachers"] == ["smol"] and manifest["trajectories"] == 3
    assert manifest["kept"] + manifest["dropped_no_final_answer"] + manifest["dropped_wrong_answer"] \
        + manifest["dropped_parse_error"] == 3

    # Shipped trajectories are packed (gzip JSONL + manifest): filtering one needs only a place for its output.
    packed = tmp_path / "data" / "smol.jsonl.gz"
    pack = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "pack", str(out), str(packed)],
                          capture_output=True, text=True)
    assert pack.returncode == 0, pack.stderr[-2000:]
    shipped = json.loads((tmp_path / "data" / "smol.manifest.json").read_text())
    assert shipped["trajectories"] == 3 and shipped["settings"]["teacher"] == "smol"
    refused = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "filter", str(packed)],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--out" in refused.stderr and "Traceback" not in refused.stderr
    again = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "filter", str(packed), "--out",
                            str(tmp_path / "sft")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "sft" / "agent_sft.jsonl").read_text() == (out / "agent_sft.jsonl").read_text()

    # ... and a packed run resumes: unpacked into a new folder, generate finds every question done.
    resumed = tmp_path / "resumed"
    unpack = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "unpack", str(packed), str(resumed)],
                            capture_output=True, text=True)
    assert unpack.returncode == 0, unpack.stderr[-2000:]
    third = generate(server, questions, resumed)
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads(third.stdout[third.stdout.index("{"):])["trajectories"] == 3
    assert (resumed / "trajectories.jsonl").read_text() == (out / "trajectories.jsonl").read_text()
    twice = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "unpack", str(packed), str(resumed)],
                           capture_output=True, text=True)
    assert twice.returncode != 0 and "already holds a run" in twice.stderr and "Traceback" not in twice.stderr
    (tmp_path / "data" / "smol.manifest.json").write_text("[1, 2]")
    broken = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "unpack", str(packed),
                             str(tmp_path / "other")], capture_output=True, text=True)
    assert broken.returncode != 0 and "not a manifest" in broken.stderr and "Traceback" not in broken.stderr


def test_killed_run_resumes_without_loss_or_duplicates(server, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    log = out / "trajectories.jsonl"
    cmd = [sys.executable, "-m", "attar.runtime.cli", "distill", "generate", "--questions", str(questions),
           "--teacher", server, "--teacher-model", "smol", "--completions", "--out", str(out), "--max-steps", "1",
           "--max-new-tokens", "48", "--concurrency", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    done_before = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert 1 <= len(done_before) < len(QUESTIONS)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(q["id"] for q in QUESTIONS) and ids[:len(done_before)] == done_before
    shown = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "show", str(log), "--id", ids[0]],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "── assistant" in shown.stdout and "Thought:" in shown.stdout


INTERRUPTED = """
import json, os, signal, sys, threading
from attar.distill.runner import run_questions
from attar.runtime.cli import _exit_on_signal  # what `attar` makes of SIGTERM
signal.signal(signal.SIGTERM, _exit_on_signal)
started, release, ended = threading.Event(), threading.Event(), []
def work(item):
    if item == "slow":  # a question whose model call would run for minutes
        started.set()
        ended.append("stopped" if release.wait(120) else "ran to its end")
    return {"id": item}
threading.Thread(target=lambda: started.wait(60) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
try:
    run_questions(["fast", "slow"], str, work, sys.argv[1], concurrency=2, progress=False, stop=release.set)
finally:
    print(json.dumps(ended), flush=True)
"""


def test_a_terminated_run_stops_its_work_in_flight_and_logs_none_of_it(tmp_path):
    """SIGTERM (a scheduler ending the job) must end it now: the questions in flight are told to
    stop (`Backend.close`), not waited for to their end, and none of their work is logged."""
    log = tmp_path / "log.jsonl"
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED, str(log)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == ["stopped"]
    assert "slow" not in JsonlLog(log).records


def test_unreachable_teacher_is_reported_not_fatal(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n")
    from attar.distill.teacher import GenerateConfig, generate as run
    from attar.runtime.llm import OpenAIBackend

    backend = OpenAIBackend("http://127.0.0.1:9/v1", "none")
    backend.RETRIES = 1
    summary = run(load_questions(questions), backend, tmp_path / "run", GenerateConfig(concurrency=1), progress=False)
    assert summary["failed"] == 1 and "q0" in summary["failures"][0]
    assert JsonlLog(tmp_path / "run" / "trajectories.jsonl").records == {}
    # Through the CLI a run with failed questions ends non-zero, saying so in one line.
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "generate", "--questions",
                           str(questions), "--teacher", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: 1 questions failed (rerun to retry them)")


def test_bad_question_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nothing": 1}')
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "distill", "generate", "--questions", str(bad),
                           "--teacher", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("Error: ") and "examples" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_retries_add_distinct_kept_runs(tmp_path):
    from attar.distill.sft_data import build_sft
    from attar.distill.teacher import summarize

    def run(correct, answer):
        return {"correct": correct, "parse_errors": 0, "finished_by": "final_answer", "exec_errors": 0,
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": answer}]}

    records = [
        {"id": "a", "question": "q", "teacher": "t", **run(True, "greedy a"), "retries": []},
        {"id": "b", "question": "q", "teacher": "t", **run(False, "greedy b"), "retries": [run(True, "retry b")]},
        {"id": "c", "question": "q", "teacher": "t", **run(False, "greedy c"),
         "retries": [run(False, "retry c") | {"finished_by": "repeated"}]},
        {"id": "d", "question": "q", "teacher": "t", **run(True, "same"), "retries": [run(True, "same")]},
    ]
    (tmp_path / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_sft(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "agent_sft.jsonl").read_text().splitlines()]
    assert [(r["id"], r["messages"][-1]["content"]) for r in rows] == [("a", "greedy a"), ("b", "retry b"), ("d", "same")]
    assert summarize(records)["kept_from_retries"] == 1 and summary["retries"] == 3
    assert summarize(records)["runs_ended_on_repeat"] == 1


@pytest.mark.parametrize("pays", [True, False])
def test_a_catalog_teacher_runs_its_int8_graph_where_it_pays_with_a_row_per_question(monkeypatch, tmp_path, pays):
    # The teacher's work is batches and long prompts: a catalog teacher is built with the int8
    # graph, which the engine then runs, where that graph is the faster (not on AVX2 without VNNI,
    # where the exact graph runs on attar's Q8 products); a folder is taken as it is.
    from attar.distill import teacher

    built, engines, loaded = [], [], []
    monkeypatch.setattr(teacher.kernels, "int8_graph_pays", lambda: pays)
    monkeypatch.setattr(teacher, "pull", lambda name, int8=False: built.append((name, int8)) or tmp_path / name)
    monkeypatch.setattr(teacher, "EngineBackend", lambda folder, max_rows, int8: engines.append((folder, max_rows, int8)))
    monkeypatch.setattr(teacher, "load_backend", lambda spec, rows=8: loaded.append((spec, rows)))
    teacher.load_teacher("qwen2.5-coder-1.5b", concurrency=16)
    teacher.load_teacher(str(tmp_path / "mine"), concurrency=4)
    assert built == [("qwen2.5-coder-1.5b", pays)]
    assert engines == [(tmp_path / "qwen2.5-coder-1.5b", 16, pays)]
    assert loaded == [(str(tmp_path / "mine"), 8)]
