"""The agent loop, exactly: a scripted backend drives it; a real exported model runs it end to end."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attar.runtime import Agent, ScriptedBackend, parse_code
from attar.runtime.agent import canonical_output, parse_action
from attar.runtime.llm import is_repeating
from attar.runtime.memory import render_step, step_header, to_html
from attar.runtime.executor import Limits

LIMITS = Limits(timeout_s=2.0, memory_mb=64)


def step(thought, code):
    return f"Thought: {thought}\nCode:\n```py\n{code}\n```<end_code>"


def test_parse_code_variants():
    assert parse_code("Thought: x\nCode:\n```py\nprint(1)\n```<end_code>") == "print(1)"
    assert parse_code("```python\na = 1\nb = 2\n```") == "a = 1\nb = 2"
    assert parse_code("Code:\n```py\nfinal_answer(3)\n") == "final_answer(3)"  # unclosed at the end
    assert parse_code("no code here") is None
    assert parse_code("```py\n\n```") is None


def test_a_boxed_answer_without_code_is_the_final_answer():
    assert parse_action("So q - p = 2.\n\nThe answer is \\boxed{\\frac{1}{3}}.") == "final_answer('\\\\frac{1}{3}')"
    assert parse_action("```py\nx = 1\n```\nthen \\boxed{2}") == "x = 1"  # code wins
    assert parse_action("no code, no box") is None and parse_action("\\boxed{ }") is None
    backend = ScriptedBackend(["Thought: 13 - 11 = 2, so the answer is \\boxed{2}."])
    with Agent(backend, limits=LIMITS) as agent:
        result = agent.run("q - p?")
    assert result.answer == "2" and result.finished_by == "final_answer" and result.steps[0].error is None


def test_teacher_steps_are_stored_in_the_student_format():
    native = "Thought: I will iterate.\n```python\nprint(2)\n```\n"  # stopped at a made-up ```output
    assert canonical_output(native, "print(2)") == step("I will iterate.", "print(2)")
    assert canonical_output(step("ok", "x = 1"), "x = 1") == step("ok", "x = 1")
    boxed = "The answer is \\boxed{7}."
    assert canonical_output(boxed, parse_action(boxed)) == step("The answer is \\boxed{7}.", "final_answer('7')")


def test_tool_calls_and_final_answer():
    calls = []

    def lookup(name: str) -> int:
        """Age of a person."""
        calls.append(name)
        return {"ada": 36}[name]

    backend = ScriptedBackend([step("look it up", "age = lookup('ada')\nprint(age)"),
                               step("double it", "final_answer(age * 2)")])
    with Agent(backend, tools=[lookup], limits=LIMITS) as agent:
        result = agent.run("How old would Ada be twice over?")
    assert result.answer == 72 and result.finished_by == "final_answer"
    assert calls == ["ada"]
    assert [s.stdout for s in result.steps] == ["36\n", ""]
    # The second call saw the first observation in the seed's format.
    second = backend.seen[1]
    assert second[-1] == {"role": "user", "content": "Observation:\nExecution logs:\n36\nLast output from code snippet:\nNone"}
    assert second[-2]["content"].endswith("<end_code>")
    assert "lookup(name: str) -> int" in second[0]["content"] and "Age of a person." in second[0]["content"]


def test_parse_and_execution_errors_are_observations():
    backend = ScriptedBackend(["I think the answer is 4.",
                               step("divide", "1 / 0"),
                               step("fix", "final_answer(4)")])
    with Agent(backend, limits=LIMITS) as agent:
        result = agent.run("2+2?")
    assert result.answer == 4
    parse_err, exec_err, _ = result.steps
    assert parse_err.code is None and "```py" in parse_err.error
    assert "ZeroDivisionError" in exec_err.error
    assert backend.seen[2][-1]["content"].startswith("Observation:\nError:\n")
    assert "ZeroDivisionError" in backend.seen[2][-1]["content"]


def test_max_steps_then_final_answer_from_memory():
    backend = ScriptedBackend([step("a", "x = 1"), step("b", "x += 1"), "The answer is 2."])
    with Agent(backend, max_steps=2, limits=LIMITS) as agent:
        result = agent.run("count")
    assert result.finished_by == "max_steps"
    assert result.answer == "The answer is 2."
    final_messages = backend.seen[-1]
    earlier = backend.seen[-2]
    assert final_messages[:len(earlier)] == earlier  # the conversation as the model saw it (its cache applies)
    assert "used all your steps" in final_messages[-1]["content"] and final_messages[-1]["content"].endswith("count")


def test_stop_strings_cut_the_output():
    backend = ScriptedBackend([step("t", "final_answer('ok')") + "\nObservation: hallucinated"])
    with Agent(backend, limits=LIMITS) as agent:
        result = agent.run("q")
    assert result.steps[0].model_output.endswith("<end_code>")
    assert "hallucinated" not in result.steps[0].model_output


def test_memory_json_and_html_trace():
    backend = ScriptedBackend([step("t", "print('<b>hi</b>')"), step("t", "final_answer('<script>')")])
    with Agent(backend, limits=LIMITS) as agent:
        result = agent.run("render me")
    data = json.loads(json.dumps(result.to_dict(), default=repr))
    assert data["memory"]["tasks"][0]["steps"][0]["stdout"] == "<b>hi</b>\n"
    page = to_html(result.memory)
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "Step 1" in step_header(1, False) and "Code:" in render_step(result.steps[0])


def test_max_steps_fallback_is_marked_everywhere(capsys):
    from attar.runtime.chat import run_chat

    never = [step("t", "print(1)")] * 2 + ["I think the answer is 7."]
    with Agent(ScriptedBackend(list(never)), max_steps=2, limits=LIMITS) as agent:
        result = agent.run("q")
    assert result.finished_by == "max_steps" and result.is_fallback and result.to_dict()["fallback"] is True
    assert [s.number for s in result.steps] == [1, 2, 3] and result.steps[-1].is_fallback
    assert "Fallback answer" in to_html(result.memory)

    run_chat("q", model=ScriptedBackend(list(never)), index=None, max_steps=2, sag=1, temperature=None, top_p=None,
             seed=None, provider="cpu", as_json=False, trace=None)
    out, err = capsys.readouterr()
    assert out.strip() == "I think the answer is 7."  # printed once, on stdout
    assert "No final_answer within 2 steps" in err and "Step 3" not in err
    assert err.index("━━ Step 1 ━━") < err.index("━━ Step 2 ━━") < err.index("Out of steps")

    run_chat("q", model=ScriptedBackend(list(never)), index=None, max_steps=2, sag=1, temperature=None, top_p=None,
             seed=None, provider="cpu", as_json=True, trace=None)
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["fallback"] is True and data["finished_by"] == "max_steps"


def test_stop_on_repeat_ends_a_run_that_goes_round_and_only_that():
    looping = [step("t", "print(1 / 0)"), step("u", "y = 2"), step("t", "print(1 / 0)"), "Perhaps 7.",
               step("never", "final_answer(1)")]
    with Agent(ScriptedBackend(list(looping)), max_steps=5, limits=LIMITS, stop_on_repeat=True) as agent:
        result = agent.run("q")
    # Step 3 wrote what step 1 wrote and saw the same error: the fallback comes next, not step 4.
    assert result.finished_by == "repeated" and result.is_fallback and result.answer == "Perhaps 7."
    assert [s.number for s in result.steps] == [1, 2, 3, 4] and result.steps[-1].is_fallback
    with Agent(ScriptedBackend(list(looping)), max_steps=5, limits=LIMITS) as agent:  # the paper's loop goes on
        assert agent.run("q").finished_by == "final_answer"

    # The same code seeing another observation (the sandbox's state moved on) is no repeat.
    counting = [step("t", "n = globals().get('n', 0) + 1\nprint(n)")] * 3 + [step("t", "final_answer(n)")]
    with Agent(ScriptedBackend(list(counting)), max_steps=5, limits=LIMITS, stop_on_repeat=True) as agent:
        result = agent.run("count")
    assert result.finished_by == "final_answer" and result.answer == 3


def test_repetition_is_detected_only_when_a_chunk_loops():
    assert is_repeating([5] * 48)
    assert is_repeating([1, 2, 3] + [7, 8, 9, 10] * 12)
    assert not is_repeating(list(range(200)))
    assert not is_repeating([1, 2] * 10)  # 20 tokens: a short run is fine (e.g. indentation)


def test_unreachable_server_is_one_line_and_bounded():
    import time

    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "chat", "hi", "--model", "http://127.0.0.1:9/v1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: cannot reach http://127.0.0.1:9/v1")
    assert time.monotonic() - began < 15


def test_agents_share_nothing():
    a = Agent(ScriptedBackend([step("t", "secret = 1"), step("t", "final_answer(secret)")]), limits=LIMITS)
    b = Agent(ScriptedBackend([step("t", "final_answer(secret)"), step("t", "final_answer('none')")]), limits=LIMITS)
    try:
        assert a.run("a").answer == 1
        result = b.run("b")
        assert "NameError" in result.steps[0].error and result.answer == "none"
    finally:
        a.close()
        b.close()


def test_empty_question_is_rejected():
    with Agent(ScriptedBackend([]), limits=LIMITS) as agent, pytest.raises(ValueError, match="empty"):
        agent.run("   ")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=200),
                          st.builds(lambda t, c: step(t, c), st.text(max_size=40), st.text(max_size=80))),
                min_size=0, max_size=4))
def test_fuzzed_model_outputs_never_crash_the_loop(outputs):
    with Agent(ScriptedBackend(list(outputs)), max_steps=3, limits=LIMITS) as agent:
        result = agent.run("anything")
    assert result.finished_by in ("final_answer", "max_steps")
    assert len(result.steps) <= 4


# -- a real exported model through the CLI ------------------------------------------------------------

HEAVY = ("torch", "transformers", "peft", "trl", "optimum")


def test_chat_cli_runs_a_real_onnx_model(tiny_onnx, tmp_path):
    trace = tmp_path / "run.html"
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['attar', 'chat', 'What is 2+2?', '--model', sys.argv[1], '--max-steps', '2', '--json',"
        " '--trace', sys.argv[2]]\n"
        "try:\n    runpy.run_module('attar.runtime.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(tiny_onnx), str(trace)], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "HEAVY []", proc.stderr[-2000:]
    result = json.loads(lines[-2])
    assert result["finished_by"] in ("final_answer", "max_steps")
    steps = result["memory"]["tasks"][0]["steps"]
    assert 1 <= len(steps) <= 3 and all(s["completion_tokens"] > 0 for s in steps)
    assert trace.read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "model folder not found"),
    (["--model", "."], "not an ONNX GenAI model folder"),
])
def test_chat_bad_model_one_line_error(args, message):
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "chat", "hi", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_chat_empty_question(tiny_onnx):
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "chat", "  ", "--model", str(tiny_onnx)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "the question is empty" in proc.stderr


def test_a_model_that_does_not_fit_is_refused_in_one_line(tiny_onnx, monkeypatch):
    from attar.runtime import llm
    from attar.runtime.modeldir import ModelError

    monkeypatch.setattr(llm, "_available_bytes", lambda: 1024)
    with pytest.raises(ModelError, match="needs about .* GiB of memory to load; this machine has"):
        llm.EngineBackend(tiny_onnx)
