"""Token-level generation over an exported decoder, driven by onnxruntime directly.

onnxruntime-genai re-prefills the whole conversation at every agent step, prefills a SAG prompt
once per candidate and serves one caller at a time. The decoder graph itself is plain ONNX with
explicit KV inputs and outputs (GroupQueryAttention, which takes each row's own length), so this
engine keeps a pool of KV rows and schedules every caller's requests onto it:

- **Prefix cache.** A row keeps the KV of the ids it last held after its request ends. A new
  request takes the free row sharing the longest prefix with its ids, copies a longer prefix
  from any other row if one has it (the system prompt of a run, a SAG prompt), and prefills only
  the rest: an agent's next step prefills the observation and the next turn's header. A row
  that must be overwritten is, first, one the request's own thread used last: a thread runs one
  agent at a time, so that conversation has ended (a new question, a retry), while an agent of
  another thread may be in its sandbox and about to come back; then the least recently used.
- **Continuous batching.** Requests from any number of threads (agents in `distill eval` or
  `generate`, SAG candidates) decode together, one token per active row per step; a finished
  request leaves the batch at once and a waiting one takes its row. Rows may differ in length:
  the attention mask tells GroupQueryAttention each row's length.
- **Chunked prefill.** While requests decode, a new prompt is fed PREFILL_CHUNK tokens between
  two of their steps, in the row just after theirs, and joins the batch once fed: an agent's
  long prompt no longer stalls every other agent for the whole of its prefill. A chunk is never
  a single token, so the cache a prompt leaves does not depend on how it was cut (below).

- **Shared work.** Every cached position carries a stamp of the forward call that wrote it (a
  copy keeps it), so the engine knows which rows hold the same bits: on attar's attention, a
  prefix several rows hold copies of (a SAG prompt, agents' system prompt) is read once for all
  of them (`KVPool.shares`), and rows that hold the same cache and feed the same token (SAG's
  candidates while they agree) are computed once (`_twins`).

The KV cache is a `KVPool` (its buffers, what each row holds, and the rows' growth); the
`Engine` is the scheduler over it. The active requests always occupy rows 0..k-1 (a finished one
swaps with the last), so a step runs on one contiguous slice of the pool. Each layer's past and
present are one buffer that GroupQueryAttention writes into in place ("share-buffer"): no copy
per token.

Sampling is per request with its own seeded generator, so a request's tokens do not depend on
what else is in the batch.

- **Speculation.** A greedy request feeds its next token and up to LOOKAHEAD tokens guessed
  from its own context (prompt lookup: what followed the latest earlier occurrence of its last
  few tokens; agents copy names, numbers and code from what they read) and keeps the model's
  tokens while they agree with the guess, several tokens for one step. Up to 3 greedy requests
  do so together, the step's LOOKAHEAD + 1 positions shared out among them.
  onnxruntime computes a position the same, bit for bit, in every step of two or more tokens
  whatever its width; in a step of one, its attention runs other kernels, attar's does not
  (`tests/test_engine.py` checks both). On attar's kernels, then, a request's tokens do not depend
  on what was guessed, nor on whether it stepped alone or beside others: every engine speculates
  there (a shared one's requests in an eval's last questions, the teacher's slowest, `serve`'s few).
  On onnxruntime's attention only an engine that serves one stream does (`speculate=True`), and
  its request never takes a one-token step, so that its tokens depend neither on the guess nor
  on how its prompt was split between the cache and the prefill; they can differ from the tokens
  one-token steps beside others would give, at a near tie; its attention takes a single row past
  a token, so there only a lone request speculates. From 4 rows (or any sampled one) a batch steps
  one token a row: a guess would cost more than it keeps (README).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from attar.runtime import kernels
from attar.runtime.modeldir import ExportDir, keep_last_positions

GROW = 1024  # cache capacity grows in steps of this many tokens (doubling beyond)
# Prompt lookup: the context's last n tokens (n = LOOKAHEAD, then fewer) are looked up earlier in
# the context, and the n tokens that followed them are the guess: the longer the match, the more
# likely the model repeats it, and a 6-token step costs ~1.6x a 1-token one (on agent trajectories:
# 2.2 tokens a step, where a fixed guess of 4 tokens after a match of 3, 2 or 1 gives 2.0 for more cost).
LOOKAHEAD = 5
# A speculating step feeds at most LOOKAHEAD + 1 positions a row and this many in all: one request
# its next token and 5 guessed, 2 requests 3 each, 3 requests 2 each. From 4 rows a guess costs
# more than it keeps (Zen 4, the default at 600 cached, against a step of one token a row: 2 rows
# of 3 ×1.13 on the int8 graph and ×1.41 on the exact one; 4 rows of 2 ×1.14 and ×1.49, for the
# ~1.35 tokens a row a 2-token step keeps).
SPECULATE_POSITIONS = LOOKAHEAD + 1
# While requests decode, a new prompt is fed this many tokens between two of their steps, so a long
# prompt delays each of their tokens by one chunk's time, not by the whole prefill (a 1,500-token
# prompt with 4 rows decoding: their longest wait 0.82 s instead of 3.93 s on the 0.5B, and the
# newcomer's first token no later: `bench/engine.py --only mixed`).
PREFILL_CHUNK = 256
# Sampling reads each position's CANDIDATES largest logits, which the graph picks with a TopK node
# the engine adds in memory (on onnxruntime's threads, ~0.1 ms a row): numpy took ~0.35 ms a row to
# find them among the default's 151,936, a fifteenth of a SAG step of 8 rows. A request asking for
# more (top_k 0, or above CANDIDATES) is sampled from the whole vocabulary's logits.
CANDIDATES = 64
TOP_NAMES = ("attar/top_logits", "attar/top_ids")  # the graph outputs that TopK adds
# A row shares a prefix with another where at least one block of keys (attention.cc reads 16 at a
# time) of its cache holds the same bits: those blocks are read once for both.
SHARE_MIN = 16


def memory_budget() -> int:
    """The KV pool's default ceiling in bytes: half the machine's memory. The pool holds every row
    at the capacity of the longest, so one long conversation among the teacher's 16 rows would
    otherwise grow it to 16 × that length: the 1.5B's 32,768-token context is 15 GB in float16."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume a 16 GB laptop
        return 8 << 30


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head: int
    context: int
    names: dict  # genai_config's input/output names


