"""attar's generation engine against onnxruntime-genai on the same export, token for token, and
each optimisation (KV reuse across calls, rewind, shared prefill of a batch, batching across
callers, cache growth, speculation) against the same engine without it.

With speculation a lone greedy request steps several tokens at a time. On onnxruntime's
attention a one-token step runs other kernels than a wider one, so that path is checked against
one forward pass over the whole text, not against genai; on attar's kernels a position computes
the same in a step of any width, so there it is also checked against one-token steps. Batch rows
are compared with one-at-a-time decoding on the int8 graph, whose integer projections make a
row's numbers independent of its batch on any CPU."""

import threading

from dataclasses import replace

import numpy as np
import pytest

from attar.runtime.llm import EngineBackend, OnnxBackend, Sampling
from attar.runtime.modeldir import ExportDir

SYSTEM = {"role": "system", "content": "You are an expert assistant who solves tasks with Python code."}
GREEDY = Sampling(max_new_tokens=40)


@pytest.fixture(scope="module")
def model_dir():
    from attar.runtime.models import pull

    return pull("smollm2-135m", log=lambda m: None, check=False)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    from attar.runtime.gguf_import import import_gguf
    from attar.runtime.models import gguf_path

    out = tmp_path_factory.mktemp("smol-int8") / "model"
    out.mkdir()
    import_gguf(gguf_path("smollm2-135m", log=lambda m: None), out, log=lambda m: None, int8=True)
    return out


def conversation(*turns):
    roles = ["user", "assistant"]
    return [SYSTEM] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_greedy_matches_onnxruntime_genai(model_dir):
    # genai runs the folder's exact graph with onnxruntime's attention; a folder pulled with
    # --int8-graph, or attar's attention kernel built, must not change what is compared.
    engine, genai = EngineBackend(model_dir, int8=False, kernel=False), OnnxBackend(model_dir)
    for question in ("What is 17 * 23? Answer with code.", "Name three rivers in Europe."):
        messages = conversation(question)
        stop = ["<end_code>", "Observation:"]
        assert engine.generate(messages, stop, GREEDY).text == genai.generate(messages, stop, GREEDY).text


def test_the_next_step_reuses_the_cache_and_answers_the_same(model_dir):
    agent = EngineBackend(model_dir)
    first = conversation("What is 17 * 23? Answer with code.")
    reply = agent.generate(first, sampling=GREEDY).text
    second = conversation("What is 17 * 23? Answer with code.", reply, "Observation: 391. Now give the answer.")
    continued = agent.generate(second, sampling=GREEDY)
    assert continued.cached_tokens > 0.8 * len(agent.encode(first, ""))  # only the appended turns were prefilled
    assert continued.text == EngineBackend(model_dir).generate(second, sampling=GREEDY).text


def test_a_prompt_that_diverges_rewinds_the_cache(model_dir):
    agent = EngineBackend(model_dir)
    agent.generate(conversation("Tell me about the river Danube."), sampling=GREEDY)
    other = conversation("Tell me about the river Rhine.")
    again = agent.generate(other, sampling=GREEDY)
    assert again.text == EngineBackend(model_dir).generate(other, sampling=GREEDY).text
    assert 0 < again.cached_tokens < len(agent.encode(other, ""))


def test_batch_rows_share_one_prefill_and_match_single_generation(int8_dir):
    from dataclasses import replace

    agent = EngineBackend(int8_dir)
    messages = conversation("Write one line of Python that prints 5.")
    single = agent.generate(messages, sampling=GREEDY).text
    rows = agent.generate_batch(messages, [GREEDY] * 3)
    assert [g.text for g in rows] == [single] * 3
    fresh = EngineBackend(int8_dir)
    rows = fresh.generate_batch(messages, [GREEDY] * 3)
    assert [g.text for g in rows] == [single] * 3
    # The prompt was prefilled once: the other rows copied its cache and sampled from its logits.
    assert fresh.engine.time.prefilled == rows[0].prompt_tokens
    assert [g.cached_tokens for g in rows[1:]] == [g.prompt_tokens for g in rows[1:]]
    sampled = [replace(GREEDY, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=s) for s in range(4)]
    again = EngineBackend(int8_dir)
    assert [g.text for g in agent.generate_batch(messages, sampled)] == \
           [g.text for g in again.generate_batch(messages, sampled)]  # seeded: deterministic
    alone = []
    for s in sampled:  # alone, from the same cache state
        backend = EngineBackend(int8_dir)
        backend.generate(messages, sampling=GREEDY)
        alone.append(backend.generate(messages, sampling=s).text)
    assert [g.text for g in agent.generate_batch(messages, sampled)] == alone  # a row samples as it would alone


