"""Which model should be the default? Each candidate runs untrained, as the agent a user gets
(student prompt, greedy, `web_search` over a small index), on everyday tasks (bench/everyday/
tasks.jsonl: arithmetic, big integers, dates, units, money, strings, questions over an index) and
optionally the first GSM-Hard questions. One JSON line per task, then one summary per model:
accuracy, median seconds per answer, peak RSS and disk.

    python bench/everyday.py [--models smollm2-135m,qwen2.5-coder-0.5b,FOLDER] [--gsm-hard 50] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent / "everyday"
GSM_HARD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "test" / "gsm_hard_500_20250507.json"


def _number(text: str) -> float | None:
    text = str(text).replace(",", "").replace("$", "").replace("%", "").strip()
    match = re.fullmatch(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)
    if match:
        return float(text)
    found = re.findall(r"[-+]?\d+(?:\.\d+)?", text)
    return float(found[-1]) if len(found) == 1 else None


def correct(answer, expected, kind: str) -> bool:
    """Numbers compare by value (exactly for integers, within 0.5% otherwise; GSM-Hard by the
    evaluation's own rule); text by its words."""
    if answer is None:
        return False
    if isinstance(answer, bool):  # "Answer yes or no." answered with a boolean
        answer = "yes" if answer else "no"
    if kind == "gsm-hard":
        from attar.distill.scoring import numeric_match

        return numeric_match(answer, expected)
    if kind == "number":
        if isinstance(expected, int) and abs(expected) > 2 ** 52:  # big integers: the digits, exactly
            return re.sub(r"[^\d-]", "", str(answer)) == str(expected)
        value = _number(str(answer))
        if value is None:
            return False
        if isinstance(expected, int):
            return value == expected
        return abs(value - float(expected)) <= max(1e-9, 0.005 * abs(float(expected)))
    norm = lambda s: re.sub(r"[^a-z0-9-]+", " ", str(s).lower()).strip()  # noqa: E731
    return norm(answer) == norm(expected) or f" {norm(expected)} " in f" {norm(answer)} "


WORKER = r"""
import json, resource, sys, time
from attar.runtime import Agent
model, index, tasks = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
agent = Agent(model, index=index, max_steps=5)
for task in tasks:
    began = time.perf_counter()
    try:
        result = agent.run(task["question"])
        answer, finished_by = result.answer, result.finished_by
        steps = len(result.steps)
    except Exception as exc:
        answer, finished_by, steps = None, f"error: {exc}", 0
    print(json.dumps({"id": task["id"], "answer": answer if isinstance(answer, (int, float, str)) or answer is None
                      else repr(answer), "finished_by": finished_by, "steps": steps,
                      "seconds": round(time.perf_counter() - began, 2),
                      "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)
agent.close()
"""


def gsm_hard(n: int) -> list[dict]:
    rows = json.loads(GSM_HARD.read_text())["examples"][:n]
    return [{"id": f"gsm-hard-{i}", "category": "gsm-hard", "question": r["question"], "answer": float(r["answer"]),
             "kind": "gsm-hard"} for i, r in enumerate(rows)]


def main() -> None:
    from attar.runtime.models import resolve_model
    from attar.runtime.retrieval import build_index

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b",
                        help="comma-separated catalog names or exported model folders")
    parser.add_argument("--gsm-hard", type=int, default=0)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path, help="also append every JSON line to this file")
    args = parser.parse_args()
    tasks = [json.loads(line) for line in (HERE / "tasks.jsonl").read_text().splitlines()][: args.limit]
    tasks += gsm_hard(args.gsm_hard)
    sink = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        build_index(HERE / "corpus.jsonl", index, progress=False)
        for name in args.models.split(","):
            path = resolve_model(name)
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            proc = subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(index)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(tasks))
            proc.stdin.close()
            by_id = {t["id"]: t for t in tasks}
            rows = []
            for line in proc.stdout:
                row = json.loads(line)
                task = by_id[row["id"]]
                row.update(model=name, category=task["category"], expected=task["answer"],
                           correct=correct(row["answer"], task["answer"], task["kind"]))
                rows.append(row)
                emit(row)
            proc.wait()
            for group in sorted({r["category"] == "gsm-hard" for r in rows}):
                part = [r for r in rows if (r["category"] == "gsm-hard") == group]
                emit({"figure": "gsm-hard" if group else "everyday tasks", "model": name, "n": len(part),
                      "accuracy": round(sum(r["correct"] for r in part) / len(part), 3),
                      "median_seconds": statistics.median(r["seconds"] for r in part),
                      "max_steps_fallbacks": sum(r["finished_by"] == "max_steps" for r in part),
                      "peak_rss_mb": max(r["rss_mb"] for r in part), "disk_mb": round(disk / 1e6)})


if __name__ == "__main__":
    main()
