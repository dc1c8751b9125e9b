"""Serving benchmark (issue 16): ``transferkit serve`` against calling the model in-process, on this machine.

Two models, trained here once and cached: an EfficientNet-Lite0 linear probe at 112 px (Fashion-MNIST, 20 labels
per class) and a MiniLM linear probe (tweets, 20 labels per class). For each:

1. throughput with 16 concurrent clients (one item per request, closed loop) against ``load(run).predict_proba``
   in-process on batches of 16 (the same inputs, read from the same files; the same torch thread count on both
   sides); the load generator (aiohttp) runs in its own process and its CPU share is reported;
2. p50 / p95 / p99 latency at 1 and 16 clients, with dynamic batching on (``--max-batch 16``) and off
   (``--max-batch 1``);
3. a load test on the MiniLM server: 10,000 requests from 16 clients over ``/predict``, ``/v2/.../infer`` and
   ``/v1/embeddings``, 10% of them malformed (wrong content type, broken JSON, empty text list, unknown model,
   oversized text, truncated image): counts of 5xx and of dropped connections, and the server's resident memory
   after the first 1,000 and after all requests;
4. the ``openai`` client pointed at the server: cosine of its embeddings to transferkit's own MiniLM encoder;
5. a KServe V2 request built by hand (base64 PNG in a BYTES tensor): same class as ``transferkit predict``.

    nice -n 5 .venv/bin/python -m bench.bench_serve [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "serve"
RESULTS = ROOT / "results"
CLIENTS = 16
TARGET_RATIO = 0.7


# --- set-up -------------------------------------------------------------------------------------------------------


def train_runs(cache: Path) -> dict[str, Path]:
    """The two served models (trained once; the run folders are reused)."""
    import transferkit
    from transferkit.rundir import is_output

    runs = {"image": cache / "runs" / "fm-lite0-112", "text": cache / "runs" / "tweets-minilm"}
    if not is_output(runs["image"], "run"):
        transferkit.fit("fashion-mnist", backbone="efficientnet_lite0", image_size=112, strategy="linear-probe",
                        limit_per_class=20, test_limit=200, out=str(runs["image"]), progress=False, overwrite=True)
    if not is_output(runs["text"], "run"):
        transferkit.fit("tweets", strategy="linear-probe", limit_per_class=20, test_limit=200,
                        out=str(runs["text"]), progress=False, overwrite=True)
    return runs


def sample_inputs(cache: Path, n: int) -> tuple[list[Path], list[str]]:
    """``n`` Fashion-MNIST test images as PNG files and ``n`` tweets (not among the training examples' draw)."""
    from PIL import Image

    from transferkit.data.builtin import builtin_arrays, load_builtin

    folder = cache / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images, _, _, test_index = builtin_arrays("fashion-mnist")
    paths = []
    for i, index in enumerate(test_index[-n:]):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            Image.fromarray(images[index]).save(path)
        paths.append(path)
    tweets = load_builtin("tweets")
    data = getattr(tweets, "data", tweets)
    items = data.items
    texts = [str(items[i]) for i in range(len(items) - n, len(items))]
    return paths, texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``transferkit serve`` in a subprocess."""

    def __init__(self, run: Path, threads: int, max_batch: int, max_wait_ms: float = 5.0) -> None:
        self.port = free_port()
        self.name = run.name
        command = [sys.executable, "-m", "transferkit", "-q", "serve", "--model", str(run), "--port", str(self.port),
                   "--threads", str(threads), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post_json(self, path: str, document: Any) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, json.dumps(document).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)


# --- measurements ---------------------------------------------------------------------------------------------------


def in_process_throughput(run: Path, items: list[Any], threads: int, batch: int, rounds: int) -> float:
    """Items per second of ``load(run).predict_proba`` on batches of ``batch`` items (after one warm-up batch)."""
    import torch

    import transferkit

    torch.set_num_threads(threads)
    model = transferkit.load(run)
    model.predict_proba(items[:batch], batch_size=batch)
    started = time.perf_counter()
    done = 0
    for r in range(rounds):
        start = (r * batch) % (len(items) - batch + 1)
        model.predict_proba(items[start:start + batch], batch_size=batch)
        done += batch
    return done / (time.perf_counter() - started)


def load_generator(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop clients (aiohttp) in their own process: ``spec["clients"]`` workers send ``spec["total"]``
    requests; a share ``spec["malformed"]`` of them is malformed. Returns latencies, statuses, dropped connections,
    this process's CPU time and (when asked) the server's resident memory at ``spec["rss_at"]`` requests."""
    return asyncio.run(_generate(spec))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _requests(spec: dict[str, Any]) -> tuple[list[tuple[str, str, Any, bool]], list[tuple[str, str, Any, bool]]]:
    """(valid, malformed) lists of (path, kind, payload, malformed) templates that the clients cycle through."""
    name = spec["name"]
    if spec["modality"] == "image":
        blobs = [Path(p).read_bytes() for p in spec["images"]]
        valid = [("/predict", "upload", blob, False) for blob in blobs]
        if spec.get("mixed"):
            valid += [(f"/v2/models/{name}/infer", "json", {"inputs": [{"name": "input", "shape": [1],
                                                                         "datatype": "BYTES",
                                                                         "data": [base64.b64encode(b).decode()]}]},
                       False) for b in blobs]
        bad = [("/predict", "upload", blobs[0][: len(blobs[0]) // 2], True),
               ("/predict", "raw", b"not multipart", True),
               ("/v2/models/nope/infer", "json", {"inputs": []}, True),
               (f"/v2/models/{name}/infer", "rawjson", b"{broken", True)]
    else:
        texts = spec["texts"]
        valid = [("/predict", "json", {"texts": [t]}, False) for t in texts]
        if spec.get("mixed"):
            valid += [(f"/v2/models/{name}/infer", "json", {"inputs": [{"name": "input", "shape": [1],
                                                                         "datatype": "BYTES", "data": [t]}]}, False)
                      for t in texts]
            valid += [("/v1/embeddings", "json", {"model": name, "input": [t]}, False) for t in texts]
        bad = [("/predict", "raw", b"cat", True), ("/predict", "json", {"texts": []}, True),
               ("/v2/models/nope/infer", "json", {"inputs": []}, True),
               (f"/v2/models/{name}/infer", "rawjson", b"{broken", True),
               ("/predict", "json", {"texts": ["x" * 50_000]}, True),
               ("/v1/embeddings", "json", {"input": []}, True)]
    return valid, bad


async def _generate(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    valid, bad = _requests(spec)
    base = f"http://127.0.0.1:{spec['port']}"
    total, malformed_every = spec["total"], (round(1 / spec["malformed"]) if spec.get("malformed") else 0)
    counter = {"next": 0, "done": 0}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    wrong: list[str] = []  # valid requests answered with a non-200, or malformed ones with a non-4xx
    dropped: list[str] = []
    rss: dict[str, float] = {}
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)

    async def send(session, path: str, kind: str, payload: Any) -> tuple[int, bytes]:
        if kind == "upload":
            form = aiohttp.FormData()
            form.add_field("file", payload, filename="item.png", content_type="image/png")
            async with session.post(base + path, data=form) as response:
                return response.status, await response.read()
        if kind == "json":
            async with session.post(base + path, json=payload) as response:
                return response.status, await response.read()
        content_type = "application/json" if kind == "rawjson" else "text/plain"
        async with session.post(base + path, data=payload, headers={"Content-Type": content_type}) as response:
            return response.status, await response.read()

    async def client(session) -> None:
        while counter["next"] < total:
            i = counter["next"]
            counter["next"] += 1
            is_bad = malformed_every and i % malformed_every == malformed_every - 1
            path, kind, payload, malformed = (bad[(i // malformed_every) % len(bad)] if is_bad
                                              else valid[i % len(valid)])
            started = time.perf_counter()
            try:
                status, _ = await send(session, path, kind, payload)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                dropped.append(f"{path}: {exc.__class__.__name__}")
                continue
            elapsed = time.perf_counter() - started
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if malformed:
                if not 400 <= status < 500:
                    wrong.append(f"malformed {path} -> {status}")
            else:
                latencies.append(elapsed)
                if status != 200:
                    wrong.append(f"{path} -> {status}")
            counter["done"] += 1
            if spec.get("rss_pid") and counter["done"] == spec.get("rss_at"):
                rss["first"] = _rss_mb(spec["rss_pid"])

    connector = aiohttp.TCPConnector(limit=spec["clients"])
    timeout = aiohttp.ClientTimeout(total=120)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(spec["clients"])))
    wall = time.perf_counter() - started
    if spec.get("rss_pid"):
        rss["last"] = _rss_mb(spec["rss_pid"])
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    lat = np.asarray(latencies) * 1000
    return {"requests": counter["done"], "valid": len(latencies), "wall": wall,
            "throughput": len(latencies) / wall, "statuses": statuses, "wrong": wrong[:10], "n_wrong": len(wrong),
            "dropped": dropped[:10], "n_dropped": len(dropped), "cpu_seconds": cpu,
            "cpu_share": cpu / wall / (os.cpu_count() or 1),
            **({f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} if len(lat) else {}), "rss_mb": rss}


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(load_generator, spec).result()


# --- the benchmark --------------------------------------------------------------------------------------------------


def measure_model(modality: str, run: Path, paths: list[Path], texts: list[str], threads: int,
                  requests16: int, requests1: int, rounds: int) -> dict[str, Any]:
    items: list[Any] = [str(p) for p in paths] if modality == "image" else texts
    spec = {"modality": modality, "images": [str(p) for p in paths], "texts": texts, "name": run.name}
    result: dict[str, Any] = {"in_process": in_process_throughput(run, items, threads, CLIENTS, rounds)}
    for label, max_batch in (("batching on", CLIENTS), ("batching off", 1)):
        server = Server(run, threads, max_batch)
        try:
            run_load({**spec, "port": server.port, "clients": 4, "total": 32})  # warm-up
            result[label] = {
                "16": run_load({**spec, "port": server.port, "clients": CLIENTS, "total": requests16}),
                "1": run_load({**spec, "port": server.port, "clients": 1, "total": requests1}),
            }
        finally:
            code = server.stop()
        result[label]["exit"] = code
    return result


def text_server_checks(run: Path, texts: list[str], threads: int, total: int) -> dict[str, Any]:
    """The load test (10% malformed) and the OpenAI client's embeddings against transferkit's own encoder."""
    server = Server(run, threads, CLIENTS)
    try:
        load = run_load({"modality": "text", "texts": texts, "name": run.name, "port": server.port,
                         "clients": CLIENTS, "total": total, "malformed": 0.1, "mixed": True,
                         "rss_pid": server.process.pid, "rss_at": total // 10})
        from openai import OpenAI

        from transferkit.backbones import create_backbone

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        response = client.embeddings.create(model=server.name, input=texts[:32])
        served = np.array([d.embedding for d in response.data])
        own = create_backbone("minilm").encode(texts[:32])
        cosines = (served * own).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(own, axis=1)
    finally:
        code = server.stop()
    return {"load": load, "min_cosine": float(cosines.min()), "n_embeddings": len(cosines), "exit": code}


def image_server_checks(run: Path, paths: list[Path], threads: int) -> dict[str, Any]:
    """A KServe V2 request built by hand per image: its class against ``transferkit predict``."""
    import transferkit

    expected = [r["prediction"] for r in transferkit.predict(run, [str(p) for p in paths])]
    server = Server(run, threads, CLIENTS)
    try:
        v2 = []
        for path in paths:
            answer = server.post_json(f"/v2/models/{server.name}/infer", {"inputs": [
                {"name": "input", "shape": [1], "datatype": "BYTES",
                 "data": [base64.b64encode(path.read_bytes()).decode()]}]})
            v2.append(next(o for o in answer["outputs"] if o["name"] == "label")["data"][0])
    finally:
        code = server.stop()
    return {"same": sum(a == b for a, b in zip(v2, expected)), "n": len(paths), "exit": code}


def report(measured: dict[str, Any], text_checks: dict[str, Any] | None, image_checks: dict[str, Any] | None,
           threads: int, load_total: int, n_images: int) -> list[str]:
    loads = "; ".join(f"{name}: {r['load_average'][0]:.1f} before, {r['load_average'][1]:.1f} after"
                      for name, r in (*measured.items(), ("load test", text_checks), ("KServe check", image_checks))
                      if r and "load_average" in r)
    lines = ["Served on this 2-core machine, shared with other work while measuring (the timed parts run at normal "
             "priority under `flock /work/wt/bench.lock`, others' jobs niced beside them; 1-minute load average "
             + (loads or f"{os.getloadavg()[0]:.0f} when this report was written") + ": the numbers are noisy); "
             "the load generator (aiohttp, closed loop, one item per request) runs in its own "
             f"process on the same cores. Torch threads: {threads} in the server and in-process. Measured in short "
             "parts: `nice -n 19 python -m bench.bench_serve --train-only` (the two models), then for PART in image, "
             "text, checks-image, checks-text: `flock /work/wt/bench.lock python -m bench.bench_serve --parts PART`; "
             "the report is assembled from the cached parts.", "",
             "| model | in-process predict_proba, batch 16 (items/s) | server, 16 clients, batching on (req/s) | "
             "ratio | server, 16 clients, batching off (req/s) | load generator CPU share |",
             "|---|---|---|---|---|---|"]
    names = {"image": "EfficientNet-Lite0 probe, 112 px", "text": "MiniLM probe"}
    for m, r in measured.items():
        if r is None:
            lines.append(f"| {names[m]} | not measured (run interrupted) | | | | |")
            continue
        on, off = r["batching on"]["16"], r["batching off"]["16"]
        lines.append(f"| {names[m]} | {r['in_process']:.1f} | {on['throughput']:.1f} | "
                     f"**{on['throughput'] / r['in_process']:.2f}x** | {off['throughput']:.1f} | "
                     f"{on['cpu_share']:.1%} of the machine |")
    lines += ["", f"Target: >= {TARGET_RATIO}x of in-process throughput with batching on.", "",
              "Latency (ms) of valid requests:", "",
              "| model | batching | clients | p50 | p95 | p99 | requests | non-200 | dropped |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, r in measured.items():
        for label in ("batching on", "batching off"):
            for clients in (1, 16):
                if r is None:
                    continue
                s = r[label][str(clients)]
                lines.append(f"| {names[m]} | {label.split()[1]} | {clients} | {s['p50']:.1f} | {s['p95']:.1f} | "
                             f"{s['p99']:.1f} | {s['requests']} | {s['n_wrong']} | {s['n_dropped']} |")
    if text_checks is None:
        lines += ["", "Load test and OpenAI-client check: not measured (run interrupted)."]
    else:
        load = text_checks["load"]
        five = sum(v for k, v in load["statuses"].items() if k.startswith("5"))
        growth = load["rss_mb"]["last"] / load["rss_mb"]["first"] - 1
        lines += ["", f"Load test (MiniLM server, {load['requests']:,} requests from {CLIENTS} clients over "
                      "/predict, /v2/models/{name}/infer and /v1/embeddings, 10% malformed):", "",
                  f"- statuses: {json.dumps(dict(sorted(load['statuses'].items())))}; **5xx: {five}**; "
                  f"**dropped connections: {load['n_dropped']}**; answers of the wrong kind: {load['n_wrong']}"
                  + (f" (e.g. {load['wrong'][:3]})" if load["wrong"] else ""),
                  f"- server resident memory: {load['rss_mb']['first']:.0f} MB after {load_total // 10:,} requests, "
                  f"{load['rss_mb']['last']:.0f} MB after {load['requests']:,} (**{growth:+.1%}**; target within "
                  "10%)",
                  f"- throughput {load['throughput']:.1f} valid req/s, p50 {load['p50']:.1f} ms, p99 "
                  f"{load['p99']:.1f} ms; load generator CPU share {load['cpu_share']:.1%}", "",
                  f"OpenAI Python client (`openai` {_version('openai')}) against `/v1/embeddings`, "
                  f"{text_checks['n_embeddings']} tweets: cosine to transferkit's own MiniLM encoder min "
                  f"**{text_checks['min_cosine']:.6f}** (target >= 0.9999)."]
    if image_checks is None:
        lines += ["", "Hand-built KServe V2 check: not measured (run interrupted)."]
    else:
        lines += ["", f"KServe V2 request built by hand (base64 PNG in a BYTES tensor), {n_images} Fashion-MNIST "
                      f"test images: **{image_checks['same']}/{image_checks['n']}** give the class of "
                      "`transferkit predict`."]
    exits = sorted({r[label]["exit"] for r in measured.values() if r for label in ("batching on", "batching off")}
                   | {c["exit"] for c in (text_checks, image_checks) if c})
    lines.append(f"Every server was stopped with SIGTERM; exit codes seen: {exits}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced smoke version")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, in-process and in the server (1: on a shared, oversubscribed 2-core "
                             "machine, 2 OpenMP threads spin-wait for each other: a 16-image batch took 16-18 s with "
                             "2 threads and 2.8 s with 1 when this was written)")
    parser.add_argument("--load-requests", type=int, default=10_000, help="requests of the load test")
    parser.add_argument("--report-cached", action="store_true",
                        help="only write the report from the measurements an earlier run cached")
    parser.add_argument("--parts", default="image,text,checks-text,checks-image",
                        help="measure only these parts (comma-separated; the others are reported from the cache), "
                             "so each timed run stays short: image, text, checks-text, checks-image")
    parser.add_argument("--train-only", action="store_true",
                        help="only train the two served models (run this under nice before the timed parts)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")
    started = time.perf_counter()
    cache = CACHE / ("quick" if args.quick else "")
    requests16, requests1, rounds = (96, 24, 6) if args.quick else (240, 48, 15)
    load_total = 1_000 if args.quick else args.load_requests
    runs = train_runs(CACHE)
    paths, texts = sample_inputs(cache, 64)
    if args.train_only:
        return
    parts = set(args.parts.split(","))

    def measure(name: str, part: str, compute):
        """A cached measurement; with --report-cached (or outside --parts) only what an earlier run stored. Each
        records the 1-minute load average before and after it."""
        path = cache / f"{name}.json"
        if args.report_cached or part not in parts:
            return json.loads(path.read_text()) if path.is_file() else None

        def timed():
            before = os.getloadavg()[0]
            result = compute()
            return {**result, "load_average": [before, os.getloadavg()[0]]}

        return cached(cache, name, timed)

    measured = {m: measure(f"measured-{m}-t{args.threads}", m, lambda m=m: measure_model(
        m, runs[m], paths, texts, args.threads, requests16, requests1, rounds)) for m in ("image", "text")}
    text_checks = measure(f"checks-text-t{args.threads}-{load_total}", "checks-text",
                          lambda: text_server_checks(runs["text"], texts, args.threads, load_total))
    image_checks = measure(f"checks-image-t{args.threads}", "checks-image",
                           lambda: image_server_checks(runs["image"], paths, args.threads))
    lines = report(measured, text_checks, image_checks, args.threads, load_total, len(paths))
    target = RESULTS / ("quick" if args.quick else "") / "serve.md"
    write_section(target, "Serving: transferkit serve", bench_command("bench.bench_serve", argv), started,
                  "\n".join(lines))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