def test_rows_share_a_prefix_only_where_one_write_left_the_same_bits():
    """A row shares its first positions with another (and attention reads them once for both)
    where they were copied from it, not where the same ids were fed again: a prompt's cache can
    differ in the last bits with how it was batched. A row cut back and fed again shares only up
    to the cut."""
    from attar.runtime.engine import KVPool, Shape

    pool = KVPool(Shape(layers=1, kv_heads=1, head=16, context=256, names={}), max_rows=5, context=256)
    pool.reserve(5, 100)
    prompt = list(range(100, 140))
    pool.hold(0, prompt)  # fed
    for row, n in ((1, 40), (2, 30), (3, 10)):  # SAG's candidates, another prompt's system prefix, too short
        pool.copy_prefix(0, row, n)
        pool.hold(row, prompt[:n])
    pool.hold(4, prompt)  # the same ids, fed on their own
    for row in range(5):
        pool.extend(row, [7])  # a decode step: new positions, written apart
    assert pool.shares(5).tolist() == [[0, 0], [0, 40], [0, 30], [3, 0], [4, 0]]
    assert pool.shares(2).tolist() == [[0, 0], [0, 40]]
    pool.hold(0, prompt[:20])  # the leader rewound and fed again
    pool.hold(0, prompt)
    assert pool.shares(5).tolist() == [[0, 0], [0, 20], [0, 20], [3, 0], [4, 0]]
    pool.swap(0, 4)
    assert pool.shares(5).tolist() == [[0, 0], [1, 0], [1, 30], [3, 0], [1, 20]]


def test_sampled_candidates_read_their_shared_prompt_once_and_sample_the_same(int8_dir, library, monkeypatch):
    from attar.runtime.engine import Engine

    messages = conversation("Write a function that returns the squares of a list, and test it.")
    sampled = [replace(GREEDY, max_new_tokens=24, temperature=0.8, seed=s) for s in range(6)]
    backend = EngineBackend(int8_dir, kernel=True)
    steps = []  # what each decode step told the kernel
    shares_of = Engine._shares
    monkeypatch.setattr(Engine, "_shares", lambda self, k: steps.append(shares_of(self, k)) or steps[-1])
    told = backend.generate_batch(messages, sampled)
    # The widest step (candidates that wrote the same tokens are one row of it: `Engine._twins`).
    shares = max((s for s in steps if s is not None), key=len)
    assert len(shares) > 2 and (shares[1:, 0] == 0).all() and (shares[1:, 1] >= told[0].prompt_tokens - 1).all()
    monkeypatch.setattr(Engine, "_shares", lambda self, k: None)
    untold = EngineBackend(int8_dir, kernel=True).generate_batch(messages, sampled)
    assert [g.text for g in told] == [g.text for g in untold] and len({g.text for g in told}) > 1


@pytest.mark.parametrize("temperature", [0.4, 1.0])
def test_candidates_that_agree_are_computed_once_and_sample_what_each_row_would(int8_dir, monkeypatch, temperature):
    """SAG's candidates at the paper's temperature often write the same tokens for a while: rows
    that hold the same cache and feed the same token are one row of the step, the others take its
    logits and the position it wrote. Each still samples with its own generator: the texts are
    those of computing every row."""
    from attar.runtime.engine import Engine

    messages = conversation("Write a function that returns the squares of a list, and test it.")
    sampled = [replace(GREEDY, max_new_tokens=32, temperature=temperature, top_p=0.8, seed=s) for s in range(6)]
    backend = EngineBackend(int8_dir)
    twinned = backend.generate_batch(messages, sampled)
    engine = backend.engine
    assert engine.time.decoded_rows < sum(g.completion_tokens for g in twinned) - 6  # fewer rows than tokens
    monkeypatch.setattr(Engine, "_twins", lambda self: (len(self.active), {}))
    apart = EngineBackend(int8_dir).generate_batch(messages, sampled)
    assert [g.text for g in twinned] == [g.text for g in apart]
    if temperature == 1.0:
        assert len({g.text for g in twinned}) > 1  # they parted: twins went their own ways


