"""The user's path: a fresh machine, `attar chat "question"` with no model given. The first run
builds SmolLM2-135M-Instruct into the cache (~1.5 min here); later runs reuse it."""

import json
import shutil
import subprocess

import pytest

from conftest import needs_torch

pytestmark = needs_torch


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
    assert 0.5 < report["top1_agreement"] <= 1.0
    assert report["perplexity_export"] < 2 * report["perplexity_source"]
    assert "building the default model" not in proc.stderr  # built once, by the test above


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_a_usage_error(question):
    proc = attar("chat", question, "--max-steps", "1", timeout=60)
    assert proc.returncode == 2 and "the question is empty" in proc.stderr
