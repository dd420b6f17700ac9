"""The WebAssembly sandbox: a real wasmtime instance of CPython, attacked from the inside."""

import os
import subprocess
import sys
import time

import pytest

from attar.runtime.executor import Limits
from attar.runtime.sandbox import Sandbox

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


# -- the toolbox: sympy and mpmath, read-only ------------------------------------------------

TOOLBOX = Limits(timeout_s=8.0, memory_mb=96, output_chars=4_000)  # no other test keeps these warm


def warm_pool(limits: Limits, n: int = 1) -> None:
    """Keep n spares and wait (bounded) until one has imported the toolbox in the background."""
    from attar.runtime.sandbox import _pool

    Sandbox.keep_warm(n, limits)
    deadline = time.monotonic() + 60
    while not _pool.has_warm(limits):
        assert time.monotonic() < deadline, "no spare imported the toolbox within 60 s"
        time.sleep(0.1)


@pytest.fixture
def tb():
    warm_pool(TOOLBOX)  # a new session takes a spare with sympy imported
    with Sandbox(limits=TOOLBOX) as sandbox:
        yield sandbox


def test_sympy_solves_and_final_answers_are_exact(tb):
    sb = tb
    assert sb.run("import sympy\nx = sympy.Symbol('x')\nsympy.solve(x**2 - 2, x)").output == "[-sqrt(2), sqrt(2)]"
    for code, expected in [("sympy.Rational(1, 3)", "\\frac{1}{3}"), ("sympy.sqrt(2) / 2", "\\frac{\\sqrt{2}}{2}"),
                           ("sympy.Integer(7)", 7), ("__import__('fractions').Fraction(28, 99)", "28/99"),
                           ("[sympy.Rational(1, 2), 3]", ["\\frac{1}{2}", 3])]:
        r = sb.run(f"final_answer({code})")
        assert r.is_final and r.final_answer == expected, code


def test_the_toolbox_is_read_only_and_the_same_after_attacks(tb):
    sb = tb
    from attar.runtime import sandbox, toolbox

    before = toolbox._fingerprint(sandbox._library())
    attacks = ["open('/lib/sympy/__init__.py', 'a').write('x')", "open('/lib/evil.py', 'w')",
               "import os; os.mkdir('/lib/new')", "import os; os.remove('/lib/ctypes/__init__.py')",
               "import os; os.rename('/lib/sympy', '/lib/sympy2')", "import os; os.symlink('/lib', '/lib/loop')",
               "import os; os.utime('/lib/sympy/__init__.py', (0, 0))", "open('/etc/passwd')"]
    for code in attacks:
        r = sb.run(code)
        assert not r.ok and ("Error" in r.error), code
    sb.run("import os; os.chmod('/lib/sympy/__init__.py', 0o777)")  # WASI has no chmod: a no-op
    assert toolbox._fingerprint(sandbox._library()) == before
    assert (sandbox._library() / "sympy" / "__init__.py").stat().st_mode & 0o777 != 0o777
    assert sb.run("import sympy; sympy.Integer(2) + 2").output == "4"


def test_missing_packages_say_what_to_use_instead(sb):
    for name in ("numpy", "numpy.linalg", "scipy.optimize"):
        r = sb.run(f"import {name}")
        assert r.error.endswith(f"ModuleNotFoundError: {name.split('.')[0]} is not available in this sandbox; "
                                "use sympy or plain Python")
        assert "<string>" not in r.error
    assert "ctypes is not available" in sb.run("import ctypes\nctypes.CDLL(None)").error


def test_a_changed_package_is_refused(tmp_path, monkeypatch):
    import shutil

    from attar.runtime import toolbox

    fake = tmp_path / "src" / "mpmath"
    shutil.copytree(toolbox._source("mpmath"), fake, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    (fake / "__init__.py").write_text((fake / "__init__.py").read_text() + "\nimport os\n")
    monkeypatch.setenv("ATTAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toolbox, "_ready", None)
    real = toolbox._source
    monkeypatch.setattr(toolbox, "_source", lambda name: fake if name == "mpmath" else real(name))
    with pytest.raises(toolbox.ToolboxError, match="is not mpmath 1.3.0 as released"):
        toolbox.library(lambda folder: None)
    assert not any((tmp_path / "cache" / "sandbox").glob("lib-*"))  # nothing half-made is left


def test_new_sessions_get_the_toolbox_imported_and_forks_keep_it():
    warm_pool(TOOLBOX, 2)
    with Sandbox(limits=TOOLBOX) as sb:
        assert sb._interp.warmed
        plain = sb.fork()  # nothing used sympy yet: a cold spare will do
        assert sb.run("import sympy\nr = sympy.nsimplify(0.125)").ok
        fork = sb.fork()  # its replay imports sympy: it gets (or makes) a warmed interpreter
        assert fork.run("r").output == "1/8" and fork._interp.warmed and not fork.run("").restarted
        assert not plain._interp.warmed
        plain.close()
        fork.close()


def test_a_cell_that_ends_its_interpreter_is_not_replayed(sb):
    assert sb.run("x = 5").ok
    # Reads the host's next request into its buffer (so it is answered), then closes its input:
    # the interpreter ends after the cell, not during it.
    r = sb.run("import sys, time, os\ntime.sleep(0.3)\nsys.__stdin__.buffer.peek()\nos.close(0)")
    nxt = sb.run("x")
    if r.restarted:  # this platform ended it during the cell: restored without it either way
        assert nxt.output == "5"
    else:
        assert nxt.output == "5" and nxt.restarted and not nxt.reset and "before the last cell" in nxt.stdout