def test_a_prompt_asked_again_starts_its_answer_the_same_on_the_int8_graph(int8_dir):
    """The second time, the whole prompt and the logits after it are cached: nothing is fed. A
    prompt whose logits are gone (its row decoded past it and was rewound) feeds its last ids again
    in a step of two, because on onnxruntime's attention a one-token step computes otherwise (on
    the int8 graph, enough to change this answer)."""
    for kernel in (False, None):
        backend = EngineBackend(int8_dir, kernel=kernel)
        story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
        first, again = (backend.generate(story, sampling=replace(GREEDY, max_new_tokens=12)) for _ in range(2))
        assert again.text == first.text and again.cached_tokens == again.prompt_tokens
        backend.engine.pool.last[0] = None
        third = backend.generate(story, sampling=replace(GREEDY, max_new_tokens=12))
        assert third.text == first.text and third.cached_tokens == third.prompt_tokens - 2


def test_the_int8_graph_on_attars_ops_gives_the_bits_of_onnxruntimes_ops(int8_dir, monkeypatch):
    """The int8 graph's projections run as attar's Int8MatMul where the kernels are built (each
    with its row quantization, dequantization and bias inside; RowQuantize and RowDequantize where
    they do not pack): every logit the same as on onnxruntime's nodes around each product, with the
    product's exact integer sums, prefill and step. With the MLP's SwiGLU inside too (attar's own
    exp), each product's outputs are onnxruntime's to float rounding (tests/test_int8_rows.py)."""
    from test_int8_rows import exact_sums

    from attar.runtime import kernels
    from attar.runtime.engine import Engine

    if kernels.library() is None:
        pytest.skip("attar's kernels are not built")
    engines = [Engine(ExportDir.open(int8_dir), max_rows=3)]
    monkeypatch.setattr(kernels, "_gate", lambda *a: None)
    engines.append(Engine(ExportDir.open(int8_dir), max_rows=3))
    monkeypatch.setattr(kernels, "use_int8_rows", lambda model: exact_sums(model) and 0)
    engines.append(Engine(ExportDir.open(int8_dir), max_rows=3))
    ids = np.random.default_rng(0).integers(300, 40000, (3, 30))
    logits = []
    for engine in engines:
        engine.pool.reserve(3, 64)
        logits.append([engine._forward(0, 3, ids, [0, 0, 0]).logits, engine._forward(0, 3, ids[:, :1], [30, 30, 30]).logits,
                       engine._forward(0, 1, ids[:1, :2], [31]).logits])
    for gated, fused, plain in zip(*logits):
        assert np.array_equal(fused, plain)
        # The int8 graph rounds every projection's input to 255 levels: a last-bit difference moves
        # a code now and then, and random tokens through SmolLM2 carry that far (measured: mean
        # |Δ| 0.35 on logits of mean size 14.6). A wrong gate would be far off.
        assert np.abs(gated - plain).mean() <= 0.05 * np.abs(plain).mean()


@pytest.mark.parametrize("flags, int8", [({"avx2"}, False), ({"avx2", "avx512_vnni"}, True), ({"avx2", "avx_vnni"}, True),
                                          ({"sse4_1"}, True)])
def test_where_onnxruntimes_int8_sums_saturate_and_attars_are_off_the_exact_graph_runs(int8_dir, monkeypatch, capsys,
                                                                                   flags, int8):
    """On AVX2 without VNNI, onnxruntime's MatMulInteger saturates 16-bit pair sums: without
    attar's products (here turned off) the engine runs the folder's exact graph, and says so."""
    from attar.runtime import kernels
    from attar.runtime.engine import Engine

    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    folder = ExportDir.open(int8_dir)
    engine = Engine(folder, max_rows=1, kernel=False)
    assert engine.graph == (folder.int8_decoder if int8 else folder.decoder)
    said = capsys.readouterr().err
    assert ("onnxruntime's int8 products saturate" in said) is not int8


def test_a_cache_that_grows_past_its_capacity_stays_exact(model_dir):
    from attar.runtime.engine import Engine, Request

    ids = [int(i) for i in np.random.default_rng(0).integers(300, 40000, 1500)]
    whole = Engine(ExportDir.open(model_dir))
    first = whole.run(Request(ids, max_new_tokens=4)).out
    pieces = Engine(ExportDir.open(model_dir))
    for end in (400, 1000, 1300):  # crosses the 1024-token initial capacity
        pieces.run(Request(ids[:end], max_new_tokens=1))
    again = pieces.run(Request(ids, max_new_tokens=4))
    assert pieces.pool.capacity >= 1500 and again.reused == 1300
    assert again.out == first