class ContextFull(ValueError):
    """The prompt leaves no room in the model's context for even one new token."""


class EngineClosed(RuntimeError):
    """The engine was closed (its job was interrupted): it runs no request any more."""


@dataclass
class Timing:
    """Where the scheduler's time went (for benchmarks): seconds in prefills and in decode steps
    (speculating ones too), prompt tokens prefilled, and the rows computed, summed over decode
    steps (a row that takes a twin's step is not: `Engine._twins`); the rest of a run's wall
    time the engine sat idle, every request waiting on its caller."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefilled: int = 0
    decoded_rows: int = 0


class Scores:
    """A forward call's logits as sampling reads them, per row and kept position: the CANDIDATES
    largest, largest first (ties: the lower id first, as np.argmax), with their ids; and the whole
    vocabulary's, copied out of onnxruntime only when read (greedy and top-k sampling do not)."""

    def __init__(self, top: np.ndarray, ids: np.ndarray, read_logits: Callable[[], np.ndarray]):
        self.top, self.ids, self._read = top, ids, read_logits

    @functools.cached_property
    def logits(self) -> np.ndarray:  # rows × positions × vocabulary
        return self._read()

    def keep(self, row: int) -> Scores:
        """Row `row`'s scores at its last position, copied (a row keeps its prompt's: `KVPool.last`)."""
        pick = (slice(row, row + 1), slice(-1, None))
        logits = self.logits[pick].copy()
        return Scores(self.top[pick].copy(), self.ids[pick].copy(), lambda: logits)


