"""A transformers backend, for evaluating an HF student (e.g. the merged output of training)
before export, or using one as a local teacher. Same interface as the runtime's backends."""

from __future__ import annotations

import time
from pathlib import Path

from attar.runtime.llm import Backend, Generation, Sampling, cut_at_stop
from attar.runtime.turns import renderer


class TransformersBackend(Backend):
    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = Path(path).name
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.render = renderer(self.tokenizer.chat_template or "")

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        began = time.perf_counter()
        text = self.render(messages, prefix)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        kwargs = {"max_new_tokens": sampling.max_new_tokens, "do_sample": not sampling.greedy,
                  "pad_token_id": self.tokenizer.eos_token_id}
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            if sampling.seed is not None:
                self.torch.manual_seed(sampling.seed)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with self.torch.no_grad():
            out = self.model.generate(**ids, **kwargs)
        new = out[0, ids["input_ids"].shape[1]:]
        text, stopped_by = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), list(stop))
        if on_text:
            on_text(text)
        seconds = time.perf_counter() - began
        return Generation(text=text, prompt_tokens=ids["input_ids"].shape[1], completion_tokens=len(new),
                          seconds=seconds, stopped_by=stopped_by)
