"""The user's path: a fresh machine, `attar chat "question"` with no model given. The first run
fetches the default GGUF and builds it into the cache (torch-free, ~20 s); later runs reuse it."""

import json
import shutil
import subprocess

import pytest


def attar(*args, timeout=900):
    exe = shutil.which("attar")
    assert exe, "the attar console script is installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_chat_with_the_default_model_end_to_end():
    proc = attar("chat", "What is 2 + 3?", "--max-steps", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finished_by"] in ("final_answer", "max_steps")
    assert str(result["answer"]).strip()
    steps = result["memory"]["tasks"][0]["steps"]
    assert steps[0]["completion_tokens"] > 0 and steps[0]["model_output"].strip()


def test_pull_is_cached_and_reports_parity():
    proc = attar("pull", "default", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["reference"].startswith("GGUF") and report["precision"] == "gguf (exact)"
    assert 0.95 <= report["top1_agreement"] <= 1.0
    assert abs(report["perplexity_export"] - report["perplexity_source"]) < 0.05 * report["perplexity_source"]
    assert "building" not in proc.stderr  # built once, by the test above


def test_models_lists_the_catalog_and_rm_refuses_unknown_names():
    proc = attar("models", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(rows)
    assert sum(r["default"] for r in rows.values()) == 1
    assert all(r["license"] and r["source"] and r["gguf_mb"] > 0 for r in rows.values())
    proc = attar("rm", "no-such-model", timeout=60)
    assert proc.returncode == 1 and "unknown model 'no-such-model'" in proc.stderr and "Traceback" not in proc.stderr
    proc = attar("chat", "hi", "--model", "no-such-model", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_a_usage_error(question):
    proc = attar("chat", question, "--max-steps", "1", timeout=60)
    assert proc.returncode == 2 and "the question is empty" in proc.stderr
