"""How much did the export cost? Two scorers, the source and the export, score the same token ids:
agent-style prompts followed by the export's own greedy continuation, and a held-out text.

A scorer maps whole sequences to next-token logits. The source is the GGUF in numpy
(`reference.GGUFScorer`, torch-free) or a transformers model (`TorchScorer`, for HF folders); the
export is the ONNX graph run by onnxruntime in one pass per sequence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from attar.runtime import kernels, prompts
from attar.runtime.engine import Request
from attar.runtime.gguf_import import whole_sequence_feeds
from attar.runtime.llm import EngineBackend
from attar.runtime.modeldir import ExportDir, keep_last_positions
from attar.runtime.retrieval import web_search_tool
from attar.runtime.tools import describe, final_answer

QUESTIONS = [
    "What is 17 multiplied by 23?",
    "How many days are there between 2021-03-01 and 2021-07-15?",
    "Which river flows through the capital of France?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Who wrote the novel that the film Blade Runner is based on?",
    "What is the sum of the first 50 prime numbers?",
    "If a train travels 180 km in 2.5 hours, what is its average speed?",
    "Find the population of the largest city in Australia and double it.",
]
HELD_OUT = (
    "The river rises in the eastern hills and flows west for about two hundred kilometres before it "
    "reaches the sea. Along its course it passes three market towns, each founded in the twelfth century "
    "around a bridge. Thought: I need the length of the river and the founding year of the first town.\n"
    "Code:\n```py\nresult = web_search(\"river length and market towns\")\nprint(result)\n```<end_code>"
)
CONTINUATION_TOKENS = 24
AGREEMENT_GOAL = 0.95


class Scorer(Protocol):
    name: str

    def logits(self, sequences: list[list[int]], progress: Callable[[int, int], None] = ...,
               positions: list[slice] | None = None) -> list[np.ndarray]: ...


class OnnxScorer:
    """The exported decoder run by onnxruntime directly: whole sequences, empty KV cache."""

    name = "export (onnxruntime)"

    def __init__(self, model: ExportDir, adapter: str | None = None, graph: Path | None = None,
                 kernel: bool | None = None):
        """`adapter`: which of the export's LoRA adapters to feed (None: its default one;
        "base": none). `graph`: another decoder graph of the folder (default: its decoder).
        `kernel`: on attar's kernels (None: where built, as the engine runs)."""
        import onnxruntime as ort

        chosen = model.choose_adapter(adapter)
        self.extra: dict[str, np.ndarray] = model.adapter_params(chosen) if chosen else {}
        self.layers, self.kv_heads, self.head = model.layers, model.kv_heads, model.head
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # attar's exports compute logits for the last position only; scoring needs every position.
        self.session, self.kernel = kernels.session(graph or model.decoder, options, kernel,
                                                    lambda m: keep_last_positions(m, None))
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.cache = kernels.cache_dtype(self.session, model.io_names["past_key_names"] % 0)

    def logits(self, sequences, progress=lambda i, n: None, positions=None):
        out = []
        for n, ids in enumerate(sequences):
            progress(n, len(sequences))
            feeds = {**whole_sequence_feeds(ids, self.layers, self.kv_heads, self.head, self.cache), **self.extra}
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
            if self.kernel:
                feeds[kernels.SHARED] = kernels.NO_SHARES
            logits = self.session.run(["logits"], feeds)[0][0]
            out.append(logits if positions is None else logits[positions[n]])
        progress(len(sequences), len(sequences))
        return out


