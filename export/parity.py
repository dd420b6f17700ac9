"""How much did the export cost? Compare the source model (transformers) with the exported one
(onnxruntime-genai) on the same agent-style prompts and the same held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SYSTEM = (
    "You are an expert assistant who solves tasks with code. At each step write 'Thought:' with your "
    "reasoning, then 'Code:' and a ```py block ending with <end_code>. Tools: web_search(query: str) -> str, "
    "final_answer(answer)."
)
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


def _prompt_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _OnnxScorer:
    """Teacher-forced next-token logits from onnxruntime-genai, one token at a time."""

    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))

    def start(self, ids: list[int]):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + CONTINUATION_TOKENS + 512, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        return gen

    @staticmethod
    def logits(gen) -> np.ndarray:
        return np.asarray(gen.get_logits(), dtype=np.float64).reshape(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - math.log(np.exp(x).sum())


def parity_report(model, tokenizer, onnx_dir: Path) -> dict:
    import torch

    onnx = _OnnxScorer(onnx_dir)
    agree = total = exact = 0
    for question in QUESTIONS:
        ids = _prompt_ids(tokenizer, question)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=CONTINUATION_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        reference = out[0, len(ids):].tolist()
        # Teacher-forced: does the exported model pick the source's token at every position?
        gen = onnx.start(ids)
        for token in reference:
            agree += int(onnx.logits(gen).argmax() == token)
            total += 1
            gen.append_tokens(np.array([token], dtype=np.int32))
        # Free-running: does its own greedy continuation match token for token?
        gen = onnx.start(ids)
        own = []
        for _ in reference:
            own.append(int(onnx.logits(gen).argmax()))
            gen.append_tokens(np.array([own[-1]], dtype=np.int32))
        exact += int(own == reference)

    ids = tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        source_nll = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    gen = onnx.start(ids[:1])
    nll = 0.0
    for token in ids[1:]:
        nll -= _log_softmax(onnx.logits(gen))[token]
        gen.append_tokens(np.array([token], dtype=np.int32))
    onnx_nll = nll / (len(ids) - 1)

    agreement = agree / total
    return {
        "prompts": len(QUESTIONS),
        "top1_agreement": round(agreement, 4),
        "greedy_exact_match": round(exact / len(QUESTIONS), 4),
        "perplexity_source": round(math.exp(source_nll), 3),
        "perplexity_export": round(math.exp(onnx_nll), 3),
        "agreement_goal": AGREEMENT_GOAL,
        "meets_goal": agreement >= AGREEMENT_GOAL,
    }


def format_report(report: dict) -> str:
    rows = [
        ("top-1 next-token agreement", f"{report['top1_agreement']:.1%}"),
        ("greedy continuation exact match", f"{report['greedy_exact_match']:.1%}"),
        ("perplexity, source (transformers)", f"{report['perplexity_source']:.3f}"),
        ("perplexity, export (onnxruntime-genai)", f"{report['perplexity_export']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if not report["meets_goal"]:
        lines.append(
            f"WARNING: top-1 agreement {report['top1_agreement']:.1%} is below the {AGREEMENT_GOAL:.0%} goal: "
            "this export answers noticeably differently from its source."
        )
    return "\n".join(lines)