@dataclass(eq=False)
class Request:
    """One generation: `ids` in, sampled tokens out (`out`), EOS and `accept` ending it early."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    accept: Callable[[int], bool] = lambda token: False  # sees each new token; True ends the request
    out: list[int] = field(default_factory=list)
    reused: int = 0  # prompt ids found already in the cache
    caller: int = field(default_factory=threading.get_ident)  # the thread that made it (rows are kept per thread)
    first_token_s: float | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.began = time.perf_counter()
        self.rng = np.random.default_rng(self.seed)
        self.done = threading.Event()
        self.next: int | None = None  # sampled, not yet fed to the model
        self.cancelled = False

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()


class Engine:
    """One onnxruntime session and its KV pool; thread-safe, batches whatever is submitted."""

    def __init__(self, model: ExportDir, threads: int | None = None,
                 extra_inputs: dict[str, np.ndarray] | None = None, max_rows: int = 8, int8: bool = True,
                 speculate: bool | None = None, prefill_chunk: int = PREFILL_CHUNK, kv_budget: int | None = None,
                 kernel: bool | None = None):
        """`int8`: run the folder's int8 graph where it has one (`attar pull --int8`): the same
        decoder with its projections on the CPU's integer matrix units. One graph for every step,
        so a request's tokens never depend on what else is in the batch. `speculate`: whether greedy
        requests check guessed tokens, up to 3 at a time (see the module doc). None: where that
        cannot change their tokens, i.e. where a one-token step computes what a wider one does
        (checked at load: `self.one_token_exact`; so on attar's kernels); True: there and on
        onnxruntime's ops too, for an engine that serves one stream (an agent's own); False: never.
        `prefill_chunk`: while others decode, the most prompt tokens fed between two of their steps.
        `kv_budget`: the most bytes the KV pool may take (default: half the machine's memory); with
        `max_rows` rows it bounds each row's context (`self.context`), below the model's where it
        must: a longer conversation is refused as ContextFull, which an agent meets by leaving out
        its oldest observations. `kernel`: run on attar's kernels (`kernels.py`: attention that reads
        each KV head once per step, not once per query head, and the int8 graph's row quantization
        and products in one node each); None: when they are built (`attar kernel build`), True:
        they must be."""
        if prefill_chunk < 4:
            raise ValueError("prefill_chunk must be at least 4 tokens")
        import onnxruntime as ort

        self.shape = Shape(model.layers, model.kv_heads, model.head, model.context, model.io_names)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.log_severity_level = 3
        # onnxruntime's threads spin while a step runs, waiting for its next op (a step is ~150 ops,
        # and waking a sleeping thread for each cost more than some of them: a step alone x0.8-0.9
        # on the Zen 4 VM), and stop the moment it returns: idle, spinning threads took a core from
        # the Python thread between steps, the sandboxes and any other session in the process (two
        # engines stepping in turn had cost each other up to 70% of a one-row step).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if int8 and model.int8_decoder is not None and not kernels.int8_sums_exact(kernel):
            int8 = False
            print(f"{model.name}: running the exact graph: on this CPU onnxruntime's int8 products saturate; "
                  "`attar kernel build` gives exact ones", file=sys.stderr)
        self.graph = model.graph(int8)
        # Speculating, the LM head of attar's graphs sees the last LOOKAHEAD + 1 positions (the file
        # keeps one, genai's contract); a graph whose logits still keep one cannot check a guess.
        def edit(graph) -> bool:
            if speculate is not False:
                keep_last_positions(graph, LOOKAHEAD + 1)
            write_directly(graph, self.shape.names["logits"])
            add_top(graph, self.shape.names["logits"])
            return True

        self.session, self.kernel = kernels.session(self.graph, options, kernel, edit)
        logits = next(o for o in self.session.get_outputs() if o.name == self.shape.names["logits"])
        self.guessed = self.agreed = 0  # guessed tokens checked, and those the model agreed with
        inputs = {i.name for i in self.session.get_inputs()}
        if "position_ids" in inputs:
            raise ValueError("this graph takes position_ids; the engine drives GroupQueryAttention graphs only")
        # LoRA inputs of an export (rank 0 unless an adapter is fed) and their values.
        self.extra = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (extra_inputs or {}).items()}
        self.max_rows = max_rows
        # The cache's type is the graph's: float16 on attar's attention, else float32 (onnxruntime's
        # float16 GroupQueryAttention is slower: README).
        dtype = kernels.cache_dtype(self.session, self.shape.names["past_key_names"] % 0)
        per_token = 2 * model.layers * model.kv_heads * model.head * np.dtype(dtype).itemsize  # K and V, every layer
        budget = kv_budget or memory_budget()
        self.context = min(model.context, budget // (max_rows * per_token))
        if self.context < 2 * LOOKAHEAD:
            raise ValueError(f"a KV budget of {budget} bytes leaves {self.context} tokens a row for {max_rows} rows")
        self.pool = KVPool(self.shape, max_rows, self.context, dtype)
        self.one_token_exact = speculate is not False and self._one_token_exact()
        self.speculate = (speculate or (speculate is None and self.one_token_exact)) and logits.shape[1] != 1
        self.active: list[Request] = []  # the request in row i
        self.filling: Request | None = None  # the prompt being fed, in row len(active)
        self.chunk = prefill_chunk
        self.queue: deque[Request] = deque()
        self.closed = False
        self.lock = threading.Lock()
        self.worker: threading.Thread | None = None
        self.steps = 0  # batched decode steps run (for benchmarks)
        self._shared: tuple = (None, None)  # (the pool's epoch and the rows, their shares): `_shares`
        self.time = Timing()

    # -- the public side ---------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; the scheduler thread runs while there is work and then exits."""
        if not request.ids:
            raise ValueError("a request needs at least one prompt id")
        if len(request.ids) >= self.context:
            whose = "the model's context" if self.context == self.shape.context else \
                f"the context that {self.max_rows} rows of KV cache leave in the engine's memory budget,"
            raise ContextFull(f"{len(request.ids)} prompt tokens fill {whose} {self.context}")
        with self.lock:
            if self.closed:
                raise EngineClosed("the engine is closed")
            self.queue.append(request)
            if self.worker is None:
                self.worker = threading.Thread(target=self._loop, daemon=True, name="attar-engine")
                self.worker.start()
        return request

    def wait(self, request: Request) -> Request:
        """Block until `request` ends; an error in the scheduler is raised here. Interrupted
        (Ctrl-C), the request is cancelled at its next token."""
        try:
            while not request.done.wait(0.5):
                with self.lock:
                    if self.worker is None and not request.done.is_set():  # only if the loop died
                        raise RuntimeError("the generation engine stopped without finishing a request")
        except BaseException:
            request.cancelled = True
            raise
        if request.error is not None:
            raise request.error
        if self.closed:  # cut short by close(): what it holds is not the model's answer
            raise EngineClosed("the engine was closed")
        return request

    def close(self) -> None:
        """End every request, queued or running, and refuse new ones. An interrupted job (Ctrl-C,
        SIGTERM) calls this so that its threads return at once instead of decoding, to the end of
        each question in flight, what no one will keep. Queued requests end here, the others at
        their next token (`_emit`)."""
        with self.lock:
            self.closed = True
            for request in self.queue:
                request.finish(EngineClosed("the engine was closed"))
            self.queue.clear()

    def run(self, request: Request) -> Request:
        return self.wait(self.submit(request))

    # -- the scheduler -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                self._admit(self.chunk if self.active else None)
                with self.lock:
                    if not self.active and self.filling is None and not self.queue:
                        self.worker = None
                        return
                if self._speculating():
                    self._speculate()
                elif self.active:
                    self._decode()
        except BaseException as exc:  # onnxruntime failed: every caller hears of it, no one waits
            with self.lock:
                for request in [*self.active, *self.queue, *([self.filling] if self.filling else [])]:
                    request.finish(exc)
                self.active.clear()
                self.queue.clear()
                self.filling = None
                self.pool.forget()  # a half-run step leaves no cache to trust
                self.worker = None

    def _admit(self, budget: int | None) -> None:
        """Feed waiting prompts, at most `budget` tokens (None: no limit, nothing is decoding),
        in queue order; each one fed to its end samples its first token and joins the batch."""
        while budget is None or budget > 0:
            if self.filling is None:
                with self.lock:
                    if not self.queue or len(self.active) >= self.max_rows:
                        return
                    request = self.queue.popleft()
                self._place(request)
                continue
            budget = self._fill(budget)
            if self.filling is not None:  # the budget ran out inside this prompt
                return

    def _place(self, request: Request) -> None:
        """Give `request` row k (k = active count), holding the longest prefix of its ids found in
        the cache; it is then fed from there (`_fill`)."""
        ids, k, pool = request.ids, len(self.active), self.pool
        try:
            pool.reserve(k + 1, min(self.context, len(ids) + request.max_new_tokens + LOOKAHEAD))
            common = [_common(held, ids) for held in pool.held]  # per row, once

            def rank(r: int) -> tuple:
                # Losing nothing (the row holds a prefix of ids, or nothing), else the caller's own
                # ended conversation, else the least recently used; the longest prefix first. An
                # agent of another thread whose row was taken while it ran its code would prefill its
                # conversation again, and its cache, prefilled rather than decoded, would differ in
                # the last bits: a near tie could then fall the other way, as timing had it.
                return common[r] == len(pool.held[r]), pool.callers[r] == request.caller, common[r], -pool.used[r]

            free = max(range(k, pool.rows), key=rank)
            pool.swap(free, k)
            common[free], common[k] = common[k], common[free]
            have = common[k]
            donor = max((r for r in range(pool.rows) if r != k), key=common.__getitem__, default=None)
            if donor is not None and common[donor] > have:
                have = common[donor]
                pool.copy_prefix(donor, k, have)
        except Exception as exc:
            pool.hold(k, [])
            request.finish(exc)
            return
        pool.touch(k, request.caller)
        if have == len(ids) and pool.last[k] is not None and pool.last[k][0] == len(ids):
            # The whole prompt and the logits after it are cached (N samples of one SAG prompt, a
            # prompt asked again): the first token is sampled at once, nothing is fed.
            request.reused = len(ids)
            pool.hold(k, ids)
            self.active.append(request)
            if self._emit(request, self._pick(request, pool.last[k][1], 0)):
                self._release(k)
            return
        # Else two ids are fed at least (the last one's logits are the first sample's), so that the
        # first token does not depend on how much was cached: one-token steps compute otherwise on
        # onnxruntime's attention, on the int8 graph enough to start an answer otherwise.
        request.reused = max(0, min(have, len(ids) - 2))
        pool.hold(k, ids[:request.reused])
        self.filling = request

    def _fill(self, budget: int | None) -> int | None:
        """Feed the placed prompt in row k, all of it or `budget` tokens of it, never leaving one
        token for a step of its own (such a step computes otherwise: a prompt's cache must not
        depend on how it was cut); what is left of the budget."""
        request, k = self.filling, len(self.active)
        ids, have = request.ids, len(self.pool.held[k])
        n = len(ids) - have
        if budget is not None and n > budget:
            n = budget - (n - budget == 1)
            if n < 2:
                return 0
        began = time.perf_counter()
        try:
            scores = self._forward(k, k + 1, np.array([ids[have:have + n]], dtype=np.int64), [have])
        except Exception as exc:
            self.pool.hold(k, [])
            self.filling = None
            request.finish(exc)
            return budget
        finally:
            self.time.prefill_s += time.perf_counter() - began
        self.time.prefilled += n
        self.pool.hold(k, ids[:have + n])
        budget = None if budget is None else budget - n
        if have + n == len(ids):
            self.pool.last[k] = (len(ids), scores.keep(0))
            self.filling = None
            self.active.append(request)
            if self._emit(request, self._pick(request, scores, 0)):
                self._release(k)
        return budget

    def _decode(self) -> None:
        """One token for every active row, in one batch. Rows that hold the same cache and feed
        the same token (SAG's candidates while they agree) are computed once (`_twins`)."""
        computed, twins = self._twins()
        tokens = np.array([[r.next] for r in self.active[:computed]], dtype=np.int64)
        began = time.perf_counter()
        scores = self._forward(0, computed, tokens, [len(self.pool.held[i]) for i in range(computed)],
                               self._shares(computed))
        self.time.decode_s += time.perf_counter() - began
        self.time.decoded_rows += computed
        self.steps += 1
        for i, request in enumerate(self.active[:computed]):
            self.pool.extend(i, [request.next])
        if twins:
            self.pool.follow(list(twins), list(twins.values()))
        finished = [i for i, request in enumerate(self.active)
                    if self._emit(request, self._pick(request, scores, twins.get(i, i)))]
        for i in reversed(finished):
            self._release(i)

    def _twins(self) -> tuple[int, dict[int, int]]:
        """Rows whose caches end in one stamp at one length hold the same bits (`KVPool.stamps`),
        so their requests may trade rows at no cost; two of them feeding the same token would
        compute the same step. The requests are put in order so that one row of each (cache, next
        token) comes first; returned: how many rows the step computes, and for each row after
        them the row whose step it takes (its logits, and the position that step writes). Each
        request still samples with its own generator: the tokens are what computing every row
        would give."""
        pool, active = self.pool, self.active
        holding: dict[tuple[int, int], list[int]] = {}
        for i in range(len(active)):
            holding.setdefault((len(pool.held[i]), pool.stamps[i][-1]), []).append(i)
        for rows in holding.values():
            if len(rows) > 1:  # among rows that hold one cache: one request of each next token first
                requests = [active[i] for i in rows]
                first: dict[int, Request] = {}
                for request in requests:
                    first.setdefault(request.next, request)
                order = [*first.values(), *(r for r in requests if r not in first.values())]
                for i, request in zip(rows, order):
                    active[i] = request
        computes: dict[tuple[int, int, int], int] = {}
        twins: dict[int, int] = {}
        for i, request in enumerate(active):
            key = (len(pool.held[i]), pool.stamps[i][-1], request.next)
            twins[i] = computes.setdefault(key, i)
        computed = max(computes.values()) + 1
        return computed, {i: j for i, j in twins.items() if i >= computed}

    def _speculating(self) -> bool:
        """Whether the next step checks guesses: every request in flight greedy, and one of them,
        or up to 3 on attar's attention (onnxruntime's takes a single row past a token)."""
        rows = len(self.active)
        return self.speculate and (rows == 1 or (self.kernel and 1 < rows <= SPECULATE_POSITIONS // 2)) and \
            all(request.temperature <= 0 for request in self.active)

    def _speculate(self) -> None:
        """One step of the greedy requests in rows 0..k-1 (k ≤ 3): each feeds its next token and a
        guess of the ones after it, SPECULATE_POSITIONS // k tokens at most, and keeps the model's
        tokens while they agree with its guess. A shorter row is padded to the widest: the padding
        is written to its cache past what it holds (as a wrong guess is) and its logits are unread."""
        active, held = self.active, self.pool.held
        k = len(active)
        past = [len(held[i]) for i in range(k)]
        room = min(self.pool.capacity, self.context) - max(past) - 1  # cache slots after the next tokens
        fed = []
        for i, request in enumerate(active):
            # Where a one-token step computes otherwise, one is never taken: with no guess, the next
            # token is fed twice (its second copy's logits are not used).
            guess = lookup(held[i] + [request.next], SPECULATE_POSITIONS // k - 1) or \
                ([] if self.one_token_exact else [request.next])
            fed.append([request.next, *guess[:max(room, 0)]])
        width = max(map(len, fed))
        ids = np.array([tokens + [tokens[-1]] * (width - len(tokens)) for tokens in fed], dtype=np.int64)
        began = time.perf_counter()
        best = self._forward(0, k, ids, past, self._shares(k)).ids[:, -width:, 0]  # argmax each
        self.time.decode_s += time.perf_counter() - began
        self.time.decoded_rows += k
        self.steps += 1
        finished = []
        for i, (request, tokens) in enumerate(zip(active, fed)):
            for j, token in enumerate(tokens):
                self.pool.extend(i, [token])
                chosen, guessed = int(best[i, j]), j + 1 < len(tokens)
                if guessed:
                    self.guessed += 1
                    self.agreed += chosen == tokens[j + 1]
                if self._emit(request, chosen):
                    finished.append(i)
                    break
                if not guessed or chosen != tokens[j + 1]:  # the rest of the guess was fed after a wrong token
                    break
        for i in reversed(finished):
            self._release(i)

    @staticmethod
    def _pick(request: Request, scores: Scores, row: int) -> int:
        """The request's next token from row `row` of a step's scores, at its last position."""
        return sample(scores.top[row, -1], scores.ids[row, -1], lambda: scores.logits[row, -1], request.temperature,
                      request.top_p, request.top_k, request.rng)

    def _emit(self, request: Request, token: int) -> bool:
        """Give the request its next token; True when the request has ended."""
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.began
        if token in request.eos:
            request.finish()
            return True
        request.out.append(token)
        request.next = token
        try:
            ended = request.cancelled or self.closed or request.accept(token)
        except Exception as exc:  # the caller's callback failed: that request ends, the batch goes on
            request.finish(exc)
            return True
        if ended or len(request.out) >= request.max_new_tokens or len(request.ids) + len(request.out) >= self.context:
            request.finish()
            return True
        return False

    def _release(self, i: int) -> None:
        """Row i's request has ended: the last active row takes its place."""
        last = len(self.active) - 1
        self.pool.touch(i)  # a row's age counts from its last use: the oldest is evicted first
        self.pool.swap(i, last)
        self.active[i], self.active[last] = self.active[last], self.active[i]
        self.active.pop()
        if self.filling is not None:  # the prompt being fed keeps the row just after the batch
            self.pool.swap(last + 1, last)

    def _one_token_exact(self) -> bool:
        """Whether a one-token step gives a position the logits, bit for bit, that a wider step
        gives it. onnxruntime's GroupQueryAttention runs other kernels for one new token (max
        |Δlogit| 0.26-0.92 on the default); attar's attention does not, nor do the projections
        on the CPUs measured, but a projection's one-row kernel is the CPU library's choice: so
        this is checked on the loaded model (three steps on an 8-token prompt) rather than assumed."""
        ids = np.arange(1, 9, dtype=np.int64)[None]
        wide = self._forward(0, 1, ids, [0]).logits[0, -1]
        self._forward(0, 1, ids[:, :-1], [0])
        one = self._forward(0, 1, ids[:, -1:], [7]).logits[0, -1]
        return bool(np.array_equal(wide, one))

    def _shares(self, k: int) -> np.ndarray | None:
        """For a step of rows 0..k-1 on attar's attention: which rows hold another's prefix
        (`KVPool.shares`), worked out again only when the rows' caches changed otherwise than by
        a step's new tokens (those never lengthen a shared prefix)."""
        if not self.kernel:
            return None
        if self._shared[0] != (self.pool.epoch, k):
            self._shared = ((self.pool.epoch, k), self.pool.shares(k))
        return self._shared[1]

    def _forward(self, start: int, stop: int, ids: np.ndarray, past: list[int], shared: np.ndarray | None = None) -> Scores:
        """Feed `ids` (rows × S) to rows start..stop-1, whose caches hold `past` tokens each, and
        whose first positions hold a leader's bits as `shared` says (attar's attention only);
        the scores (rows × positions × ...) after the last min(S, LOOKAHEAD + 1) ids of each row
        (after the last only, or after all S, as the graph gives them)."""
        names = self.shape.names
        rows, new = ids.shape
        total = max(past) + new
        mask = np.zeros((rows, total), dtype=np.int64)
        for r, p in enumerate(past):
            mask[r, :p + new] = 1
        io = self.pool.binding(self.session, self.extra, start, stop)
        io.bind_cpu_input(names["input_ids"], ids)
        io.bind_cpu_input(names["attention_mask"], mask)
        if self.kernel:
            io.bind_cpu_input(kernels.SHARED, kernels.NO_SHARES if shared is None else shared)
        for name in (names["logits"], *TOP_NAMES):
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        logits, top, top_ids = io.get_outputs()[-3:]
        return Scores(top.numpy(), top_ids.numpy(), logits.numpy)


class KVPool:
    """The KV cache: per layer one key and one value buffer (rows × KV heads × capacity × head),
    and per row the ids whose KV it holds, when it last served a request and the thread whose
    request that was (what the scheduler evicts by). It grows in rows and in capacity as requests
    need, up to `max_rows` and `context`."""

    def __init__(self, shape: Shape, max_rows: int, context: int, dtype: type = np.float32):
        self.shape, self.max_rows, self.context, self.dtype = shape, max_rows, context, dtype
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.rows = self.capacity = 0
        self.held: list[list[int]] = []  # per row: the ids whose KV it holds
        # Per row and held position: which forward call wrote its KV (a copy keeps the stamp). Two
        # rows' positions with one stamp hold the same bits; the same ids would not say so, since
        # a projection's CPU kernel may sum otherwise for another number of rows (`one_token_exact`).
        self.stamps: list[list[int]] = []
        self.writes = itertools.count(1)
        self.epoch = 0  # counts the changes to what rows hold other than new tokens (`extend`)
        self.used: list[int] = []  # per row: when it last served a request (least recent is evicted)
        self.callers: list[int | None] = []  # per row: the thread whose request it last served
        # Per row, where a prompt's prefill left them: (n, the logits after its first n held ids).
        # Every step of two or more tokens computes a position the same, so they are what feeding
        # those ids again would give.
        self.last: list[tuple[int, np.ndarray] | None] = []
        self.clock = itertools.count()
        self.bindings: dict = {}
        self._allocate(1, min(GROW, context))

    def touch(self, row: int, caller: int | None = None) -> None:
        """Row `row` serves a request now (one of thread `caller`, when given)."""
        self.used[row] = next(self.clock)
        if caller is not None:
            self.callers[row] = caller

    def forget(self) -> None:
        self.held = [[] for _ in self.held]
        self.stamps = [[] for _ in self.stamps]
        self.last = [None for _ in self.last]
        self.epoch += 1

    def hold(self, row: int, ids: list[int]) -> None:
        """Row `row` now holds the KV of `ids`, which keep the prefix it held (a prompt cut back to
        what it shares, or fed further: those positions were just written); its prompt logits go
        with ids it no longer holds."""
        self.held[row] = list(ids)
        kept = self.stamps[row][:len(ids)]
        self.stamps[row] = kept + [next(self.writes)] * (len(ids) - len(kept))
        if self.last[row] is not None and self.last[row][0] > len(ids):
            self.last[row] = None
        self.epoch += 1

    def extend(self, row: int, ids: list[int]) -> None:
        """Row `row`'s cache now holds `ids` more, just written (a decode step's)."""
        self.held[row] += ids
        self.stamps[row] += [next(self.writes)] * len(ids)

    def follow(self, rows: list[int], sources: list[int]) -> None:
        """Each of `rows` held what its source held and was fed the same token: it takes the
        position its source's step just wrote (and its stamp) instead of computing it."""
        at = [len(self.held[s]) - 1 for s in sources]
        for buf in self.keys + self.values:
            buf[rows, :, at] = buf[sources, :, at]
        for row, source in zip(rows, sources):
            self.held[row].append(self.held[source][-1])
            self.stamps[row].append(self.stamps[source][-1])
        self.epoch += 1  # rows that share a prefix now share it further (`shares`)

    def shares(self, rows: int) -> np.ndarray:
        """Per row of 0..rows-1, (leader, n): its first n positions hold the bits of the leader's,
        n ≥ SHARE_MIN, the leader an earlier row that shares with none; else (row, 0). The
        attention kernel then reads those positions once for the leader and its followers."""
        out = np.zeros((rows, 2), np.int32)
        out[:, 0] = np.arange(rows)
        leaders: list[int] = []
        for row in range(rows):
            length, leader = max(((_common(self.stamps[a], self.stamps[row]), a) for a in leaders), default=(0, row))
            if length >= SHARE_MIN:
                out[row] = leader, length
            else:
                leaders.append(row)
        return out

    def copy_prefix(self, source: int, row: int, n: int) -> None:
        """Row `row` gets the KV of the first n ids of row `source` (and its logits after them)."""
        for buf in self.keys + self.values:
            buf[row, :, :n] = buf[source, :, :n]
        self.stamps[row] = self.stamps[source][:n]
        self.epoch += 1
        last = self.last[source]
        self.last[row] = last if last is not None and last[0] <= n else None

    def binding(self, session, extra: dict, start: int, stop: int):
        """An IO binding of `session` with rows start..stop-1 of each buffer as both past and
        present (GroupQueryAttention writes into the pool in place), and the `extra` inputs."""
        import onnxruntime as ort

        key = (start, stop)
        if key not in self.bindings:
            names, ortvalue = self.shape.names, ort.OrtValue.ortvalue_from_numpy
            io = session.io_binding()
            for i in range(self.shape.layers):
                for kind, bufs in (("key", self.keys), ("value", self.values)):
                    value = ortvalue(bufs[i][start:stop])  # a view: onnxruntime writes into the pool
                    io.bind_ortvalue_input(names[f"past_{kind}_names"] % i, value)
                    io.bind_ortvalue_output(names[f"present_{kind}_names"] % i, value)
            for name, value in extra.items():
                io.bind_ortvalue_input(name, value)
            self.bindings[key] = io
        return self.bindings[key]

    def reserve(self, rows: int, tokens: int) -> None:
        """Room for `rows` rows of `tokens` tokens (rows double; capacity grows by GROW, or doubles)."""
        if rows > self.rows or tokens > self.capacity:
            capacity = self.capacity if tokens <= self.capacity else \
                min(self.context, max(tokens + GROW, 2 * self.capacity))
            self._allocate(max(rows, min(self.max_rows, 2 * self.rows)) if rows > self.rows else self.rows, capacity)

    def _allocate(self, rows: int, capacity: int) -> None:
        s = self.shape
        shape = (rows, s.kv_heads, capacity, s.head)
        self.bindings = {}  # they hold the old buffers
        # One buffer at a time, each old one let go once copied, and of each row only what it
        # holds: fresh pages are not memory until written, so the pool takes what the rows hold,
        # not rows × the longest (the teacher's 16 rows at 9,000 tokens are 8 GB).
        for pool in (self.keys, self.values):
            for i in range(s.layers):
                buf = np.zeros(shape, self.dtype)
                if i < len(pool):
                    for r, held in enumerate(self.held):
                        buf[r, :, :len(held)] = pool[i][r, :, :len(held)]
                    pool[i] = buf
                else:
                    pool.append(buf)
        self.held += [[] for _ in range(rows - self.rows)]
        self.stamps += [[] for _ in range(rows - self.rows)]
        self.epoch += 1
        self.used += [-1] * (rows - self.rows)
        self.callers += [None] * (rows - self.rows)
        self.last += [None] * (rows - self.rows)
        self.rows, self.capacity = rows, capacity

    def swap(self, a: int, b: int) -> None:
        """Rows a and b trade places, copying only what each holds."""
        if a == b:
            return
        na, nb = len(self.held[a]), len(self.held[b])
        for buf in self.keys + self.values:
            if na and nb:
                kept = buf[a, :, :na].copy()
                buf[a, :, :nb] = buf[b, :, :nb]
                buf[b, :, :na] = kept
            elif na:
                buf[b, :, :na] = buf[a, :, :na]
            elif nb:
                buf[a, :, :nb] = buf[b, :, :nb]
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.stamps[a], self.stamps[b] = self.stamps[b], self.stamps[a]
        self.epoch += 1
        self.used[a], self.used[b] = self.used[b], self.used[a]
        self.callers[a], self.callers[b] = self.callers[b], self.callers[a]
        self.last[a], self.last[b] = self.last[b], self.last[a]


def add_top(model, logits: str) -> None:
    """Give an onnx.ModelProto two more outputs (TOP_NAMES): each position's CANDIDATES largest
    `logits` (all of them in a smaller vocabulary), largest first, and their ids. onnx's TopK
    puts equal values in the order of their ids, as np.argmax picks the first."""
    from onnx import TensorProto, helper, numpy_helper

    out = next(o for o in model.graph.output if o.name == logits)
    vocabulary = out.type.tensor_type.shape.dim[-1].dim_value  # 0 where the file does not say
    k = min(CANDIDATES, vocabulary or CANDIDATES)
    model.graph.initializer.append(numpy_helper.from_array(np.array([k], np.int64), "attar/top_k"))
    model.graph.node.append(helper.make_node("TopK", [logits, "attar/top_k"], list(TOP_NAMES), "attar/top", axis=-1))
    model.graph.output.extend([helper.make_tensor_value_info(TOP_NAMES[0], TensorProto.FLOAT, None),
                               helper.make_tensor_value_info(TOP_NAMES[1], TensorProto.INT64, None)])


def write_directly(model, name: str) -> None:
    """Where graph output `name` is an Identity's copy of what one node computes (attar's exports
    name their logits so), have that node write it: the copy took 1% of a decode step."""
    nodes = model.graph.node
    copy = next((n for n in nodes if n.op_type == "Identity" and n.output[0] == name), None)
    source = copy.input[0] if copy is not None else None
    producer = next((n for n in nodes if source in n.output), None)
    read_elsewhere = sum(list(n.input).count(source) for n in nodes) > 1 or any(o.name == source for o in model.graph.output)
    if producer is None or read_elsewhere:
        return
    producer.output[list(producer.output).index(source)] = name
    nodes.remove(copy)


def lookup(context: list[int], most: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
    n tokens, as many as n (at most `most`), for the longest n ≤ `most` that occurred before."""
    ids = np.asarray(context)
    for n in range(min(most, len(ids) - 1), 0, -1):
        hit = ids[:len(ids) - n] == ids[len(ids) - n]  # windows starting before the tail's own
        for i in range(1, n):
            hit &= ids[i:len(ids) - n + i] == ids[len(ids) - n + i]
        starts = np.flatnonzero(hit)
        if len(starts):
            after = starts[-1] + n
            return ids[after:after + n].tolist()
    return []


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def largest(logits: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest logits, in no order (sampling's way for a top-k above
    CANDIDATES). Partitioning a 150,000-token vocabulary costs 1.3 ms a row here; the top k lie
    near the maximum, so the logits within a margin of it (widened until at least k pass) are
    partitioned instead, a few hundred in a pass over memory."""
    if k >= logits.size:
        return np.arange(logits.size)
    peak = logits.max()

    def enough(margin: float) -> bool:
        return np.count_nonzero(logits >= peak - margin) >= k

    margin = 0.5
    while not enough(margin):
        margin *= 2
        if margin > 256:  # flat logits (or NaN): the whole vocabulary
            return np.argpartition(-logits, k - 1)[:k]
    low = margin / 2  # too few pass it (or it is the first tried): narrow the margin down to k's
    for _ in range(4):
        low, margin = (low, (low + margin) / 2) if enough((low + margin) / 2) else ((low + margin) / 2, margin)
    near = np.flatnonzero(logits >= peak - margin)
    return near[np.argpartition(-logits[near], k - 1)[:k]]


def sample(top: np.ndarray, ids: np.ndarray, logits: Callable[[], np.ndarray], temperature: float, top_p: float,
           top_k: int, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else softmax(logits / T) restricted to the top-k, then to the
    smallest set whose probability reaches top-p. `top` and `ids`: the largest logits, largest
    first (ties: the lower id first) and their ids; `logits()`: all of them, read only for a
    top-k larger than that (or 0: the whole vocabulary)."""
    if temperature <= 0:
        return int(ids[0])
    k = top_k if top_k > 0 else 1 << 62
    if k > top.size:
        everything = logits()
        ids = np.sort(largest(everything, min(k, everything.size)))  # dividing by T > 0 keeps the order: select first
        ids = ids[np.argsort(-everything[ids], kind="stable")]
        top = everything[ids]
    x = top[:k].astype(np.float64) / temperature
    p = np.exp(x - x[0])
    p /= p.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        p = p[:cut] / p[:cut].sum()
    return int(ids[rng.choice(len(p), p=p)])
