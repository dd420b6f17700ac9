"""The host side under attack, by class: limits that must fire wherever the guest blocks, a
protocol the guest can write to, cells that try to break the session for good, resources, replay
fidelity, and trust in the files the sandbox loads. For every attack: the cell returns within its
limit + 5 s, `run()` does not raise, and the next cell in the same session runs."""

import gc
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from attar.runtime.executor import Limits
from attar.runtime.sandbox import Sandbox

LIMITS = Limits(timeout_s=2.0, memory_mb=64)
FORGE = "import __main__, os, json\ndef forge(msg):\n    os.write(1, ('\\x1eATTAR ' + json.dumps(msg) + '\\n').encode())\n"


def survives(sb: Sandbox, code: str, keep_state: bool = True):
    """Run an attack; check the bound, the session afterwards, and return the attack's result."""
    sb.run("canary = 41")
    began = time.monotonic()
    result = sb.run(code)
    assert time.monotonic() - began < LIMITS.timeout_s + 5, code
    after = sb.run("canary + 1" if keep_state else "1 + 1")
    assert after.error is None and after.output == ("42" if keep_state else "2"), (code, result, after)
    return result


@pytest.fixture
def sb():
    calls = []

    def lookup(key: str) -> str:
        calls.append(key)
        return f"value of {key}"

    def send_email(to: str) -> str:
        calls.append(("email", to))
        return "sent"

    def big() -> str:
        return "x" * 300_000

    def exits() -> None:
        raise SystemExit(3)

    with Sandbox({"lookup": lookup, "send_email": send_email, "big": big, "exits": exits}, LIMITS) as box:
        box.calls = calls
        yield box


# -- limits that fire wherever the guest blocks ------------------------------------------------

@pytest.mark.parametrize("code", [
    "import time\ntime.sleep(1000)",
    "import os\nos.read(0, 100)",
    "import sys\nsys.__stdin__.buffer.read()",
    "import select\nselect.select([0], [], [], 1000)",
    "import select\nselect.select([], [], [], 1000)",
    "input()",
    "while True:\n    pass",
    "import os\nos.write(1, b'a partial line without its end')\nwhile True:\n    pass",
    "import os\nos.write(2, b'partial on stderr')",
    "import os\nos.write(1, b'partial then done')",
], ids=["sleep", "read-stdin", "stdin-buffer", "select-stdin", "select-timeout", "input", "busy", "partial-busy",
        "partial-stderr", "partial-done"])
def test_blocking_guests_are_bounded(sb, code):
    result = survives(sb, code)
    if "partial" in code and "while" not in code:
        assert result.error is None and "partial" in result.stdout


def test_a_flood_of_forged_tool_requests_cannot_block_the_host(sb):
    # Every forged request makes the host write a 300 kB reply the guest never reads.
    code = FORGE + "for i in range(50):\n    forge({'type': 'tool', 'seq': 10**6 + i, 'name': 'big', 'args': [], 'kwargs': {}})\n" \
                   "while True:\n    pass"
    result = survives(sb, code)
    assert result.error and "SandboxError" in result.error


# -- a protocol the guest can write to ---------------------------------------------------------

@pytest.mark.parametrize("payload", [
    "'[' * 100000 + ']' * 100000",
    "json.dumps({'type': 'result', 'id': __main__.request['id'], 'stdout': 5, 'output': {'a': 1}, 'error': ['x'], "
    "'final': 'yes'})",
    "json.dumps({'type': 'tool', 'name': 5, 'args': 'x', 'kwargs': []})",
    "json.dumps({'type': 'tool', 'seq': 'a', 'name': 'final_answer', 'args': [1], 'kwargs': {'no': 1}})",
    "json.dumps({'type': 'tool', 'name': 'lookup', 'args': [[[[[]]]]], 'kwargs': {'1': None}})",
    "json.dumps({'type': 'ready'})",
    "json.dumps([1, 2, 3])",
    "'{\"type\": \"result\", \"id\": ' + str(__main__.request['id']) + ', \"stdout\": \"\\\\ud800\"}'",
], ids=["deep-nesting", "wrong-types", "bad-tool", "bad-final", "odd-args", "ready", "list", "surrogate"])
def test_forged_lines_never_raise_out_of_run(sb, payload):
    code = "import __main__, os, json\nos.write(1, ('\\x1eATTAR ' + " + payload + " + '\\n').encode())\nprint('after')"
    result = survives(sb, code)
    for text in (result.stdout, result.output, result.error):
        assert text is None or isinstance(text, str) and text.encode("utf-8")


