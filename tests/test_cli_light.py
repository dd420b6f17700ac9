"""The runtime CLI must never pull in a training library."""

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "peft", "trl", "optimum"]

PROBE = """
import json, sys
from click.testing import CliRunner
from attar.runtime.cli import main
runner = CliRunner()
outs = [runner.invoke(main, args) for args in ({args})]
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print(json.dumps({{"codes": [o.exit_code for o in outs], "heavy": heavy, "help": outs[0].output}}))
"""


def run_probe(*arg_lists):
    code = PROBE.format(args=", ".join(repr(list(a)) for a in arg_lists) + ",", heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_sandbox_import_no_training_library():
    result = run_probe(["--help"], ["sandbox", "exec", "-c", "print(1)"], ["export", "--help"], ["distill", "--help"],
                       ["demo", "--help"], ["chat", "--help"], ["index", "--help"])
    assert result["codes"] == [0] * 7
    assert result["heavy"] == []
    assert "export" in result["help"] and "sandbox" in result["help"]


def test_runtime_install_resolves_without_training_libraries(tmp_path):
    """`pip install attar` (no extras) must not pull torch & co., not even transitively."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-genai" in names and "wasmtime" in names and "usearch" in names
    assert not names & {"torch", "transformers", "peft", "trl", "optimum", "optimum-onnx"}


def test_commands_that_load_a_model_rerun_with_huge_pages_asked_of_malloc():
    # `attar chat`, `serve` and `distill` start again with glibc's malloc asking for transparent
    # huge pages (the weights a decode step streams); ATTAR_HUGE_PAGES=0 keeps 4 KiB pages.
    import os
    import platform
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if platform.libc_ver()[0] != "glibc" or not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("needs Linux with glibc and transparent huge pages")
    code = ("import os; from attar.runtime import cli; cli._rerun_with_huge_pages(); b = bytearray(64 << 20); "
            "print(os.environ.get('GLIBC_TUNABLES', '-'), next(int(line.split()[1]) for line in "
            "open('/proc/self/smaps_rollup') if line.startswith('AnonHugePages')))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ATTAR_HUGE_PAGES")}
    tunables, huge = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout.split()
    assert tunables == "glibc.malloc.hugetlb=1" and int(huge) >= 32 << 10  # kB of the 64 MiB in huge pages
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "ATTAR_HUGE_PAGES": "0"}).stdout.split()
    assert off == ["-", "0"]
