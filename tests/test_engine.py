"""attar's generation engine against onnxruntime-genai on the same export, token for token, and
each optimisation (KV reuse across calls, rewind, shared prefill of a batch, cache growth) against
the same engine without it."""

import numpy as np
import pytest

from attar.runtime.llm import EngineBackend, OnnxBackend, Sampling

SYSTEM = {"role": "system", "content": "You are an expert assistant who solves tasks with Python code."}
GREEDY = Sampling(max_new_tokens=40)


@pytest.fixture(scope="module")
def model_dir():
    from attar.runtime.models import pull

    return pull("smollm2-135m", log=lambda m: None, check=False)


def conversation(*turns):
    roles = ["user", "assistant"]
    return [SYSTEM] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_greedy_matches_onnxruntime_genai(model_dir):
    engine, genai = EngineBackend(model_dir), OnnxBackend(model_dir)
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
    assert agent.sequence.reused > 0.8 * len(agent._encode(first, ""))  # only the appended turns were prefilled
    assert continued.text == EngineBackend(model_dir).generate(second, sampling=GREEDY).text


def test_a_prompt_that_diverges_rewinds_the_cache(model_dir):
    agent = EngineBackend(model_dir)
    agent.generate(conversation("Tell me about the river Danube."), sampling=GREEDY)
    other = conversation("Tell me about the river Rhine.")
    assert agent.generate(other, sampling=GREEDY).text == EngineBackend(model_dir).generate(other, sampling=GREEDY).text
    assert 0 < agent.sequence.reused < len(agent._encode(other, ""))


def test_batch_rows_share_one_prefill_and_match_single_generation(model_dir):
    agent = EngineBackend(model_dir)
    messages = conversation("Write one line of Python that prints 5.")
    single = agent.generate(messages, sampling=GREEDY).text
    rows = agent.generate_batch(messages, 3, sampling=GREEDY)
    assert [g.text for g in rows] == [single] * 3
    sampled = Sampling(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=5)
    again = EngineBackend(model_dir)
    assert [g.text for g in agent.generate_batch(messages, 4, sampling=sampled)] == \
           [g.text for g in again.generate_batch(messages, 4, sampling=sampled)]  # seeded: deterministic


def test_a_cache_that_grows_past_its_capacity_stays_exact(model_dir):
    from attar.runtime.engine import Engine

    engine = Engine(model_dir)
    ids = [int(i) for i in np.random.default_rng(0).integers(300, 40000, 1500)]
    whole = engine.sequence().extend(ids)
    pieces = engine.sequence()
    for end in (400, 1000, 1300, 1500):  # crosses the 1024-token initial capacity
        logits = pieces.extend(ids[:end])
    assert pieces.capacity >= 1500
    assert np.argmax(whole) == np.argmax(logits)
    assert np.abs(whole - logits).max() < 0.05 * np.abs(whole).max()