def test_the_kv_budget_bounds_every_rows_context_and_what_was_cached_survives_growth(model_dir):
    from attar.runtime.engine import ContextFull, Engine, Request

    folder = ExportDir.open(model_dir)
    whole = Engine(folder, max_rows=2)
    per_token = 2 * folder.layers * folder.kv_heads * folder.head * np.dtype(whole.pool.dtype).itemsize  # K and V
    engine = Engine(folder, max_rows=2, kv_budget=2 * 300 * per_token)  # two rows of 300 tokens
    assert engine.context == 300 and whole.context == folder.context
    ids = [int(i) for i in np.random.default_rng(2).integers(300, 40000, 320)]
    with pytest.raises(ContextFull, match="memory budget"):
        engine.submit(Request(ids, max_new_tokens=4))
    alone = whole.run(Request(ids[:250], max_new_tokens=80))
    capped = engine.run(Request(ids[:250], max_new_tokens=80))
    assert len(capped.out) == 50 and capped.out == alone.out[:50]  # ended at the budget's context, not beyond
    assert engine.pool.capacity <= 300
    # Growing the pool (a second row, then more capacity) keeps every row's cache.
    grown = Engine(folder, max_rows=2, kv_budget=2 * 2048 * per_token)
    first, other = grown.submit(Request(ids[:200], max_new_tokens=6)), grown.submit(Request(ids[100:150], max_new_tokens=6))
    first, _ = grown.wait(first).out, grown.wait(other)  # two at once: the pool grows to two rows
    more = [int(i) for i in np.random.default_rng(3).integers(300, 40000, 1000)]
    again = grown.run(Request(ids[:200] + first + more, max_new_tokens=1))  # past the first capacity
    assert grown.pool.rows == 2 and grown.pool.capacity > 1024 and again.reused >= 200


def test_a_long_prompt_is_fed_between_the_steps_of_others_and_answers_as_if_fed_whole(int8_dir):
    from attar.runtime.engine import Engine, Request

    ids = [int(i) for i in np.random.default_rng(1).integers(300, 40000, 50 + 16 * 40 + 1)]
    whole = Engine(ExportDir.open(int8_dir)).run(Request(ids, max_new_tokens=12)).out
    engine = Engine(ExportDir.open(int8_dir), prefill_chunk=16)
    other = engine.submit(Request(ids[:50], max_new_tokens=400))
    while not other.out and not other.done.is_set():
        other.done.wait(0.01)
    late = Request(ids, max_new_tokens=12)
    tokens_while_late_was_fed = []
    other.accept = lambda token: tokens_while_late_was_fed.append(late.first_token_s is None) and False
    engine.wait(engine.submit(late))
    engine.wait(other)
    # 641 ids after the 50 copied from the other row: 41 chunks (the 40th cut to 15 ids, so that
    # none is fed alone), with a step of the other request after each of them.
    assert late.reused == 50 and engine.time.prefilled == 50 + 641
    assert sum(tokens_while_late_was_fed) >= 30
    assert late.out == whole  # decoded in a batch: the int8 graph, whose rows do not depend on it


@pytest.mark.parametrize("own_rows", [True, False])
def test_an_agent_running_its_code_keeps_its_cache_while_others_come_and_go(model_dir, own_rows):
    # Agents run one per thread. When the others move on to new questions, each takes the row of
    # its own ended conversation, not the least recently used one, which here is the row of the
    # agent still running its code: that agent would prefill its conversation again (and its
    # cache, prefilled rather than decoded, would differ in the last bits). One caller for every
    # request (own_rows=False) falls back to least recently used, and the row is lost.
    from attar.runtime.engine import Engine, Request

    rng = np.random.default_rng(2)
    prompt = lambda n: [int(i) for i in rng.integers(300, 40000, n)]  # noqa: E731
    caller = (lambda c: c) if own_rows else (lambda c: 0)  # noqa: E731
    engine = Engine(ExportDir.open(model_dir), max_rows=4)
    first = [engine.submit(Request(prompt(n), max_new_tokens=10, caller=caller(c))) for n, c in ((120, 1), (60, 2), (60, 3))]
    for request in first:
        engine.wait(request)
    assert engine.pool.rows == 4  # the three conversations and an empty row
    agent = first[0]
    for _ in range(3):  # callers 2 and 3 go on to new questions while agent 1 runs its code
        for c in (2, 3):
            engine.run(Request(prompt(60), max_new_tokens=10, caller=caller(c)))
    step = engine.run(Request(agent.ids + agent.out + prompt(15), max_new_tokens=4, caller=caller(1)))
    held = len(agent.ids) + len(agent.out) - 1  # the last token sampled was never fed
    assert (step.reused >= held) == own_rows, (step.reused, held)


