"""`pip install attar` alone (no torch, no extras) in a fresh virtual environment, then the
runtime user's whole path: build the default model, ask it a question."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_only_install_pulls_and_chats(tmp_path):
    from attar.runtime.fetch import cache_dir
    from attar.runtime.models import CATALOG, DEFAULT_MODEL

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    proc = subprocess.run([*pip, "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = subprocess.run([*pip, "list", "--format", "json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert not names & {"torch", "transformers", "peft", "trl", "optimum"}, names

    cache = tmp_path / "cache"
    # The GGUF download is the same pip call with or without torch; reuse the suite's copy when it
    # has one (it is verified against its pinned SHA-256 either way). The build starts from nothing.
    gguf = cache_dir() / "gguf" / CATALOG[DEFAULT_MODEL].gguf_name
    if gguf.is_file():
        (cache / "gguf").mkdir(parents=True)
        try:
            os.link(gguf, cache / "gguf" / gguf.name)
        except OSError:  # another filesystem
            shutil.copyfile(gguf, cache / "gguf" / gguf.name)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "ATTAR_CACHE": str(cache), "HOME": str(tmp_path)}
    attar = str(venv / "bin" / "attar")
    # attar's kernels' sources ship with the package and build for this CPU (the chat below runs on them).
    kernel = subprocess.run([attar, "kernel", "build"], capture_output=True, text=True, timeout=600, env=env)
    assert kernel.returncode == 0, kernel.stderr[-3000:]
    assert Path(kernel.stdout.strip()).parent == cache / "kernels" and Path(kernel.stdout.strip()).is_file()
    pull = subprocess.run([attar, "pull", "default"], capture_output=True, text=True, timeout=900, env=env)
    assert pull.returncode == 0, pull.stderr[-3000:]
    assert "top-1 next-token agreement" in pull.stdout and "GGUF (numpy" in pull.stdout
    chat = subprocess.run([attar, "chat", "What is 17 * 23?"], capture_output=True, text=True, timeout=600, env=env)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip() == "391"
