# Runs *inside* the WebAssembly interpreter, never on the host.
#
# A tiny REPL: it reads one JSON request per line from stdin and answers on fd 1 with lines
# that start with MARK. Everything the user's code prints is captured into a bounded buffer,
# so a protocol line can only come from here (or from code that forges one, which can only
# lie about its own result). Tool calls cross to the host the same way: a request line out,
# one reply line in.
import ast
import io
import json
import os
import sys
import traceback

MARK = "\x1eATTAR "
_stdin = sys.stdin.buffer
_config = json.loads(_stdin.readline())
if _config.get("exit"):
    raise SystemExit(0)
sys.setrecursionlimit(_config["recursion_limit"])
os.environ.clear()


def _send(msg):
    data = (MARK + json.dumps(msg, default=repr) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


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


def _call_tool(name, args, kwargs):
    _send({"type": "tool", "name": name, "args": list(args), "kwargs": kwargs})
    reply = json.loads(_stdin.readline())
    if "error" in reply:
        raise RuntimeError(f"{name} failed: {reply['error']}")
    return reply["value"]


def _make_tool(name):
    def tool(*args, **kwargs):
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
    # Drop this driver's own frames: the model should only see its code's lines.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
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
        result["error"] = _format_error(exc)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    result["stdout"] = out.getvalue()[:output_limit]
    return result


_send({"type": "ready"})
while True:
    line = _stdin.readline()
    if not line:
        break
    request = json.loads(line)
    if request.get("exit"):
        break
    if "code" not in request:  # a stray tool reply, answering a request forged by user code
        continue
    _send({**run_cell(request["code"], _config["output_limit"]), "id": request["id"]})