def test_agents_in_threads_decode_in_one_batch_and_match_one_at_a_time(int8_dir):
    questions = ["What is 17 * 23? Answer with code.", "Name three rivers in Europe.",
                 "Write a haiku about the sea.", "How many days are in a leap year? Explain briefly."]
    stop = ["<end_code>", "Observation:"]
    alone = [EngineBackend(int8_dir).generate(conversation(q), stop, GREEDY).text for q in questions]
    shared = EngineBackend(int8_dir)
    texts: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: texts.__setitem__(i, shared.generate(
        conversation(questions[i]), stop, GREEDY).text)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [texts.get(i) for i in range(len(questions))] == alone
    engine = shared.engine
    assert engine.steps < sum(len(shared.encode([], t)) for t in alone)  # rows were decoded together
    assert engine.worker is None and not engine.active  # the scheduler exits when idle


def test_rows_of_different_lengths_in_one_batch_keep_their_own_positions(int8_dir):
    from attar.runtime.engine import Engine, Request

    engine = Engine(ExportDir.open(int8_dir))
    long_ids = EngineBackend(int8_dir).encode(conversation("Explain, in detail, how rivers form deltas. " * 8), "")
    short_ids = long_ids[:12] + long_ids[-5:]
    alone = [Engine(ExportDir.open(int8_dir)).run(Request(ids, max_new_tokens=12)).out
             for ids in (long_ids, short_ids)]
    both = [engine.submit(Request(ids, max_new_tokens=12)) for ids in (long_ids, short_ids)]
    assert [engine.wait(r).out for r in both] == alone


def test_a_failing_callback_ends_only_its_own_request(model_dir):
    from attar.runtime.engine import Engine, Request

    engine = Engine(ExportDir.open(model_dir))
    ids = EngineBackend(model_dir).encode(conversation("Count to ten."), "")

    def broken(token):
        raise BrokenPipeError("the terminal went away")

    bad = engine.submit(Request(ids, max_new_tokens=8, accept=broken))
    good = engine.submit(Request(ids, max_new_tokens=8))
    with pytest.raises(BrokenPipeError):
        engine.wait(bad)
    assert len(engine.wait(good).out) == 8


def test_closing_ends_requests_in_flight_and_refuses_new_ones(model_dir):
    """What an interrupted `distill generate` or `eval` does: its threads waiting on long
    generations must return now, not when each generation has run to its end."""
    from attar.runtime.engine import Engine, EngineClosed, Request

    engine = Engine(ExportDir.open(model_dir), max_rows=4)
    ids = EngineBackend(model_dir).encode(conversation("Write a very long story."), "")
    running = [engine.submit(Request(ids, max_new_tokens=4000)) for _ in range(2)]
    queued = [engine.submit(Request(ids, max_new_tokens=4000)) for _ in range(3)]  # one more than the rows
    while not all(r.out for r in running):
        threading.Event().wait(0.05)
    engine.close()
    for request in running + queued:
        with pytest.raises(EngineClosed):
            engine.wait(request)
    assert all(len(r.out) < 1000 for r in running + queued)
    with pytest.raises(EngineClosed):
        engine.submit(Request(ids, max_new_tokens=4))


# -- speculation: a lone greedy request checks guessed tokens ---------------------------------


def whole_pass_argmax(folder: ExportDir, ids: list[int], out: list[int], int8: bool) -> list[int]:
    """What one forward pass over prompt + output predicts at each output position."""
    from attar.runtime.parity import OnnxScorer

    logits = OnnxScorer(folder, graph=folder.graph(int8)).logits([ids + out])[0]
    return logits[len(ids) - 1:len(ids) - 1 + len(out)].argmax(-1).tolist()


@pytest.mark.parametrize("int8", [False, True], ids=["exact", "int8"])
def test_speculative_greedy_is_what_one_pass_over_the_whole_text_predicts(model_dir, int8_dir, int8):
    from attar.runtime.engine import Request

    folder = ExportDir.open(int8_dir if int8 else model_dir)
    backend = EngineBackend(folder, int8=int8, speculate=True)
    for question in ("List the first 20 Fibonacci numbers using a loop.", "What is 17 * 23? Answer with code."):
        ids = backend.encode(conversation(question))
        out = backend.engine.run(Request(ids, 64, eos=backend.eos)).out
        assert out == whole_pass_argmax(folder, ids, out, int8)  # bit for bit: no near tie decided otherwise
    assert backend.engine.agreed > 0  # guesses were checked, and some were right: fewer steps than tokens


