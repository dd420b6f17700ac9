# Runs *inside* the WebAssembly interpreter, never on the host.
#
# A tiny REPL: it reads one JSON request per line from stdin and answers on fd 1 with lines
# that start with MARK. Everything the user's code prints is captured into a bounded buffer per
# cell. User code shares this interpreter, so it *can* write MARK lines or read the request id:
# the host treats every line as hostile, validates every field, and bounds every wait, so a
# forged line can only lie about its own cell's result. Tool calls cross to the host the same
# way: a request line out, one reply line in (matched by a sequence number).
import ast
import io
import json
import os
import sys
import time
import traceback

MARK = "\x1eATTAR "
# The protocol's own handles, taken before user code runs: replacing os.write, os._exit or
# sys.stdin later changes nothing here.
_read_line = sys.stdin.buffer.readline
_write, _exit, _monotonic, _sleep = os.write, os._exit, time.monotonic, time.sleep
_loads, _dumps = json.loads, json.dumps


_pending = []  # requests that arrived while a tool call waited for its reply


def _request():
    """The next request: one queued while a tool call waited, else the next line."""
    return _pending.pop(0) if _pending else _read_message()


def _read_message():
    """A JSON object on one line. Anything else (a wake-up newline from the host, garbage) is
    skipped; end of input ends the interpreter."""
    while True:
        line = _read_line()
        if not line:
            _exit(0)
        try:
            msg = _loads(line)
        except Exception:
            continue
        if isinstance(msg, dict):
            return msg


def _send(msg):
    # The leading newline ends any partial line user code left on fd 1, so the host always sees
    # MARK at the start of a line.
    data = ("\n" + MARK + _dumps(msg, default=repr) + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[_write(1, data):]


os.environ.clear()
# User code sees an empty stdin: input() raises EOFError instead of eating protocol lines.
sys.stdin = io.StringIO("")


def _sliced_sleep(seconds):
    # time.sleep blocks inside the host's WASI call, where the time limit cannot reach it;
    # short slices hand control back to wasm code, where it can.
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    end = _monotonic() + seconds
    while True:
        left = end - _monotonic()
        if left <= 0:
            return
        _sleep(min(left, 0.05))


time.sleep = _sliced_sleep


def _slice_select():
    import select

    whole = select.select

    def sliced(rlist, wlist, xlist, timeout=None):
        end = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            step = 0.05 if end is None else max(0.0, min(0.05, end - _monotonic()))
            ready = whole(rlist, wlist, xlist, step)
            if any(ready) or (end is not None and _monotonic() >= end):
                return ready

    select.select = sliced


_slice_select()


def _no_network(*args, **kwargs):
    raise OSError("the sandbox has no network access")


def _close_the_network():
    # There are no sockets in WASI preview 1 anyway; this turns the raw AttributeError or
    # "Not supported" a user would meet into an error that says why.
    import socket

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "create_connection",
                 "create_server", "socketpair", "fromfd", "getfqdn"):
        setattr(socket, name, _no_network)

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_network()

    socket.socket = socket.SocketType = NoSocket


_close_the_network()


def _toolbox():
    # The host's packages (runtime/toolbox.py), read-only at their mount point; the modules the
    # sandbox lacks fail with a message that names what to use instead.
    toolbox = _loads(sys.argv[1])
    if toolbox["path"]:
        sys.path.append(toolbox["path"])  # after the standard library: its imports never look here
    unavailable = toolbox["unavailable"]

    class Unavailable:  # a meta path finder (importlib.abc would cost the cold start its import)
        def find_spec(self, name, path=None, target=None):
            message = unavailable.get(name.partition(".")[0])
            if message:
                raise ModuleNotFoundError(message, name=name)
            return None

    sys.meta_path.insert(0, Unavailable())


_toolbox()