def test_a_forged_result_then_a_busy_loop_is_caught_at_once(sb):
    code = FORGE + "forge({'type': 'result', 'id': __main__.request['id'], 'stdout': 'forged'})\nwhile True:\n    pass"
    result = survives(sb, code)
    assert result.restarted and "time limit" in result.error


def test_a_tool_that_raises_system_exit_is_an_observation(sb):
    result = survives(sb, "try:\n    exits()\nexcept RuntimeError as e:\n    print('caught', e)")
    assert "caught exits failed: SystemExit: 3" in result.stdout


# -- cells that try to break the session for good ----------------------------------------------

@pytest.mark.parametrize("code", [
    "import os\nos.close(0)",
    "import os\nos.close(1)",
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "import os, __main__\n__main__._read_line = lambda: b''",
    "import random\nif random.random() < 2:\n    x = [0] * (10**9)",
], ids=["close-stdin", "close-stdout", "sys-exit", "os-exit", "patch-driver", "memory"])
def test_session_breakers_leave_a_working_session(sb, code):
    survives(sb, code, keep_state="patch-driver" not in code and "close" not in code)


def test_a_cell_that_differs_on_replay_resets_instead_of_hanging(sb):
    sb.run("import random\nmode = random.random()")
    sb.run("if mode != __import__('random').random() * 0 + mode:\n    pass")  # same on replay
    sb.run("import os\nif os.urandom(1)[0] % 2 == 0 or True:\n    token = os.urandom(8).hex()")
    sb.run("r = lookup(token)")  # on replay, token differs: the call is not in the record
    calls = len(sb.calls)
    fork = sb.fork()
    try:
        result = fork.run("1 + 1")
        assert len(sb.calls) == calls  # a fork never calls a tool for real
        assert result.reset and "could not be rebuilt" in result.error
        assert fork.run("2 + 2").output == "4"
    finally:
        fork.close()


def test_replay_cost_is_bounded(sb):
    for i in range(4):
        assert sb.run(f"import time\nt0 = time.monotonic()\nwhile time.monotonic() - t0 < 1.8:\n    pass\nv{i} = {i}").ok
    began = time.monotonic()
    result = sb.run("while True:\n    pass")  # killed: the restore would replay 7 s of cells
    assert time.monotonic() - began < LIMITS.timeout_s + 5
    assert result.restarted and result.reset and "reset" in result.error
    assert sb.run("1 + 1").output == "2"


# -- replay fidelity ---------------------------------------------------------------------------

def test_forks_serve_each_recorded_call_its_own_result_and_never_call_tools(sb):
    sb.run("seen = {}\nfor key in {'alpha', 'beta', 'gamma', 'delta', 'epsilon'}:\n    seen[key] = lookup(key)")
    sb.run("send_email('boss@example.com')")
    before = list(sb.calls)
    for _ in range(5):
        fork = sb.fork()
        try:
            result = fork.run("all(v == 'value of ' + k for k, v in seen.items()) and len(seen) == 5")
            assert result.output == "True", result
        finally:
            fork.close()
    assert sb.calls == before  # neither lookup nor send_email ran again


# -- resources ---------------------------------------------------------------------------------