@pytest.mark.parametrize("kernel", [False, True], ids=["onnxruntime", "attar"])
def test_a_guess_never_changes_the_tokens(model_dir, monkeypatch, kernel, request):
    """On onnxruntime's ops, on the exact graph; on attar's kernels, on the int8 graph, where a
    one-token step computes what a wider one does on any CPU (integer projections, and attar's
    attention), so the speculating tokens are also those of one-token steps."""
    import attar.runtime.engine as engine_module
    from attar.runtime.engine import Engine, Request

    if kernel:
        request.getfixturevalue("library")
    folder = ExportDir.open(request.getfixturevalue("int8_dir") if kernel else model_dir)
    ids = EngineBackend(folder).encode(conversation("Write a Python function that returns the n-th prime, and test it."))

    def decode() -> tuple[list[int], Engine]:
        engine = Engine(folder, speculate=True, kernel=kernel)
        return engine.run(Request(ids, 48)).out, engine

    guessed, real = decode()
    assert real.one_token_exact or not kernel
    rng = np.random.default_rng(0)
    for guesser in (lambda context, most: [int(t) for t in rng.integers(0, 49152, most)],  # always wrong
                    lambda context, most: [],  # no guess: the next token alone (twice, off attar's kernels)
                    lambda context, most: context[-most:]):
        monkeypatch.setattr(engine_module, "lookup", guesser)
        out, engine = decode()
        assert out == guessed
        assert engine.guessed > 0 or kernel
    assert real.agreed > 0 and real.steps < len(guessed)
    plain = Engine(folder, speculate=False, kernel=kernel).run(Request(ids, 48)).out
    assert (plain == guessed) or not kernel  # on attar's kernels, the tokens of one-token steps too


def step_shapes(engine) -> list[tuple[int, int]]:
    """The (rows, tokens) of every forward call the engine makes from now on."""
    shapes = []
    forward = engine._forward
    engine._forward = lambda start, stop, ids, *rest: shapes.append(ids.shape) or forward(start, stop, ids, *rest)
    return shapes


def test_up_to_three_greedy_requests_speculate_together_and_keep_their_tokens(int8_dir, library):
    """On attar's kernels a position computes the same in a step of any width and any rows, so
    requests in flight check their guesses in one step (the step's positions shared out among
    them), and each one's tokens are those it decodes alone, one token a step."""
    from attar.runtime.engine import Engine, Request

    folder = ExportDir.open(int8_dir)
    backend = EngineBackend(folder)
    questions = ["Write a Python function that returns the n-th prime, and test it.",
                 "List the first 20 Fibonacci numbers using a loop.", "What is 17 * 23? Answer with code."]
    prompts = [backend.encode(conversation(q)) for q in questions]
    alone = [Engine(folder, speculate=False).run(Request(ids, 40)).out for ids in prompts]
    for n in (2, 3):
        engine = Engine(folder)
        assert engine.speculate
        shapes = step_shapes(engine)
        requests = [engine.submit(Request(ids, 40)) for ids in prompts[:n]]
        assert [engine.wait(r).out for r in requests] == alone[:n]
        together = [(rows, width) for rows, width in shapes if rows > 1]  # a prompt is fed in a row of its own
        assert any(width > 1 for _, width in together)  # rows checked their guesses in one step
        assert all(rows * width <= 6 for rows, width in together)
        assert engine.agreed > 0


def test_on_onnxruntimes_attention_only_a_lone_request_speculates(model_dir):
    """Its GroupQueryAttention takes a single row past a token: requests in flight together step
    one token each, even on an engine told to speculate."""
    from attar.runtime.engine import Engine, Request

    folder = ExportDir.open(model_dir)
    backend = EngineBackend(folder, kernel=False)
    prompts = [backend.encode(conversation(q)) for q in ("Write a haiku about the sea.", "What is 17 * 23? Answer with code.")]
    engine = Engine(folder, speculate=True, kernel=False)
    shapes = step_shapes(engine)
    requests = [engine.submit(Request(ids, 24)) for ids in prompts]
    assert all(len(engine.wait(r).out) == 24 for r in requests)
    assert any(rows > 1 for rows, _ in shapes) and all(width == 1 for rows, width in shapes if rows > 1)


