"""`attar demo`: agent distillation vs CoT distillation, end to end, offline, on a laptop.

Stages (each cached in OUT and skipped when its artifact exists, so a killed demo resumes):
  1. world      a seeded fictional world: corpus + train/test questions (test people held out)
  2. index      the corpus in an on-device usearch index
  3. teacher    oracle trajectories and CoT traces (teacher: "oracle", see oracle.py)
  4. sft        agent_sft.jsonl (filtered) and cot_sft.jsonl (CoT traces, with and without passages)
  5. train      the same student twice: LoRA on agent trajectories, LoRA on CoT
  6. export     base, agent and CoT students to ONNX INT4 (parity check on)
  7. eval       untrained agent, CoT, CoT + passages, agent (HF merged), agent INT4, agent INT4 + SAG
  8. results    results.json, results.md and results.png
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from attar.distill.data import load_questions, read_jsonl, write_jsonl_atomic
from attar.distill.evaluate import compare, evaluate
from attar.distill.oracle import generate_oracle
from attar.distill.sft_data import build_sft
from attar.distill.teacher import generate, load_teacher
from attar.distill.tiny import make_tiny_llama
from attar.distill.train import TrainConfig, train
from attar.distill.world import make_world
from attar.export.convert import export_model
from attar.runtime.models import gguf_path, is_built
from attar.runtime.retrieval import Index, build_index, web_search_tool


@dataclass
class DemoConfig:
    seed: int = 0
    people: int = 72  # world size; 30% of them (and their questions) are held out for the test set
    questions_per_person: int = 4
    student: str = "default"  # SmolLM2-135M-Instruct; "tiny" = a random 2-layer llama (quick mode)
    # "oracle", or an LLM teacher as in `attar distill generate`: OpenAI-compatible URL(s) or a model folder
    teacher: str = "oracle"
    teacher_model: str = "default"
    completions: bool = False
    # The paper trains 2 epochs at lr 2e-4, batch 8, on ~2000 trajectories: hundreds of steps. Two CPU cores
    # afford ~200 trajectories once, so more, smaller steps at a higher rate: batch 4 at lr 5e-4 (~50 steps).
    epochs: float = 1.0
    lr: float = 5e-4
    grad_accum: int = 4  # batch 1 on CPU
    train_max_steps: int = -1
    eval_limit: int | None = 30  # test questions evaluated by every run (None = all)
    sag: int = 8
    # A SAG step costs ~2.7x an N=1 step on 2 cores (the engine shares its prefill). It answers the first
    # 15 test questions, and the N=1 agent is also reported on those same 15.
    sag_limit: int | None = 15
    max_steps: int = 5
    concurrency: int = 8  # questions in flight in evaluation (one batch on the engine); SAG runs one at a time
    data_only: bool = False  # stop after the SFT data: retrieval trajectories to mix into another training set


QUICK = DemoConfig(people=10, questions_per_person=3, student="tiny", train_max_steps=3, eval_limit=4, sag=3,
                   sag_limit=None, max_steps=3)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower().replace("+", "plus")).strip("-")


def _first_predictions(src: Path, dst: Path, n: int) -> None:
    """A run made of another run's first n predictions: `evaluate` then only summarizes it."""
    dst.mkdir(parents=True)
    shutil.copy(src / "made_by.json", dst / "made_by.json")  # the same model and questions made them
    write_jsonl_atomic(dst / "predictions.jsonl", read_jsonl(src / "predictions.jsonl")[:n])


# What the cached stages depend on: a run folder made with other values cannot be resumed with these.
_CACHE_KEYS = ("seed", "people", "questions_per_person", "student", "teacher", "teacher_model")


def _check_cache(out: Path, cfg: DemoConfig) -> None:
    wanted = {k: getattr(cfg, k) for k in _CACHE_KEYS}
    stamp = out / "demo.json"
    if stamp.is_file():
        made = json.loads(stamp.read_text())
        changed = [f"{k}={made.get(k)!r}" for k in _CACHE_KEYS if made.get(k) != wanted[k]]
        if changed:
            raise ValueError(f"{out} was made with {', '.join(changed)}; use another --out for these settings")
    else:
        stamp.write_text(json.dumps(wanted, indent=2))


