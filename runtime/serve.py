"""`attar serve`: the local model and the agent behind an OpenAI-compatible HTTP server, warm
between calls (pip install 'attar[serve]': Starlette and uvicorn).

    POST /v1/chat/completions   the model, as OpenAI's API has it (streaming or not); the model
                                name `attar-agent` runs the agent on the last user message
                                instead (with /v1/agent's settings) and answers with its
                                final answer
    GET  /v1/models             the model and `attar-agent`
    POST /v1/agent              the agent, each step streamed as server-sent events (what
                                `attar chat --server` reads)
    GET  /attar/info            what this server runs (model, adapter, index)

Every request is hostile until checked: bodies, messages, tokens and time are bounded, at
most `concurrency` requests run at once (a few more wait, the rest get 429), a client that
goes away ends its generation at the next token and its sandbox with it, and every error is an
OpenAI-style JSON error with the status code clients expect. Requests share the engine, so
concurrent ones decode in one batch and reuse each other's prompt cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from attar.runtime.agent import Agent
from attar.runtime.llm import Backend, PromptTooLong, Sampling
from attar.runtime.sag import SAMPLING as SAG_SAMPLING
from attar.runtime.sandbox import Sandbox

AGENT_MODEL = "attar-agent"
DEFAULT_PORT = 8765


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    concurrency: int = 8  # requests generating at once (one engine batch)
    queue: int = 16  # requests waiting beyond those; more get 429
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_chars: int = 200_000  # all message contents together
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 512
    timeout_s: float = 300.0  # per request, generation and agent run alike
    max_agent_steps: int = 10
    max_sag: int = 8


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class Cancelled(Exception):
    """The client went away or the request ran out of time: its generation stops here."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# -- request checks ---------------------------------------------------------------------------


