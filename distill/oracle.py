"""The oracle teacher for the generated world: it knows each question's derivation and acts it
out as a real CodeAct agent (real web_search over the real index, real sandbox), so its
trajectories look exactly like an LLM teacher's, with varied wording and, now and then, a
recoverable mistake. It also writes the CoT trace of the same derivation (facts and arithmetic
in prose). When retrieval does not surface a fact, it retries with another query; if that fails
too it gives up, and the filter drops the trajectory, as it would an LLM teacher's."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from attar.distill.data import Question
from attar.distill.runner import run_questions
from attar.distill.scoring import Outcome, score_run
from attar.distill.teacher import summarize, trajectory_record
from attar.runtime import prompts
from attar.runtime.agent import Agent
from attar.runtime.llm import Backend, Generation, Sampling
from attar.runtime.retrieval import web_search_tool

ATTR_WORDS = {"population": "population", "area": "area in square kilometres", "river": "river", "founded": "founding year",
              "length": "length in kilometres", "employees": "number of employees", "hq": "headquarters",
              "born": "birth year", "birthplace": "birthplace", "employer": "employer", "year": "year of invention",
              "inventor": "inventor"}
SEARCH_THOUGHTS = ["I need the {what}. Let me search for it.", "First I have to find the {what}.",
                   "To answer, I should look up the {what}.", "The next thing to find is the {what}."]
FINAL_THOUGHTS = ["I have every fact now: {facts}. I can compute the answer.",
                  "From the documents: {facts}. Now the arithmetic.", "Found it all ({facts}); let me compute."]


def _literal(value) -> str:
    return repr(value)


class OracleBackend(Backend):
    """Acts out one question's plan; a Backend for the runtime's Agent."""

    name = "oracle"

    def __init__(self, record: dict, rng: random.Random, mistake_rate: float = 0.15):
        self.plan = record["plan"]
        self.expression = record["expression"]
        self.rng = rng
        self.known: dict[str, object] = {}
        self.tried: dict[str, int] = {}  # var -> searches made for it
        self.pending: list[dict] = []  # facts searched in the last step
        self.mistake = rng.random() < mistake_rate
        self.gave_up = False

    def _ready(self, fact: dict) -> bool:
        """A fact can be searched once the entity it is about is known (or named in the question)."""
        producer = next((f for f in self.plan if f["value"] == fact["entity"] and f is not fact), None)
        return producer is None or producer["var"] in self.known

    def _read(self, observation: str) -> None:
        for fact in self.pending:
            if re.search(rf"(?<![\w]){re.escape(str(fact['value']))}(?![\w])", observation):
                self.known[fact["var"]] = fact["value"]
        self.pending = []

    def _query(self, fact: dict) -> str:
        what = ATTR_WORDS[fact["attribute"]]
        if self.tried.get(fact["var"], 0) == 0:
            return self.rng.choice([f"{fact['entity']} {what}", f"{what} of {fact['entity']}"])
        return fact["entity"]  # a broader second try

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        if messages[-1]["role"] == "user" and messages[-1]["content"].startswith("Observation:"):
            self._read(messages[-1]["content"])
        missing = [f for f in self.plan if f["var"] not in self.known]
        if missing:
            batch = [f for f in missing if self._ready(f) and self.tried.get(f["var"], 0) < 2]
            if not batch:
                self.gave_up = True
                text = ("Thought: I could not find the facts I need in the documents, so I cannot compute it.\nCode:\n"
                        "```py\nfinal_answer('unknown')\n```")
                return _said(text)
            what = " and the ".join(ATTR_WORDS[f["attribute"]] + f" of {f['entity']}" for f in batch)
            lines = []
            for fact in batch:
                line = f"print(web_search({self._query(fact)!r}))"
                self.tried[fact["var"]] = self.tried.get(fact["var"], 0) + 1
                if line not in lines:
                    lines.append(line)
            self.pending = batch
            text = f"Thought: {self.rng.choice(SEARCH_THOUGHTS).format(what=what)}\nCode:\n```py\n" + "\n".join(lines) + "\n```"
            return _said(text)
        facts = ", ".join(f"{f['attribute']} of {f['entity']} is {f['value']}" for f in self.plan)
        assignments = "\n".join(f"{f['var']} = {_literal(f['value'])}" for f in self.plan
                                if not isinstance(f["value"], str))
        if self.mistake:
            self.mistake = False  # write it wrong once: a variable that was never defined
            text = (f"Thought: {self.rng.choice(FINAL_THOUGHTS).format(facts=facts)}\nCode:\n```py\n"
                    f"answer = {self.expression.replace(self.plan[-1]['var'], self.plan[-1]['var'] + '_value')}\n"
                    "final_answer(answer)\n```")
            return _said(text)
        text = (f"Thought: {self.rng.choice(FINAL_THOUGHTS).format(facts=facts)}\nCode:\n```py\n{assignments}\n"
                f"answer = {self.expression}\nfinal_answer(answer)\n```")
        return _said(text)


def _said(text: str) -> Generation:
    """A scripted step, as a model's generation that stopped at <end_code>."""
    return Generation(text=text, completion_tokens=len(text) // 4, stopped_by="<end_code>")


def cot_trace(record: dict, rng: random.Random) -> str:
    """The same derivation in prose, one short paragraph per fact, then the arithmetic."""
    paras = [rng.choice(["Let me work through the facts.", "I will find each fact in turn.", "Step by step:"])]
    for f in record["plan"]:
        paras.append(rng.choice(["The {a} of {e} is {v}.", "{e} has {a} {v}.", "According to what I know, the {a} of {e} is {v}."])
                     .format(a=ATTR_WORDS[f["attribute"]], e=f["entity"], v=f["value"]))
    expr = record["expression"]
    for f in record["plan"]:
        if not isinstance(f["value"], str):
            expr = re.sub(rf"\b{f['var']}\b", str(f["value"]), expr)
    paras.append(f"So the answer is {expr} = {record['answer']}.\n\n\\boxed{{{record['answer']}}}")
    return "\n\n".join(paras)


def generate_oracle(records: list[dict], index, out_dir: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Oracle trajectories for every record not yet in OUT/trajectories.jsonl (resumable)."""
    tool = web_search_tool(index)

    def one(rec: dict) -> dict:
        rng = random.Random(f"{seed}-{rec['id']}")
        q = Question(rec["id"], rec["question"], rec["answer"], rec.get("kind", "factual"))
        began = time.perf_counter()
        with Agent(OracleBackend(rec, rng), tools=[tool], max_steps=5) as agent:
            result = agent.run(q.question)
            messages = agent.memory.messages()
        messages[0] = {"role": "system", "content": prompts.system(agent.tool_descriptions)}
        correct = score_run(result, q.answer, q.kind) == Outcome.CORRECT
        return trajectory_record(q, result, messages, "oracle", began, correct, ftp=None, cot=cot_trace(rec, rng),
                                 cot_prediction=q.answer, cot_correct=True)

    done, failures = run_questions(records, lambda r: str(r["id"]), one, Path(out_dir) / "trajectories.jsonl",
                                   desc="oracle", progress=progress)
    if failures:
        raise RuntimeError(f"{len(failures)} oracle trajectories failed, e.g. {failures[0]}")
    return summarize(done)