def _greedy(backend: EngineBackend, prompts: list[list[int]]) -> list[list[int]]:
    """The export's own greedy continuations, by the engine that runs it (its default adapter
    active)."""
    out = []
    for ids in prompts:
        request = backend.engine.run(Request(ids, CONTINUATION_TOKENS, eos=backend.eos))
        out.append(list(request.out))
    return out


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def parity_report(reference: Scorer, model_dir: Path, log: Callable[[str], None] = lambda m: None,
                  questions: int | None = None, kernel: bool | None = None) -> dict:
    """Score the first `questions` agent prompts + the export's greedy continuations, and
    HELD_OUT, with both. Only the positions compared are kept (a Qwen vocabulary makes every
    kept position 0.6 MB). `kernel`: on attar's kernels (None: where they are built)."""
    folder = ExportDir.open(model_dir)
    backend = EngineBackend(folder, int8=False, kernel=kernel)  # the exact graph's own continuations
    tools = (web_search_tool(index=None), final_answer)  # described, never called
    system = prompts.system("\n".join(describe(t) for t in tools))
    prompts_ids = [backend.encode([{"role": "system", "content": system}, {"role": "user", "content": q}])
                   for q in QUESTIONS[:questions]]
    log(f"  greedy continuations of {len(prompts_ids)} agent prompts (export)")
    continuations = _greedy(backend, prompts_ids)
    held_out = backend.tokenizer.encode(HELD_OUT, add_special_tokens=False).ids
    del backend  # its session's memory, before the scorer loads its own
    sequences = [p + c for p, c in zip(prompts_ids, continuations)] + [held_out]

    def progress(name: str) -> Callable[[int, int], None]:
        def report(i: int, n: int) -> None:
            if i == n or i % max(1, n // 4) == 0:
                log(f"  scoring with {name}: {i}/{n}")
        return report

    spans = [slice(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts_ids, continuations)] + [slice(None)]
    scorer = OnnxScorer(folder, kernel=kernel)
    export = scorer.logits(sequences, progress("the export"), positions=spans)
    source = reference.logits(sequences, progress(reference.name), positions=spans)
    agree = total = exact = 0
    for cont, s in zip(continuations, source):
        matches = s.argmax(-1) == np.array(cont)  # would the source pick the export's token?
        agree, total, exact = agree + int(matches.sum()), total + len(cont), exact + int(matches.all())
    held = sequences[-1]
    agreement = agree / max(total, 1)
    report = {
        "reference": reference.name,
        "attention": "attar kernel" if scorer.kernel else "onnxruntime",
        "prompts": len(prompts_ids),
        "top1_agreement": round(agreement, 4),
        "greedy_exact_match": round(exact / max(len(prompts_ids), 1), 4),
        "held_out_top1_agreement": round(float((export[-1].argmax(-1) == source[-1].argmax(-1)).mean()), 4),
        "max_abs_logit_diff": round(float(max(np.abs(e - s).max() for e, s in zip(export, source))), 4),
        "perplexity_source": round(math.exp(_nll(source[-1], held)), 3),
        "perplexity_export": round(math.exp(_nll(export[-1], held)), 3),
        "agreement_goal": AGREEMENT_GOAL,
        "meets_goal": agreement >= AGREEMENT_GOAL,
        "kernels": kernels.build_name(kernel),  # what it was measured on: a rebuild can move the logits
    }
    if folder.int8_decoder is not None:
        del export
        many = OnnxScorer(folder, graph=folder.int8_decoder, kernel=kernel).logits(sequences, progress("the int8 graph"),
                                                                         positions=spans)
        picks = np.concatenate([m.argmax(-1) for m in many[:-1]] or [np.zeros(0)])
        wanted = np.concatenate([s.argmax(-1) for s in source[:-1]] or [np.zeros(0)])
        report["int8"] = {
            "graph": folder.int8_decoder.name,
            "top1_agreement": round(float((picks == wanted).mean()) if len(wanted) else 1.0, 4),
            "held_out_top1_agreement": round(float((many[-1].argmax(-1) == source[-1].argmax(-1)).mean()), 4),
            "max_abs_logit_diff": round(float(max(np.abs(m - s).max() for m, s in zip(many, source))), 4),
            "perplexity_export": round(math.exp(_nll(many[-1], held)), 3),
        }
    return report


def format_report(report: dict) -> str:
    rows = [
        ("reference", report.get("reference", "source")),
        ("attention", report.get("attention", "onnxruntime")),
        ("top-1 next-token agreement", f"{report['top1_agreement']:.1%}"),
        ("greedy continuation exact match", f"{report['greedy_exact_match']:.1%}"),
        ("perplexity, source", f"{report['perplexity_source']:.3f}"),
        ("perplexity, export", f"{report['perplexity_export']:.3f}"),
    ]
    if "int8" in report:
        many = report["int8"]
        rows += [("int8 graph: top-1 agreement", f"{many['top1_agreement']:.1%}"),
                 ("int8 graph: perplexity", f"{many['perplexity_export']:.3f}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if not report["meets_goal"]:
        lines.append(
            f"WARNING: top-1 agreement {report['top1_agreement']:.1%} is below the {AGREEMENT_GOAL:.0%} goal: "
            "this export answers noticeably differently from its source."
        )
    return "\n".join(lines)