def _bounded(value: Any, name: str, kind: type, low: float, high: float, default: Any) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise HTTPError(400, f"'{name}' must be a number" if kind is float else f"'{name}' must be an integer")
    if not low <= value <= high:
        raise HTTPError(400, f"'{name}' must be between {low} and {high}")
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise HTTPError(400, f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise HTTPError(400, f"messages[{i}].content must be a string")
    return content


def parse_chat(body: dict, cfg: ServeConfig) -> tuple[list[dict], Sampling, list[str], bool, dict]:
    """A chat request, checked: (messages, sampling, stop strings, stream, stream_options)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list")
    if len(messages) > cfg.max_messages:
        raise HTTPError(400, f"at most {cfg.max_messages} messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, f"messages[{i}] needs a role of system, user or assistant")
        clean.append({"role": m["role"], "content": _content(m, i)})
    if sum(len(m["content"]) for m in clean) > cfg.max_chars:
        raise HTTPError(400, f"the messages hold more than {cfg.max_chars} characters", code="context_length_exceeded")
    if body.get("n", 1) != 1:
        raise HTTPError(400, "'n' must be 1")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = Sampling(
        max_new_tokens=_bounded(max_tokens, "max_tokens", int, 1, cfg.max_tokens, cfg.default_max_tokens),
        temperature=float(_bounded(body.get("temperature"), "temperature", float, 0, 2, 1.0)),
        top_p=float(_bounded(body.get("top_p"), "top_p", float, 0, 1, 1.0)),
        seed=_bounded(body.get("seed"), "seed", int, -2**63, 2**63 - 1, None))
    if sampling.top_p == 0:
        sampling = dataclasses.replace(sampling, temperature=0.0)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise HTTPError(400, "'stop' must be up to 4 strings of up to 64 characters")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise HTTPError(400, "'stream' must be a boolean and 'stream_options' an object")
    return clean, sampling, stop, stream, options


def parse_agent(body: dict, cfg: ServeConfig) -> dict:
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise HTTPError(400, "'question' must be a non-empty string")
    if len(question) > cfg.max_chars:
        raise HTTPError(400, f"the question holds more than {cfg.max_chars} characters", code="context_length_exceeded")
    sag = _bounded(body.get("sag"), "sag", int, 1, cfg.max_sag, 1)
    default = SAG_SAMPLING if sag > 1 else Sampling()
    return {"question": question, "max_steps": _bounded(body.get("max_steps"), "max_steps", int, 1,
                                                        cfg.max_agent_steps, 5),
            "sag": sag, "sampling": Sampling(
                temperature=float(_bounded(body.get("temperature"), "temperature", float, 0, 2, default.temperature)),
                top_p=float(_bounded(body.get("top_p"), "top_p", float, 0, 1, default.top_p)),
                seed=_bounded(body.get("seed"), "seed", int, -2**63, 2**63 - 1, None)),
            "stream": body.get("stream", True) is not False}


# -- the app ----------------------------------------------------------------------------------


_END = object()
DRAIN_BYTES = 16 << 20  # an oversized body up to this is read and dropped before the 413


@dataclass
class Done:
    value: Any


class Server:
    """The warm state every request shares: one backend (the engine), the index, the limits."""

    def __init__(self, backend: Backend, cfg: ServeConfig = ServeConfig(), index: Any = None,
                 index_path: str | None = None):
        self.backend, self.cfg, self.index, self.index_path = backend, cfg, index, index_path
        Sandbox.keep_warm(min(cfg.concurrency, 4))  # an agent request's sandbox is ready
        self.slots = threading.BoundedSemaphore(cfg.concurrency)
        self.waiting = 0  # requests admitted and not yet finished, running or not
        self.running = 0
        self.lock = threading.Lock()
        self.created = int(time.time())

    # Work runs in threads (the engine batches them); the event loop only moves bytes.
    async def run(self, request, work: Callable[[Callable[[], None]], Any]) -> Any:
        """`work(check)` in a thread once a slot is free; `check()` raises Cancelled when the
        client has gone or the request is out of time. 429 when too many wait already."""
        with self.lock:
            if self.waiting >= self.cfg.concurrency + self.cfg.queue:
                raise HTTPError(429, "the server is busy; retry shortly", kind="rate_limit_error")
            self.waiting += 1
        gone = threading.Event()
        deadline = time.monotonic() + self.cfg.timeout_s

        def check() -> None:
            if gone.is_set() or time.monotonic() > deadline:
                raise Cancelled("the client went away" if gone.is_set() else "the request ran out of time")

        def guarded():
            try:
                while not self.slots.acquire(timeout=0.5):
                    check()
                with self.lock:
                    self.running += 1
                try:
                    return work(check)
                finally:
                    with self.lock:
                        self.running -= 1
                    self.slots.release()
            finally:
                with self.lock:
                    self.waiting -= 1

        future = asyncio.get_running_loop().run_in_executor(None, guarded)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.5)
                if done:
                    return future.result()
                if request is not None and await request.is_disconnected():
                    gone.set()
        except BaseException:
            gone.set()  # cancelled (the client went away mid-stream): the thread stops at its next token
            raise

    async def stream(self, work: Callable[[Callable[[], None], Callable[[Any], None]], Any]):
        """`work(check, put)` as `run` runs it, yielding each item it puts as soon as it is put,
        then a `Done` with what it returned (its exception is raised here instead). Leaving the
        iteration early (the client went away) stops the work at its next `check()`."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        task = asyncio.ensure_future(self.run(None, lambda check: work(check, put)))
        task.add_done_callback(lambda _: put(_END))
        try:
            while (item := await queue.get()) is not _END:
                yield item
            yield Done(task.result())
        finally:
            task.cancel()

    def model_names(self) -> list[str]:
        return [self.backend.name, AGENT_MODEL]


def create_app(server: Server):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    cfg = server.cfg

    def error(exc: HTTPError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}},
                            status_code=exc.status)

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if cfg.api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise HTTPError(401, "a valid API key is required (Authorization: Bearer KEY)",
                            kind="authentication_error", code="invalid_api_key")

    async def drain(request: Request) -> None:
        """Read and drop what a client is still sending (up to DRAIN_BYTES), so it hears the
        refusal instead of a broken pipe mid-upload."""
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_BYTES:
                return

    async def read_json(request: Request) -> dict:
        check_key(request)
        length = request.headers.get("content-length")
        too_large = HTTPError(413, f"the body is larger than {cfg.max_body_bytes} bytes")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                await drain(request)
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                await drain(request)
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise HTTPError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return data

    def guarded(handler):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except HTTPError as exc:
                return error(exc)
            except Cancelled as exc:
                return error(HTTPError(504, str(exc), kind="timeout"))
            except PromptTooLong as exc:
                return error(HTTPError(400, str(exc), code="context_length_exceeded"))
            except Exception as exc:  # one bad request never takes the server down
                return error(HTTPError(500, f"{type(exc).__name__}: {str(exc)[:300]}", kind="server_error"))
        return endpoint

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "attar"}
            for name in server.model_names()]})

    async def info(request: Request):
        check_key(request)
        return JSONResponse({"model": server.backend.name, "index": server.index_path, "agent_model": AGENT_MODEL,
                             "running": server.running, "admitted": server.waiting})

    async def chat_completions(request: Request):
        body = await read_json(request)
        model = body.get("model")
        if model not in (*server.model_names(), "default", None):
            raise HTTPError(404, f"model {model!r} is not served here; /v1/models lists {server.model_names()}",
                            code="model_not_found")
        messages, sampling, stop, stream, options = parse_chat(body, cfg)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            row = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model or
                   server.backend.name, "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                row["usage"] = usage
            return f"data: {json.dumps(row)}\n\n"

        if model == AGENT_MODEL:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            # The agent's own settings, read from the body as /v1/agent reads them (an OpenAI client
            # sends them in `extra_body`); the question is the last user message.
            params = parse_agent({**body, "question": question}, cfg)
            done = await server.run(request, lambda check: _agent_run(server, params, check, lambda *_: None))
            text = _answer_text(done["answer"])
            usage = _usage(done["prompt_tokens"], done["completion_tokens"])
            if stream:
                parts = [chunk({"role": "assistant", "content": ""}), chunk({"content": text}), chunk({}, "stop")]
                if options.get("include_usage"):
                    parts.append(chunk({}, usage=usage))
                return StreamingResponse(iter([*parts, "data: [DONE]\n\n"]), media_type="text/event-stream")
            return JSONResponse(_completion(ident, created, AGENT_MODEL, text, "stop", usage,
                                            attar={"finished_by": done["finished_by"], "fallback": done["fallback"],
                                                   "steps": done["steps"]}))

        def generate(check, on_text=None):
            def text_hook(piece: str) -> None:
                check()
                if on_text:
                    on_text(piece)
            check()
            return server.backend.generate(messages, stop=stop, sampling=sampling, on_text=text_hook)

        def finish_reason(gen) -> str:
            return "length" if gen.stopped_by is None and gen.completion_tokens >= sampling.max_new_tokens else "stop"

        if not stream:
            gen = await server.run(request, generate)
            return JSONResponse(_completion(ident, created, model or server.backend.name, gen.text, finish_reason(gen),
                                            _usage(gen.prompt_tokens, gen.completion_tokens)))

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for item in server.stream(generate):
                    if isinstance(item, Done):
                        gen = item.value
                        yield chunk({}, finish_reason(gen))
                        if options.get("include_usage"):
                            yield chunk({}, usage=_usage(gen.prompt_tokens, gen.completion_tokens))
                    else:
                        yield chunk({"content": item})
            except (HTTPError, Cancelled) as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def agent(request: Request):
        body = await read_json(request)
        params = parse_agent(body, cfg)
        if not params["stream"]:
            return JSONResponse(await server.run(request, lambda check: _agent_run(server, params, check,
                                                                                  lambda *_: None)))

        async def events():
            run = lambda check, put: _agent_run(server, params, check, lambda kind, data: put((kind, data)))  # noqa: E731
            try:
                async for item in server.stream(run):
                    kind, data = ("done", item.value) if isinstance(item, Done) else item
                    yield f"event: {kind}\ndata: {json.dumps(data, default=repr)}\n\n"
            except (HTTPError, Cancelled) as exc:
                yield f"event: error\ndata: {json.dumps({'message': str(exc)})}\n\n"
            except Exception as exc:
                yield f"event: error\ndata: {json.dumps({'message': f'{type(exc).__name__}: {str(exc)[:300]}'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/attar/info", guarded(info), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/agent", guarded(agent), methods=["POST"]),
    ])