def test_prompt_lookup_guesses_what_followed_the_longest_latest_match():
    from attar.runtime.engine import lookup

    assert lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 5) == [8, 5, 1]  # the latest of two 3-token matches
    assert lookup([7, 1, 2, 4, 4, 6, 2], 5) == [4]  # only the last token occurred before
    assert lookup([5, 6, 7, 8], 5) == []  # nothing did
    assert lookup([3, 3, 3, 3], 2) == [3]  # the latest occurrence overlaps the tail: one token follows it
    assert lookup([4, 9, 4], 5) == [9]


def test_an_agent_speculates_on_its_own_backend_and_a_shared_one_where_it_changes_no_token(model_dir):
    from attar.runtime.agent import Agent

    assert Agent(model_dir).backend.engine.speculate  # one stream: `attar chat`, the Python API
    shared = EngineBackend(model_dir, kernel=False)  # serve, eval, the teacher on onnxruntime's ops
    # Only where a request answers the same at any concurrency (not on onnxruntime's attention here).
    assert Agent(shared).backend.engine.speculate == shared.engine.one_token_exact
    assert not EngineBackend(model_dir, speculate=False).engine.speculate


def test_on_attars_kernels_a_one_token_step_computes_what_a_wider_one_does(model_dir, int8_dir, library):
    """So a shared backend speculates there: a lone request (the last question of an eval) answers
    as it would beside others, one token a step. On the int8 graph on any CPU; on the exact graph
    where the CPU library's 4-bit kernel computes one row as it does several (it does on the AVX-512
    EPYC this was written on)."""
    from attar.runtime.engine import Request

    for folder, int8 in ((model_dir, False), (int8_dir, True)):
        shared = EngineBackend(folder, int8=int8)
        assert shared.engine.kernel and shared.engine.speculate == shared.engine.one_token_exact
        if not shared.engine.one_token_exact:
            assert not int8  # integer projections and attar's attention: no CPU computes one row otherwise
            continue
        ids = shared.encode(conversation("List the first 20 Fibonacci numbers using a loop."))
        alone = shared.engine.run(Request(ids, 40)).out
        plain = EngineBackend(folder, int8=int8, speculate=False).engine
        other = plain.submit(Request(ids[:-3], 60))  # a neighbour in the batch
        beside = plain.run(Request(ids, 40)).out
        plain.wait(other)
        assert alone == beside
        assert shared.engine.steps < len(alone)


def test_multi_token_steps_compute_a_position_the_same_whatever_their_width(model_dir, int8_dir):
    """The fact speculation rests on: onnxruntime's steps of 2 or more tokens give a position
    bit-identical logits whatever the step's width and the position's place in it."""
    from attar.runtime.engine import Engine

    ids = [int(i) for i in np.random.default_rng(1).integers(300, 40000, 120)]
    for folder, int8 in ((model_dir, False), (int8_dir, True)):
        engine = Engine(ExportDir.open(folder), int8=int8, speculate=True)  # its graph gives the last positions
        engine.pool.reserve(1, 200)

        def logits(widths: list[int]) -> dict[int, np.ndarray]:
            engine._forward(0, 1, np.array([ids[:100]], dtype=np.int64), [0])  # a prompt
            seen = {}
            for at, width in enumerate(widths, start=100):  # feed `width` ids, keep the first one's logits
                out = engine._forward(0, 1, np.array([ids[at:at + width]], dtype=np.int64), [at]).logits[0]
                seen[at] = out[len(out) - width]
            return seen

        mixed = [2, 3, 6, 4, 5, 2, 6, 3]
        plain = logits([2] * len(mixed))
        assert all(np.array_equal(plain[p], q) for p, q in logits(mixed).items())


# -- the int8 graph (projections on the CPU's integer matrix units) --------------------------


def test_a_row_of_the_int8_graph_does_not_depend_on_the_others(int8_dir):
    from attar.runtime.engine import Engine

    engine = Engine(ExportDir.open(int8_dir), max_rows=4)
    assert engine.graph.name == "model.int8.onnx"
    engine.pool.reserve(4, 64)
    first = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.int64)
    others = {0: np.array([[7, 8, 9, 10, 11, 12]] * 3), 1: np.array([[20000, 3, 40000, 5, 600, 7]] * 3)}
    rows = [engine._forward(0, 4, np.concatenate([first, others[k]]).astype(np.int64), [0] * 4).logits[0] for k in others]
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-5)  # per-row quantization: nothing leaks across rows