def run_demo(out: str | os.PathLike, cfg: DemoConfig = DemoConfig()) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_cache(out, cfg)
    # Seconds per stage, summed over resumed runs (a cached stage adds ~0; a killed attempt's time is lost).
    timings_file = out / "stage_seconds.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    began: dict[str, float] = {}

    def stage(name: str):
        _log(name)
        began[name] = time.perf_counter()

    def done(name: str):
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - began[name], 1)
        timings_file.write_text(json.dumps(timings, indent=2))

    stage("world")
    world_dir = out / "world"
    if not (world_dir / "test.jsonl").is_file():
        world = make_world(seed=cfg.seed, people=cfg.people, questions_per_person=cfg.questions_per_person)
        world_dir.mkdir(exist_ok=True)
        write_jsonl_atomic(world_dir / "corpus.jsonl", world.passages)
        write_jsonl_atomic(world_dir / "train.jsonl", world.train)
        write_jsonl_atomic(world_dir / "test.jsonl", world.test)
    train_q, test_q = read_jsonl(world_dir / "train.jsonl"), read_jsonl(world_dir / "test.jsonl")
    done("world")

    stage("index")
    index_dir = out / "index"
    if not (index_dir / "manifest.json").is_file() or not json.loads((index_dir / "manifest.json").read_text())["complete"]:
        build_index(world_dir / "corpus.jsonl", index_dir)
    index = Index.open(index_dir)
    done("index")

    stage(f"teacher ({cfg.teacher})")
    teacher_dir = out / "teacher"
    if cfg.teacher == "oracle":
        teacher_summary = generate_oracle(train_q, index, teacher_dir, seed=cfg.seed)
    else:
        teacher = load_teacher(cfg.teacher, cfg.teacher_model, cfg.completions)
        teacher_summary = generate(load_questions(world_dir / "train.jsonl"), teacher, teacher_dir,
                                   tools=[web_search_tool(index)])
    done(f"teacher ({cfg.teacher})")

    stage("sft data")
    if not (teacher_dir / "cot_sft.jsonl").is_file():
        build_sft(teacher_dir)
        build_sft(teacher_dir, retrieve=web_search_tool(index))
        # One CoT student for both evaluations: every trace once without and once with passages.
        rows = read_jsonl(teacher_dir / "cot_sft.jsonl") + read_jsonl(teacher_dir / "cot_rag_sft.jsonl")
        write_jsonl_atomic(teacher_dir / "cot_sft.jsonl", rows)
    done("sft data")
    if cfg.data_only:
        _log(f"data: {teacher_dir / 'agent_sft.jsonl'} and {teacher_dir / 'cot_sft.jsonl'}")
        return {"teacher_summary": teacher_summary, "data": str(teacher_dir)}

    stage("student")
    if cfg.student == "tiny":
        student = str(make_tiny_llama(out / "tiny-student"))
    else:
        student = str(gguf_path("smollm2-135m"))
    done("student")

    stage("train")
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, grad_accum=cfg.grad_accum, max_steps=cfg.train_max_steps)
    adapters = {name: train(teacher_dir / data, student, out / f"train-{name}", tcfg, merge=True)
                for name, data in (("agent", "agent_sft.jsonl"), ("cot", "cot_sft.jsonl"))}
    done("train")

    stage("export")
    models = out / "models"
    parity = {}
    for name, lora in (("base", None), ("agent", adapters["agent"]), ("cot", adapters["cot"])):
        target = models / f"{name}-int4"
        if not target.exists():
            export_model(student, target, lora=lora)
        if (target / "parity.json").is_file():
            parity[name] = json.loads((target / "parity.json").read_text())
    done("export")

    stage("eval")
    test_file = world_dir / "test.jsonl"
    n, n_sag = cfg.eval_limit, min(cfg.sag_limit or len(test_q), cfg.eval_limit or len(test_q))
    runs = [  # (label, model, mode, SAG N, index, questions): the same first n test questions
        ("untrained agent", models / "base-int4", "agent", 1, str(index_dir), n),
        ("CoT-distilled", models / "cot-int4", "cot", 1, None, n),
        ("CoT-distilled + passages", models / "cot-int4", "cot", 1, str(index_dir), n),
        ("agent-distilled (HF)", out / "train-agent" / "merged", "agent", 1, str(index_dir), n),
        ("agent-distilled (INT4)", models / "agent-int4", "agent", 1, str(index_dir), n),
        (f"agent-distilled (INT4) + SAG{cfg.sag}", models / "agent-int4", "agent", cfg.sag, str(index_dir), n_sag),
    ]
    subset = f"agent-distilled (INT4), first {n_sag}"
    if n_sag < (n or len(test_q)):  # the N=1 agent on SAG's questions, from its predictions (no new runs)
        runs.insert(5, (subset, models / "agent-int4", "agent", 1, str(index_dir), n_sag))
    run_dirs, summaries = [], []
    for label, model, mode, sag, idx, limit in runs:
        run_dir = out / "eval" / _slug(label)
        if label == subset and not run_dir.exists():
            _first_predictions(out / "eval" / _slug("agent-distilled (INT4)"), run_dir, n_sag)
        _log(f"eval: {label}")
        # The engine batches questions in flight; a transformers model and SAG's 8 rows run one question at a time.
        batched = sag == 1 and is_built(Path(model))
        summaries.append(evaluate(str(model), test_file, run_dir, mode=mode, sag=sag, index=idx, limit=limit,
                                  max_steps=cfg.max_steps, label=label, concurrency=cfg.concurrency if batched else 1))
        run_dirs.append(run_dir)
    done("eval")

    _log("results")
    table = compare(run_dirs, chart=out / "results.png")
    teacher = "oracle (from each question's derivation)" if cfg.teacher == "oracle" else \
        f"LLM: {cfg.teacher_model} at {cfg.teacher}"
    results = {"config": asdict(cfg), "teacher": teacher,
               "teacher_summary": teacher_summary, "train_questions": len(train_q), "test_questions": len(test_q),
               "runs": summaries, "parity": parity, "stage_seconds": timings}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results