def _completion(ident: str, created: int, model: str, text: str, finish: str, usage: dict, **extra) -> dict:
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage, **extra}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _answer_text(answer: Any) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer, default=repr)


def _agent_run(server: Server, params: dict, check: Callable[[], None], emit: Callable[[str, dict], None]) -> dict:
    """One agent run in this thread, on the shared backend, with a sandbox of its own (closed
    however the run ends); each step is emitted as it finishes."""
    def on_text(piece: str) -> None:
        check()
        emit("text", {"text": piece})

    def on_step_start(number: int, fallback: bool) -> None:
        check()
        emit("step_start", {"number": number, "fallback": fallback})

    check()
    with Agent(server.backend, index=server.index, max_steps=params["max_steps"], sag=params["sag"],
               sampling=params["sampling"], on_text=on_text, on_step_start=on_step_start) as agent:
        for step in agent.stream(params["question"]):
            emit("step", step_dict(step))
            check()
        task = agent.memory.tasks[-1]
        steps = task.steps
    return {"answer": task.answer, "finished_by": task.finished_by, "fallback": task.finished_by.is_fallback,
            "steps": len(steps), "prompt_tokens": sum(s.prompt_tokens for s in steps),
            "completion_tokens": sum(s.completion_tokens for s in steps)}


def step_dict(step) -> dict:
    return dataclasses.asdict(step) | {"observation": step.observation if not step.is_final else None}