# Everything above runs while a pooled interpreter waits to be used; from here on, a session's.
# A pooled interpreter is first asked to import the toolbox (seconds), so a session never waits.
_config = _request()
if isinstance(_config.get("warm"), str):
    try:
        exec(_config["warm"], {"__name__": "__warm__"})
        _send({"type": "warmed"})
    except BaseException as exc:
        _send({"type": "warmed", "error": f"{type(exc).__name__}: {exc}"})
    _config = _request()
if _config.get("exit"):
    _exit(0)
sys.setrecursionlimit(_config["recursion_limit"])


class OutputLimit(Exception):
    pass


class _FinalAnswer(BaseException):
    # BaseException so that a bare `except Exception` in user code cannot swallow it.
    pass


class _Capture(io.StringIO):
    def __init__(self, limit):
        super().__init__()
        self.limit, self.size = limit, 0

    def write(self, s):
        self.size += len(s)
        if self.size > self.limit:
            raise OutputLimit(f"output limit of {self.limit} characters exceeded")
        return super().write(s)


_seq = 0


def _call_tool(name, args, kwargs):
    global _seq
    _seq += 1
    _send({"type": "tool", "seq": _seq, "name": name, "args": list(args), "kwargs": kwargs})
    while True:
        reply = _read_message()
        if reply.get("seq") == _seq:
            break
        if "code" in reply:  # the host's next request, already queued behind this cell
            _pending.append(reply)
    if "error" in reply:
        raise RuntimeError(f"{name} failed: {reply['error']}")
    return reply.get("value")


def _exact(value):
    # A final answer crosses as JSON: exact numbers go in the form a reader (or a scorer) takes,
    # "28/99" or LaTeX, never a repr like "Fraction(28, 99)".
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _exact(v) for k, v in value.items()}
    if type(value).__module__.partition(".")[0] == "sympy":
        return int(value) if getattr(value, "is_Integer", False) else sys.modules["sympy"].latex(value)
    return str(value)  # Fraction -> "28/99", Decimal, mpf, anything else: its text


def _make_tool(name):
    def tool(*args, **kwargs):
        if name == "final_answer":
            args, kwargs = [_exact(a) for a in args], {k: _exact(v) for k, v in kwargs.items()}
        value = _call_tool(name, args, kwargs)
        if name == "final_answer":
            raise _FinalAnswer()
        return value

    tool.__name__ = name
    return tool


namespace = {"__name__": "__main__", "__builtins__": __builtins__}
for _name in _config["tools"]:
    namespace[_name] = _make_tool(_name)


def _format_error(exc):
    # Drop this driver's own frames (around the cell, and below it where the cell called into
    # the driver: a tool, an unavailable import): the model should only see its code's lines.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
    frame = tb
    while frame is not None and frame.tb_next is not None:
        if frame.tb_next.tb_frame.f_code.co_filename == "<string>":
            frame.tb_next = None
        frame = frame.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return "".join(lines).rstrip()


def run_cell(code, output_limit):
    out = _Capture(output_limit)
    result = {"type": "result", "output": None, "error": None, "final": False}
    sys.stdout = sys.stderr = out
    try:
        tree = ast.parse(code, "<cell>")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), namespace)
            if value is not None:
                result["output"] = repr(value)[:output_limit]
    except _FinalAnswer:
        result["final"] = True
    except SyntaxError as exc:
        result["error"] = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    except BaseException as exc:  # the user's code may raise anything, SystemExit included
        try:
            result["error"] = _format_error(exc)
        except BaseException:
            result["error"] = f"{type(exc).__name__} (its traceback could not be formatted)"
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    result["stdout"] = out.getvalue()[:output_limit]
    return result


_send({"type": "ready"})
while True:
    request = _request()
    if request.get("exit"):
        _exit(0)  # not a normal exit: atexit handlers registered by user code never run
    if not isinstance(request.get("code"), str):  # a stray tool reply, answering a forged request
        continue
    if request["code"] == "":  # the host's probe: am I back in this loop?
        _send({"type": "result", "id": request.get("id"), "stdout": "", "output": None, "error": None, "final": False})
        continue
    _send({**run_cell(request["code"], _config["output_limit"]), "id": request.get("id")})
