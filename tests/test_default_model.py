"""The user's path: a fresh machine, `attar chat "question"` with no model given. The first run
fetches the default GGUF (Qwen2.5-Coder-0.5B-Instruct), verifies it and builds it into the cache
(torch-free); later runs reuse it. The README's quick start, asserted."""

import json
import shutil
import subprocess

import pytest


def attar(*args, timeout=900):
    exe = shutil.which("attar")
    assert exe, "the attar console script is installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("question, answer", [
    ("What is 17 * 23?", "391"),
    ("What is 2**100?", "1267650600228229401496703205376"),
])
def test_readme_quick_start_answers_exactly(question, answer):
    proc = attar("chat", question)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == answer, (proc.stdout, proc.stderr[-3000:])  # printed once, nothing else
    assert "━━ Step 1 ━━" in proc.stderr and "No final_answer" not in proc.stderr


def test_pull_is_cached_and_reports_parity():
    proc = attar("pull", "default", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["reference"].startswith("GGUF") and report["precision"] == "gguf (exact)"
    assert 0.97 <= report["top1_agreement"] <= 1.0
    assert abs(report["perplexity_export"] - report["perplexity_source"]) < 0.05 * report["perplexity_source"]
    assert "building" not in proc.stderr  # built once, by the quick start above


def test_a_parity_report_from_another_kernel_build_is_measured_again():
    """A report describes what runs here: after `attar kernel build` (or a CPU change) `attar pull`
    measures it again, once, and the folder's manifest still holds. (A folder built without the
    check, as other tests build it, gets its first report the same way.)"""
    from pathlib import Path

    from attar.runtime import kernels
    from attar.runtime.build import check_manifest, rewrite

    proc = attar("pull", "smollm2-135m", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[0])
    report = json.loads((folder / "parity.json").read_text())
    rewrite(folder, "parity.json", json.dumps({**report, "kernels": "kernels-of-another-build"}))
    proc = attar("pull", "smollm2-135m", "--json", timeout=600)
    assert proc.returncode == 0 and "measuring again" in proc.stderr, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout)
    assert fresh["kernels"] == kernels.build_name() and fresh["prompts"] == report["prompts"]
    assert fresh["top1_agreement"] >= 0.95 and check_manifest(folder) is None
    again = attar("pull", "smollm2-135m", timeout=120)
    assert again.returncode == 0 and "measuring again" not in again.stderr


def test_the_small_model_end_to_end_as_json():
    proc = attar("chat", "What is 2 + 3?", "--model", "smollm2-135m", "--max-steps", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finished_by"] in ("final_answer", "max_steps")
    assert result["fallback"] == (result["finished_by"] == "max_steps")
    steps = result["memory"]["tasks"][0]["steps"]
    assert steps[0]["completion_tokens"] > 0 and steps[0]["model_output"].strip()


def test_models_lists_the_catalog_and_rm_refuses_unknown_names():
    proc = attar("models", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(rows)
    assert [name for name, r in rows.items() if r["default"]] == ["qwen2.5-coder-0.5b"]
    assert rows["qwen2.5-coder-0.5b"]["built"] and rows["smollm2-135m"]["built"]
    assert all(r["license"] and r["source"] and r["gguf_mb"] > 0 for r in rows.values())
    proc = attar("rm", "no-such-model", timeout=60)
    assert proc.returncode == 1 and "unknown model 'no-such-model'" in proc.stderr and "Traceback" not in proc.stderr
    proc = attar("chat", "hi", "--model", "no-such-model", timeout=60)
    assert proc.returncode == 1 and "neither a model folder nor a catalog name" in proc.stderr


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_a_usage_error(question):
    proc = attar("chat", question, "--max-steps", "1", timeout=60)
    assert proc.returncode == 2 and "the question is empty" in proc.stderr
