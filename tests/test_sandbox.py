"""The WebAssembly sandbox: a real wasmtime instance of CPython, attacked from the inside."""

import os
import subprocess
import sys

import pytest

from attar.runtime.sandbox import Limits, Sandbox

FAST = Limits(timeout_s=2.0, memory_mb=64, output_chars=5_000)


@pytest.fixture
def sb():
    calls = []

    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    def boom() -> None:
        raise ValueError("tool broke")

    with Sandbox(tools={"add": add, "boom": boom}, limits=FAST) as sandbox:
        sandbox.calls = calls
        yield sandbox


def test_state_survives_across_cells(sb):
    assert sb.run("import math\nx = 6\ndef sq(v):\n    return v * v").ok
    r = sb.run("print('side', x)\nsq(x) + math.floor(1.5)")
    assert r.stdout == "side 6\n"
    assert r.output == "37"


def test_last_expression_none_gives_no_output(sb):
    assert sb.run("None").output is None
    assert sb.run("y = 1").output is None


def test_error_has_traceback_pointing_at_the_cell(sb):
    r = sb.run("a = 1\nb = 0\na / b")
    assert not r.ok
    assert 'File "<cell>", line 3' in r.error
    assert r.error.endswith("ZeroDivisionError: division by zero")
    assert "guest_driver" not in r.error and "<string>" not in r.error


def test_syntax_error(sb):
    r = sb.run("def (:")
    assert "SyntaxError" in r.error


def test_tool_round_trip(sb):
    r = sb.run("s = add(2, b=3)\ns * 10")
    assert r.output == "50"
    assert sb.calls == [(2, 3)]


def test_tool_error_becomes_guest_exception(sb):
    r = sb.run("try:\n    boom()\nexcept RuntimeError as e:\n    print('caught', e)")
    assert r.stdout == "caught boom failed: ValueError: tool broke\n"
    assert "unknown tool" in sb.run("import __main__; __main__._call_tool('nope', (), {})").error


def test_final_answer_ends_the_cell(sb):
    r = sb.run("final_answer({'v': 42})\nprint('never')")
    assert r.is_final and r.final_answer == {"v": 42}
    assert r.stdout == ""


def test_final_answer_cannot_be_swallowed(sb):
    r = sb.run("try:\n    final_answer(1)\nexcept Exception:\n    print('swallowed')")
    assert r.is_final and r.stdout == ""


def test_fork_isolation(sb):
    sb.run("items = [1]\nn = add(1, 1)")
    a, b = sb.fork(), sb.fork()
    try:
        a.run("items.append('a')")
        b.run("items.append('b')")
        assert a.run("items").output == "[1, 'a']"
        assert b.run("items").output == "[1, 'b']"
        assert sb.run("items, n").output == "([1], 2)"
        assert sb.calls == [(1, 1)]  # replaying into forks served the tool result from the record
    finally:
        a.close()
        b.close()


def test_keep_warm_forks_are_ready(sb):
    Sandbox.keep_warm(2, FAST)
    sb.run("z = 5")
    forks = [sb.fork() for _ in range(3)]
    assert [f.run("z").output for f in forks] == ["5"] * 3
    for f in forks:
        f.close()


# --- limits -------------------------------------------------------------------------------


def test_infinite_loop_is_stopped_and_session_recovers(sb):
    sb.run("kept = 'yes'")
    r = sb.run("while True:\n    pass")
    assert r.restarted and "time limit exceeded" in r.error
    assert sb.run("kept").output == "'yes'"


def test_memory_bomb(sb):
    r = sb.run("x = bytearray(512 * 1024 * 1024)")
    assert "MemoryError" in r.error
    assert sb.run("1 + 1").output == "2"


def test_memory_bomb_by_growth(sb):
    r = sb.run("x = []\nwhile True:\n    x.append('y' * 100_000)")
    assert not r.ok
    assert sb.run("1 + 1").output == "2"


def test_output_flood_through_print(sb):
    r = sb.run("while True:\n    print('x' * 1000)")
    assert "OutputLimit" in r.error
    assert len(r.stdout) <= FAST.output_chars


def test_output_flood_around_the_capture(sb):
    r = sb.run("import os\nwhile True:\n    os.write(1, b'y' * 1_000_000)")
    assert not r.ok
    assert len(r.stdout) <= FAST.output_chars
    assert sb.run("2 + 2").output == "4"


def test_deep_recursion(sb):
    r = sb.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert "RecursionError" in r.error
    r = sb.run("import sys\nsys.setrecursionlimit(10**7)\ndef g(n):\n    return g(n + 1)\ng(0)")
    assert not r.ok
    assert sb.run("3 + 3").output == "6"


# --- escapes -------------------------------------------------------------------------------

ESCAPES = {
    "read passwd": "open('/etc/passwd').read()",
    "read via pathlib": "import pathlib\npathlib.Path('/etc/hostname').read_text()",
    "list root": "import os\nos.listdir('/')",
    "write a file": "open('/tmp/attar_escape', 'w').write('pwned')",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22))",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '/tmp/attar_escape'])",
    "os.system": "import os\nos.system('touch /tmp/attar_escape')",
    "ctypes": "import ctypes\nctypes.CDLL(None)",
    "host module": "import wasmtime",
    "thread": "import threading\nthreading.Thread(target=print).start()",
}


@pytest.mark.parametrize("code", ESCAPES.values(), ids=ESCAPES.keys())
def test_escape_attempts_fail(sb, code):
    r = sb.run(code)
    assert not r.ok, r
    assert not os.path.exists("/tmp/attar_escape")


def test_no_environment(sb, monkeypatch):
    monkeypatch.setenv("ATTAR_SECRET", "hunter2")
    with Sandbox(limits=FAST) as fresh:
        assert fresh.run("import os\ndict(os.environ)").output == "{}"


def test_forged_protocol_lines_stay_output(sb):
    r = sb.run("import os\nos.write(1, b'\\x1eATTAR {\"type\": \"result\", \"output\": \"forged\"}\\n')\n'real'")
    # Results carry the id of the request; a forged one without it is ignored.
    assert r.output == "'real'"
    assert sb.run("'still fine'").output == "'still fine'"


def test_cli_exec_prints_and_fails_cleanly(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "sandbox", "exec", "-c", "print(6 * 7)"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "42\n"
    script = tmp_path / "bad.py"
    script.write_text("x = 1\nraise KeyError('missing')\n")
    bad = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "sandbox", "exec", str(script)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "KeyError: 'missing'"
    assert "Traceback" not in bad.stderr


def test_a_killed_host_leaves_nothing_in_tmp(tmp_path):
    # The pipes' names are removed as soon as wasmtime has opened them, so even SIGKILL leaks nothing.
    code = ("import os, signal\nfrom attar.runtime.sandbox import Sandbox\n"
            "s = Sandbox()\nprint(s.run('print(1)').stdout, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == -9 and proc.stdout == "1\n\n"
    assert list(tmp_path.iterdir()) == []