def test_the_output_cap_is_per_cell(sb):
    for _ in range(60):
        assert sb.run("print('y' * 15000)").ok


def test_close_is_bounded_even_with_guest_atexit():
    box = Sandbox(limits=LIMITS)
    box.run("import atexit, time\natexit.register(time.sleep, 35)")
    began = time.monotonic()
    box.close()
    assert time.monotonic() - began < 1.0


def test_close_is_bounded_even_while_the_guest_sleeps():
    box = Sandbox(limits=Limits(timeout_s=30, memory_mb=64))
    worker = threading.Thread(target=box.run, args=("import select\nselect.select([], [], [], 60)",), daemon=True)
    worker.start()
    time.sleep(0.5)
    began = time.monotonic()
    box.close()
    assert time.monotonic() - began < 1.5


def test_dropped_sandboxes_are_reclaimed():
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    # Limits no other test keeps warm: the pool's spares for those would boot threads meanwhile.
    limits = Limits(timeout_s=2.25, memory_mb=64)
    Sandbox(limits=limits).close()  # warm up the module cache and its file handles
    gc.collect()
    threads, open_fds = threading.active_count(), fds()
    for _ in range(5):
        box = Sandbox(limits=limits)
        box.run("x = 1")
        del box
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (threading.active_count() > threads or fds() > open_fds):
        time.sleep(0.1)
    assert threading.active_count() <= threads and fds() <= open_fds


def test_running_out_of_fds_leaves_nothing_in_tmp(tmp_path):
    code = """
import os, resource, sys
from attar.runtime.executor import Limits
from attar.runtime.sandbox import Sandbox
Sandbox(limits=Limits(timeout_s=2, memory_mb=64)).close()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) + 3, hard))
try:
    Sandbox(limits=Limits(timeout_s=2, memory_mb=64))
except Exception as exc:
    print('refused', type(exc).__name__)
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "refused" in proc.stdout, proc.stderr[-2000:]
    assert not list(tmp_path.glob("attar-sbx-*"))


def test_lone_surrogates_are_printable(tmp_path):
    with Sandbox(limits=LIMITS) as box:
        result = box.run("print('\\ud800 ok')\nfinal_answer('\\udfff')")
        assert result.stdout.encode("utf-8") and result.final_answer.encode("utf-8")
    proc = subprocess.run([sys.executable, "-m", "attar.runtime.cli", "sandbox", "exec", "-c", "print('\\ud800')"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_network_use_says_there_is_no_network(sb):
    for code in ("import socket\nsocket.create_connection(('example.com', 80))",
                 "import urllib.request\nurllib.request.urlopen('http://example.com')",
                 "import socket\nsocket.socket()"):
        result = sb.run(code)
        assert "the sandbox has no network access" in result.error, result.error


# -- trust in files ----------------------------------------------------------------------------

def test_a_tampered_compiled_module_is_rebuilt(tmp_path):
    code = """
import json, pathlib
from attar.runtime import sandbox
from attar.runtime.executor import Limits
from attar.runtime.sandbox import Sandbox
with Sandbox(limits=Limits(timeout_s=5, memory_mb=64)) as sb:
    print(json.dumps([str(sandbox._compiled_module_file()), sb.run('6 * 7').output]))
"""
    env = {**os.environ, "ATTAR_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    path, out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out == "42"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte of native code
    open(path, "wb").write(bytes(data))
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(second.stdout.strip().splitlines()[-1])[1] == "42", second.stderr[-2000:]
    assert open(path, "rb").read() != bytes(data)


def test_the_interpreter_must_match_its_pinned_hash(tmp_path):
    code = """
from attar.runtime import sandbox
sandbox.WASM_SHA256 = '0' * 64
try:
    sandbox.Sandbox()
except sandbox.SandboxError as exc:
    print('refused:', exc)
"""
    env = {**os.environ, "ATTAR_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "does not match the pinned SHA-256" in proc.stdout, proc.stderr[-2000:]
