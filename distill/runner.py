"""One resumable runner for every per-question job: evaluation, teacher and oracle trajectories.

Questions not yet in the log run `concurrency` at a time, each in its own thread: on attar's
engine their model calls decode in one batch, and one agent's sandbox and tools run while the
others decode. Each record is appended (and fsync'd) the moment it is done, so a killed run
resumes where it stopped; a question that raised is retried by the next run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar

from attar.distill.data import JsonlLog

Item = TypeVar("Item")


def run_questions(items: Sequence[Item], key: Callable[[Item], str], work: Callable[[Item], dict],
                  log_path: str | os.PathLike, concurrency: int = 1, desc: str = "questions",
                  progress: bool = True, stop: Callable[[], None] = lambda: None) -> tuple[list[dict], list[str]]:
    """`work(item)` for every item whose key is not yet logged; the records of all items logged
    so far, in item order, and one line per failure. Interrupted (Ctrl-C, SIGTERM), it calls
    `stop()`, which must make the work in flight return soon (`Backend.close`), and waits for it:
    that work is not logged, and a rerun does it again."""
    from tqdm import tqdm

    log = JsonlLog(log_path)
    todo = [item for item in items if key(item) not in log]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="q", desc=desc, disable=not progress)
    failures: list[str] = []
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="attar-question")
    try:
        futures = {pool.submit(work, item): item for item in todo}
        for future in as_completed(futures):
            try:
                log.append(future.result())
            except Exception as exc:  # one bad question must not stop the run
                failures.append(f"{key(futures[future])}: {type(exc).__name__}: {str(exc)[:200]}")
            bar.update(1)
    except BaseException:
        stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: questions not started never start
        bar.close()
        log.close()
    return [log.records[key(item)] for item in items if key(item) in log.records], failures