def serve(backend: Backend, cfg: ServeConfig, index: Any = None, index_path: str | None = None,
          log: Callable[[str], None] = print) -> None:
    """Run until SIGINT or SIGTERM (uvicorn stops taking requests and lets running ones end)."""
    import uvicorn

    if not is_loopback(cfg.host) and not cfg.api_key:
        raise ValueError(f"--host {cfg.host} is reachable from other machines: set an API key (--api-key or "
                         "ATTAR_API_KEY), or serve on 127.0.0.1")
    app = create_app(Server(backend, cfg, index, index_path))
    log(f"attar serve: {backend.name} and {AGENT_MODEL} on http://{cfg.host}:{cfg.port}/v1 "
        f"(OpenAI-compatible; Ctrl-C stops)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=10,
                limit_concurrency=cfg.concurrency + cfg.queue + 16)


def find_server(url: str, api_key: str | None = None, timeout: float = 0.5) -> dict | None:
    """The /attar/info of a server at `url`, or None when nothing answers there."""
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/attar/info",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            info = json.loads(response.read(65536))
    except Exception:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("model"), str) else None


def stream_agent(url: str, body: dict, api_key: str | None = None, timeout: float = 600.0):
    """Yield (event, data) from a server's /v1/agent stream."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/v1/agent", data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ConnectionError(f"{url} answered HTTP {exc.code}: {detail}") from None
    except OSError as exc:
        raise ConnectionError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        kind = None
        for raw in response:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind:
                yield kind, json.loads(line[len("data: "):])
                kind = None


def index_key(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None
