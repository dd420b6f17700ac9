"""Model backends. The agent only needs `generate(messages, ...) -> Generation`: attar's engine
runs exported models on the laptop's CPU, onnxruntime-genai on an NPU or GPU provider, an
OpenAI-compatible server can stand in (teachers), and a scripted backend replays fixed outputs
for tests and demos. Every local prompt is rendered by `turns` (the one turn format)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from attar.runtime.engine import ContextFull, Engine, Request
from attar.runtime.modeldir import ExportDir, ModelError
from attar.runtime.turns import Message, TemplateError, render


@dataclass
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    stopped_by: str | None = None  # the stop string that ended it, if any
    cached_tokens: int = 0  # prompt tokens whose KV was already cached (attar's engine)


class Backend:
    """A model the agent can ask: `generate` one continuation of a conversation; `generate_batch`
    samples several of the same prompt (SAG's candidates), one by one unless a backend batches."""

    name: str = "model"

    def generate(
        self,
        messages: list[Message],
        stop: list[str] = (),
        sampling: Sampling = Sampling(),
        on_text: Callable[[str], None] | None = None,
        prefix: str = "",  # start of the assistant turn, which the model continues
    ) -> Generation:
        raise NotImplementedError

    def generate_batch(self, messages: list[Message], samplings: list[Sampling], stop: list[str] = ()) -> list[Generation]:
        return [self.generate(messages, stop, sampling) for sampling in samplings]

    def close(self) -> None:
        """Stop answering: generations in flight end with an error and later ones are refused (a
        job interrupted mid-run). Nothing to stop for a backend that answers one call at a time."""


class BackendError(Exception):
    """The model backend cannot answer (an unreachable server, a rejected request): one line."""


class PromptTooLong(BackendError):
    """The conversation does not fit in the model's context."""


def is_repeating(ids: list[int], min_span: int = 48, max_period: int = 64) -> bool:
    """True when the tail of `ids` is one chunk of up to `max_period` tokens repeated back to back
    over at least `min_span` tokens (and 3 times): small models loop, and every looped token costs."""
    n = len(ids)
    for period in range(1, max_period + 1):
        reps = max(3, -(-min_span // period))
        if reps * period > n:
            break
        tail = ids[n - period:]
        if all(ids[n - (r + 1) * period:n - r * period] == tail for r in range(1, reps)):
            return True
    return False


class _Streamer:
    """Hands generated text to `on_text` as it grows, holding back a tail that might still turn
    into a stop string (so `<end_code>` never shows as a half-printed `<end_code`)."""

    def __init__(self, on_text: Callable[[str], None] | None, stop) -> None:
        self.on_text, self.hold, self.sent = on_text, max((len(s) for s in stop), default=1) - 1, 0

    def update(self, text: str, final: bool = False) -> None:
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if self.on_text and end > self.sent:
            self.on_text(text[self.sent:end])
        self.sent = max(self.sent, end)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, str | None]:
    """Text up to the earliest stop string, and which one it was."""
    best, which = len(text), None
    for s in stop:
        i = text.find(s)
        if i != -1 and i < best:
            best, which = i, s
    return text[:best], which


class _Text:
    """One generation's tokens as text: cut at the first stop string, streamed without a
    half-printed stop string, ended when the model repeats itself. `accept` takes each token
    and says whether the generation is over."""

    def __init__(self, decode: Callable[[list[int]], str], stop, on_text: Callable[[str], None] | None = None):
        self.decode, self.stop = decode, list(stop)
        self.tokens: list[int] = []
        self.text, self.stopped_by = "", None
        self.stream = _Streamer(on_text, self.stop)

    def accept(self, token: int) -> bool:
        self.tokens.append(token)
        full = self.decode(self.tokens)
        if not full.endswith("\ufffd"):  # wait for a whole character
            self.text = full
        self.text, self.stopped_by = cut_at_stop(self.text, self.stop)
        if self.stopped_by is None and len(self.tokens) % 8 == 0 and is_repeating(self.tokens):
            self.stopped_by = "repetition"
        if self.stopped_by is None:
            self.stream.update(self.text)
        return self.stopped_by is not None

    def finish(self) -> str:
        self.stream.update(self.text, final=True)
        return self.text


class EngineBackend(Backend):
    """An exported model run by attar's engine (`runtime/engine.py`) on the CPU, the one CPU
    backend: the KV cache outlives a call, so an agent's next step prefills only what was
    appended, the N samples of a SAG step share one prefill of their prompt, and calls from
    several threads (agents run side by side) decode in one batch. Greedy requests, up to 3 in
    flight, step several tokens at a time where that leaves their tokens as they are (on attar's
    kernels); `speculate=True`, for a backend that serves one stream (an Agent's own), lets it on
    onnxruntime's ops too, whose tokens can differ at a near tie from the one-token steps it would
    take beside others (`engine.py`)."""

    def __init__(self, model: str | os.PathLike | ExportDir, adapter: str | None = None, threads: int | None = None,
                 max_rows: int = 8, int8: bool = True, speculate: bool | None = None, kernel: bool | None = None):
        folder = model if isinstance(model, ExportDir) else ExportDir.open(model)
        self.adapter = folder.choose_adapter(adapter)
        self.name = f"{folder.name}+{self.adapter}" if self.adapter else folder.name
        tokenizer_file = folder.tokenizer_file  # inside the folder and of a sane size, or a ModelError
        self.render = folder.renderer()
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises its own exception type for a bad file
            raise ModelError(f"{tokenizer_file}: cannot read the tokenizer: {str(exc)[:200]}") from None
        extra = folder.adapter_params(self.adapter) if self.adapter else {}
        self.engine = _load(folder, lambda: Engine(folder, threads=threads, extra_inputs=extra, max_rows=max_rows,
                                                      int8=int8, speculate=speculate, kernel=kernel), folder.graph(int8))
        self.eos = folder.eos  # the engine bounds the context itself

    def encode(self, messages: list[Message], prefix: str = "") -> list[int]:
        try:
            text = self.render(messages, prefix)
        except TemplateError as exc:
            raise BackendError(str(exc)) from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _request(self, ids: list[int], sampling: Sampling, text: _Text) -> Request:
        return Request(ids, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                       sampling.seed, self.eos, text.accept)

    @staticmethod
    def _generation(text: _Text, request: Request) -> Generation:
        return Generation(text=text.finish(), prompt_tokens=len(request.ids), completion_tokens=len(request.out),
                          seconds=time.perf_counter() - request.began, first_token_seconds=request.first_token_s,
                          stopped_by=text.stopped_by, cached_tokens=request.reused)

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        text = _Text(self._decode, stop, on_text)
        try:
            return self._generation(text, self.engine.run(self._request(self.encode(messages, prefix), sampling, text)))
        except ContextFull as exc:
            raise PromptTooLong(f"the conversation is too long for {self.name}: {exc}") from None

    def generate_batch(self, messages, samplings: list[Sampling], stop=()) -> list[Generation]:
        """One request per sampling, decoded as one batch: the first prefills the prompt (reusing
        the cache of earlier steps), the others copy its cache; each row is cut at its own stop
        string and leaves the batch when it ends."""
        ids = self.encode(messages, "")
        texts = [_Text(self._decode, stop) for _ in samplings]
        try:
            requests = [self.engine.submit(self._request(ids, s, t)) for s, t in zip(samplings, texts)]
        except ContextFull as exc:
            raise PromptTooLong(f"the conversation is too long for {self.name}: {exc}") from None
        return [self._generation(text, self.engine.wait(request)) for text, request in zip(texts, requests)]

    def close(self) -> None:
        self.engine.close()


class OnnxBackend(Backend):
    """An exported model run by onnxruntime-genai: the backend for a non-CPU execution provider
    (an NPU or GPU that this onnxruntime-genai build has). On the CPU, EngineBackend runs every
    export; there this class is only the independent reference the engine is tested against."""

    def __init__(self, model: str | os.PathLike | ExportDir, provider: str = "cpu", provider_options: dict | None = None,
                 adapter: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        folder = model if isinstance(model, ExportDir) else ExportDir.open(model)
        self.context_length = folder.context
        self.render = folder.renderer()
        self.adapter = folder.choose_adapter(adapter)
        self.name = f"{folder.name}+{self.adapter}" if self.adapter else folder.name

        def load():
            config = og.Config(str(folder.path))
            if provider != "cpu":
                config.clear_providers()
                config.append_provider(provider)
                for key, value in (provider_options or {}).items():
                    config.set_provider_option(provider, key, str(value))
            return og.Model(config)

        self.model = _load(folder, load)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = None
        if self.adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(folder.adapter_file(self.adapter)), self.adapter)

    def _generator(self, sampling: Sampling, prompt_tokens: int):
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": min(self.context_length, prompt_tokens + sampling.max_new_tokens),
                   "do_sample": not sampling.greedy}
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        if self.adapter:
            generator.set_active_adapter(self.adapters, self.adapter)
        return generator

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        began = time.perf_counter()
        try:
            ids = self.tokenizer.encode(self.render(messages, prefix))
        except TemplateError as exc:
            raise BackendError(str(exc)) from None
        if len(ids) >= self.context_length:
            raise PromptTooLong(f"the conversation is too long for {self.name}: {len(ids)} tokens, "
                                f"context {self.context_length}")
        generator = self._generator(sampling, len(ids))
        generator.append_tokens(ids)
        text, first = _Text(lambda t: self.tokenizer.decode(np.array(t, dtype=np.int32)), stop, on_text), None
        while not generator.is_done():
            generator.generate_next_token()
            first = first if first is not None else time.perf_counter() - began
            if text.accept(int(generator.get_next_tokens()[0])):
                break
        return Generation(text=text.finish(), prompt_tokens=len(ids), completion_tokens=len(text.tokens),
                          seconds=time.perf_counter() - began, first_token_seconds=first, stopped_by=text.stopped_by)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None  # not Linux: let onnxruntime try


def _load(folder: ExportDir, load: Callable, graph: Path | None = None):
    """`load()` a model, or a one-line ModelError: refused up front when it cannot fit
    (onnxruntime needs about its weights' size again while it loads them, for prepacking), and
    onnxruntime's long C++ messages cut to their first line."""
    weights = folder.graph_bytes(graph or folder.decoder)
    available = _available_bytes()
    if available is not None and weights * 1.5 > available:
        raise ModelError(f"{folder.name} needs about {weights * 1.5 / 2**30:.1f} GiB of memory to load; "
                         f"this machine has {available / 2**30:.1f} GiB available. Try a smaller model "
                         "(`attar models`) or close other programs.")
    try:
        return load()
    except ModelError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {folder.path}: {first[:300]}") from None


class OpenAIBackend(Backend):
    """Any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, a hosted API).

    Several base URLs fan requests out round-robin (a cluster of vLLM servers). Transient
    failures (connection errors, 429, 5xx) are retried with exponential backoff. A `prefix`
    (the first-thought prefix of distillation) is continued either through the chat API
    (`continue_final_message`, vLLM) or, with `completions=True`, by rendering ChatML locally
    and calling the completions endpoint, which every server has."""

    RETRIES = 5  # for overload (429, 5xx, timeouts): the server is up and will answer
    UNREACHABLE_RETRIES = 2  # a refused or unresolvable address rarely comes back within seconds

    def __init__(self, base_url: str | list[str], model: str, api_key: str | None = None, timeout: float = 300.0,
                 completions: bool = False):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.base_urls = [u.rstrip("/") for u in urls]
        self.name = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout = timeout
        self.completions = completions
        self._next = itertools.count()

    def _post(self, path: str, body: dict) -> dict:
        """POST with bounded retries; every failure ends in a one-line BackendError."""
        delay, attempt, unreachable = 1.0, 0, 0
        while True:
            url = self.base_urls[next(self._next) % len(self.base_urls)] + path
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in (408, 429) and exc.code < 500 or attempt >= self.RETRIES:
                    detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
                    raise BackendError(f"{url} answered HTTP {exc.code}: {detail or exc.reason}") from None
                why = f"HTTP {exc.code}"
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                timed_out = isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError)
                unreachable += not timed_out
                if unreachable > self.UNREACHABLE_RETRIES or attempt >= self.RETRIES:
                    raise BackendError(f"cannot reach {url}: {reason}") from None
                why = str(reason)
            except ValueError as exc:  # the body is not JSON
                raise BackendError(f"{url} did not answer with JSON: {exc}") from None
            attempt += 1
            print(f"{url}: {why}; retrying in {delay:.0f}s ({attempt}/{self.RETRIES})", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        began = time.perf_counter()
        body = {"model": self.name, "max_tokens": sampling.max_new_tokens,
                "temperature": max(sampling.temperature, 0.0), "top_p": sampling.top_p, "stop": list(stop)}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.completions:
            reply = self._post("/completions", {**body, "prompt": render(messages, prefix)})
            raw = _choice(reply, url=self.base_urls[0]).get("text") or ""
        else:
            if prefix:
                messages = [*messages, {"role": "assistant", "content": prefix}]
                body.update(continue_final_message=True, add_generation_prompt=False)
            reply = self._post("/chat/completions", {**body, "messages": messages})
            raw = (_choice(reply, url=self.base_urls[0]).get("message") or {}).get("content") or ""
        choice = _choice(reply, url=self.base_urls[0])
        text, stopped_by = cut_at_stop(raw, list(stop))
        if stopped_by is None and choice.get("finish_reason") == "stop" and stop and "```" in text:
            stopped_by = stop[0]  # servers strip the stop string they matched
        if on_text:
            on_text(text)
        usage = reply.get("usage") or {}
        seconds = time.perf_counter() - began
        return Generation(text=text, prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0), seconds=seconds,
                          first_token_seconds=seconds, stopped_by=stopped_by)



def _choice(reply, url: str) -> dict:
    """The first choice of a reply, or a BackendError that says what came back instead."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise BackendError(f"{url} answered without choices: {str(reply)[:200]}")
    return choices[0]


@dataclass
class ScriptedBackend(Backend):
    """Replays fixed outputs in order, cut at the stop strings like a real model's."""

    outputs: list[str]
    name: str = "scripted"
    seen: list[list[Message]] = field(default_factory=list)

    def generate(self, messages, stop=(), sampling=Sampling(), on_text=None, prefix: str = "") -> Generation:
        self.seen.append([dict(m) for m in messages] + ([{"role": "prefix", "content": prefix}] if prefix else []))
        raw = self.outputs.pop(0) if self.outputs else ""
        text, stopped_by = cut_at_stop(raw, list(stop))
        if on_text:
            on_text(text)
        return Generation(text=text, prompt_tokens=sum(len(m["content"]) for m in messages) // 4,
                          completion_tokens=len(text) // 4, stopped_by=stopped_by)