def test_the_int8_graph_picks_what_the_exact_one_picks(int8_dir):
    from attar.runtime.parity import OnnxScorer

    folder = ExportDir.open(int8_dir)
    backend = EngineBackend(folder, int8=False)
    from attar.runtime.engine import Request

    ids = backend.encode(conversation("What is 17 * 23? Answer with Python code."))
    ids += backend.engine.run(Request(ids, 32, eos=backend.eos)).out  # a prompt and the model's own reply
    exact = OnnxScorer(folder).logits([ids])[0]
    many = OnnxScorer(folder, graph=folder.int8_decoder).logits([ids])[0]
    agreement = float((exact.argmax(-1) == many.argmax(-1)).mean())
    assert agreement > 0.9, agreement
    # One graph for every step, quantized row by row: with the prompt cached either way, a
    # request answers the same alone and in a batch of others.
    engine = EngineBackend(folder, max_rows=8)
    messages = conversation("Name three rivers in Europe.")
    engine.generate(messages, sampling=Sampling(max_new_tokens=1))  # the prompt, cached
    alone = engine.generate(messages, sampling=GREEDY).text
    gens = engine.generate_batch(messages, [GREEDY] * 4)
    assert {g.text for g in gens} == {alone}


def test_local_teacher_and_eval_get_a_batch_row_for_each_request_in_flight(model_dir):
    # 16 teacher questions in flight decode as one batch of 16 rows, not 8 and a queue; eval's rows
    # are its questions in flight times SAG's candidates.
    from attar.distill.evaluate import load_model
    from attar.distill.teacher import load_teacher

    assert load_teacher(str(model_dir), concurrency=16).engine.max_rows == 16
    assert load_teacher(str(model_dir), concurrency=2).engine.max_rows == 8
    assert load_model(str(model_dir), rows=4 * 8).engine.max_rows == 32


def test_the_top_k_found_near_the_maximum_are_the_top_k_of_the_whole_vocabulary():
    from attar.runtime.engine import largest

    rng = np.random.default_rng(0)
    for scale in (0.001, 0.5, 3.0, 40.0, 1e4):  # from nearly flat to far apart
        for _ in range(10):
            logits = (rng.standard_normal(5000) * scale).astype(np.float32)
            logits[rng.integers(0, 5000, 300)] = -np.inf  # masked tokens
            k = int(rng.integers(1, 400))
            assert sorted(largest(logits, k)) == sorted(np.argsort(-logits, kind="stable")[:k])
    assert sorted(largest(np.zeros(10, np.float32), 10)) == list(range(10))


def test_sampling_from_the_graphs_candidates_is_sampling_from_the_whole_vocabulary(model_dir):
    # The graph's TopK hands sampling 64 logits a position; a top-k of at most that many must draw
    # what the whole vocabulary's logits would give with the same seed, and greedy take the argmax.
    from attar.runtime.engine import CANDIDATES, Engine, sample

    engine = Engine(ExportDir.open(model_dir), speculate=True)  # several positions a step
    engine.pool.reserve(1, 64)
    scores = engine._forward(0, 1, np.random.default_rng(2).integers(300, 40000, (1, 40)), [0])
    assert scores.top.shape[1:] == scores.ids.shape[1:] == (6, CANDIDATES)
    nothing = np.zeros(0, np.float32)
    for position in range(6):
        logits = scores.logits[0, position]
        top, ids = scores.top[0, position], scores.ids[0, position]
        assert ids[0] == np.argmax(logits) and np.array_equal(top, logits[ids])
        assert list(ids) == list(np.argsort(-logits, kind="stable")[:CANDIDATES])
        assert sample(top, ids, lambda: logits, 0.0, 1.0, 50, np.random.default_rng(0)) == ids[0]  # greedy
        for temperature, top_p, top_k in ((0.4, 0.8, 50), (1.0, 1.0, 64), (2.0, 0.95, 7)):
            for seed in range(5):
                drawn = sample(top, ids, lambda: logits, temperature, top_p, top_k, np.random.default_rng(seed))
                whole = sample(nothing, nothing, lambda: logits, temperature, top_p, top_k, np.random.default_rng(seed))
                assert drawn == whole
    read = []  # a larger top-k reads the whole vocabulary
    sample(top, ids, lambda: read.append(1) or logits, 1.0, 1.0, 0, np.random.default_rng(0))
    assert read == [1]
