"""`attar demo --quick`: the whole pipeline on a tiny model and a tiny world. Every stage must
leave its artifact and the numbers must be well-formed; who wins is not asserted here."""

import json
import subprocess
import sys

from conftest import needs_torch

pytestmark = needs_torch


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for artifact in ["world/corpus.jsonl", "world/train.jsonl", "world/test.jsonl", "index/manifest.json",
                     "teacher/trajectories.jsonl", "teacher/agent_sft.jsonl", "teacher/cot_sft.jsonl",
                     "train-agent/adapter/adapter_config.json", "train-cot/adapter/adapter_config.json",
                     "train-agent/merged/config.json", "models/base-int4/genai_config.json",
                     "models/agent-int4/parity.json", "models/cot-int4/genai_config.json",
                     "results.json", "results.md", "results.png"]:
        assert (out / artifact).is_file(), artifact
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"].startswith("oracle")
    assert len(results["runs"]) == 6
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["questions"] >= 1
        assert sum(run["breakdown"].values()) == run["questions"]
        assert run["seconds_per_question"] >= 0 and run["tokens_per_question"] >= 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Cached: a second run redoes nothing and prints the same table.
    again = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


def test_demo_refuses_a_run_folder_made_with_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"seed": 0, "people": 99, "questions_per_person": 3, "student": "tiny",
                                               "teacher": "oracle", "teacher_model": "default"}))
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("was made with people=99; use another --out for these settings")
