"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cached(cache_dir: Path, name: str, compute: Callable[[], Any]) -> Any:
    """Return the JSON-cached result of ``compute`` under ``cache_dir/name.json``, computing it once, so an
    interrupted benchmark resumes with the cells it already finished."""
    path = cache_dir / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def bench_command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run, e.g. ``python -m bench.bench_core --seeds 3``."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python -m {module}" + (" " + " ".join(args)).rstrip()


def write_section(path: Path, heading: str, command: str, started: float, body: str) -> None:
    """Write (and print) a results section: heading, the exact command, machine, this run's wall time, body. The
    file's other ``## `` sections (written by other scripts into the same topic file) are kept, in their order."""
    section = repository_paths(f"## {heading}\n\nCommand: `{command}` ({platform.machine()}, {os.cpu_count()} cores "
                               f"shared; {time.perf_counter() - started:.0f} s this run, cached cells reused)\n\n{body}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = split_sections(path.read_text()) if path.is_file() else {}
    sections[heading] = section.rstrip()
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(sections.values()) + "\n")
    tmp.replace(path)
    print(section)


def repository_paths(text: str) -> str:
    """``text`` with absolute paths into a checkout's ``bench/cache`` shown from the repository root
    (``/home/me/transferkit/bench/cache/x`` -> ``bench/cache/x``): commands that cached cells recorded stay
    reproducible from any checkout and do not show the machine's folders."""
    return re.sub(r"(?<![\w.~-])/[^\s`'\"]*?/(bench/cache/)", r"\1", text)


def note_lines(notes: list[str]) -> str:
    """``--note`` values as markdown list lines: what cached cells cannot say (the conditions they ran under, what an
    earlier session measured). Kept in the command line, so re-rendering a section from its cells keeps them."""
    return "".join(f"- {note}\n" for note in notes)


def split_sections(text: str) -> dict[str, str]:
    """``{heading: section text}`` of the ``## heading`` sections of a results file, in order."""
    sections: dict[str, str] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            sections[heading] = line
        elif heading is not None:
            sections[heading] += "\n" + line
    return {k: v.rstrip() for k, v in sections.items()}


def run_jobs(worker: Callable[[Any], Any], jobs: list[Any], parallel: int = 1) -> list[Any]:
    """``worker`` over ``jobs`` in order, in ``parallel`` spawned processes when > 1 (``worker`` must be a module-level
    function; each job should cache its own result, so an interrupted run resumes)."""
    if parallel > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(worker, jobs))
    return [worker(job) for job in jobs]


def timed_command(command: list[str], lock: str | None = None, log: Path | None = None) -> tuple[Any, float]:
    """Run ``command`` and measure its wall time; with ``lock``, inside ``flock LOCK`` so that only one timed
    benchmark runs on the machine at a time, the wait for the lock not counted. Its standard error goes to ``log``
    as it runs (when given), ending with lines ``wall SECONDS`` and ``cpu SECONDS`` (the CPU time the command got:
    on a shared machine, how much of it the timed run had). Returns (CompletedProcess with stdout and stderr as
    text, wall seconds)."""
    import subprocess
    import tempfile

    timer = [sys.executable, "-c", "import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); print(f'wall {time.perf_counter() - t:.1f}', file=sys.stderr); "
             "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(f'cpu {u.ru_utime + u.ru_stime:.1f}', "
             "file=sys.stderr); sys.exit(r.returncode)", *command]
    if log is None:
        log = Path(tempfile.mkstemp(suffix=".log")[1])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        result = subprocess.run(["flock", lock, *timer] if lock else timer, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
    result.stderr = log.read_text()
    walls = [line for line in result.stderr.splitlines() if line.startswith("wall ")]
    return result, float(walls[-1].split()[1]) if walls else float("nan")
