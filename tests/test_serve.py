"""``transferkit serve``: the server runs in a subprocess on a free port; every route, bad input and shutdown."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from tests.conftest import ANIMALS, BERT_WORDS, MUSIC, stripes

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")



pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py



def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-images")
    for cls, direction in (("horizontal", "h"), ("vertical", "v")):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(10):
            stripes(direction, i).save(root / "data" / cls / f"{i:02d}.png")
    os.environ["TRANSFERKIT_PROGRESS"] = "0"
    run = transferkit.fit(str(root / "data"), backbone="small_cnn", strategy="finetune", epochs=2, batch_size=8,
                          lr=0.01, out=str(root / "stripes"), progress=False, seed=0)
    return run.path


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-texts")
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(24):
        words, label = (ANIMALS, "animals") if i % 2 == 0 else (MUSIC, "music")
        rows.append(f"{' '.join(rng.choice(words, 4))},{label}")
    (root / "texts.csv").write_text("\n".join(rows) + "\n")
    run = transferkit.fit(str(root / "texts.csv"), backbone=f"hf:{tiny_bert_dir}", strategy="linear-probe",
                          out=str(root / "words"), progress=False, seed=0, max_length=16)
    docs = root / "docs"
    docs.mkdir()
    (docs / "pets.txt").write_text("the cat sat on the mat")
    (docs / "band.txt").write_text("a man plays guitar today")
    from transferkit.memory.index import build_index

    build_index(root / "index", docs=docs, encoder=f"hf:{tiny_bert_dir}")
    (root / "token").write_text("s3cret-token\n")
    return {"run": run.path, "index": root / "index", "token": root / "token"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                headers: dict[str, str] | None = None, token: str | None = None) -> tuple[int, bytes, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = dict(headers or {})
        if content_type:
            sent["Content-Type"] = content_type
        if token or self.token:
            sent["Authorization"] = f"Bearer {token or self.token}"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}

    def json(self, method: str, path: str, document=None, **kwargs) -> tuple[int, dict]:
        body = None if document is None else json.dumps(document).encode()
        status, data, _ = self.request(method, path, body, "application/json" if body else None, **kwargs)
        return status, json.loads(data)

    def upload(self, path: str, files: list[tuple[str, bytes]], field: str = "file") -> tuple[int, dict]:
        boundary = "transferkit-test-boundary"
        parts = []
        for name, data in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, data, _ = self.request("POST", path, body, f"multipart/form-data; boundary={boundary}")
        return status, json.loads(data)


@contextmanager
def running_server(args: list[str]):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", "--port", str(port), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if Client(port).request("GET", "/v2/health/live")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not start")
            time.sleep(0.2)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stop_cleanly(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    return process.stderr.read().decode()


def assert_error(status: int, document: dict, expected: int) -> None:
    assert status == expected, document
    assert list(document) == ["error"] and "\n" not in document["error"] and document["error"]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_image_model_routes_bad_inputs_and_shutdown(image_run, tmp_path):
    files = []
    for i, direction in enumerate("hv"):
        path = tmp_path / f"{direction}{i}.png"
        stripes(direction, 20 + i).save(path)
        files.append(path)
    expected = transferkit.predict(image_run, [str(p) for p in files])

    with running_server(["--model", image_run, "--name", "stripes", "--max-image-pixels", 1_000_000,
                         "--max-body-mb", 2]) as (port, process):
        client = Client(port)
        assert client.json("GET", "/v2") == (200, {"name": "transferkit", "version": transferkit.__version__,
                                                   "extensions": []})
        assert client.json("GET", "/v2/health/live") == (200, {"live": True})
        assert client.json("GET", "/v2/health/ready") == (200, {"ready": True})
        assert client.json("GET", "/v2/models/stripes/ready") == (200, {"name": "stripes", "ready": True})
        status, metadata = client.json("GET", "/v2/models/stripes")
        assert status == 200 and metadata["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
        assert metadata["platform"] == "transferkit_pytorch"
        assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]} in metadata["outputs"]
        assert_error(*client.json("GET", "/v2/models/other"), 404)
        assert_error(*client.json("GET", "/v2/models/other/ready"), 404)
        assert_error(*client.json("POST", "/v2/models/other/infer", {"inputs": []}), 404)

        # /predict: the rows of `transferkit predict --json`, named after the uploaded files
        status, document = client.upload("/predict", [(p.name, p.read_bytes()) for p in files])
        assert status == 200
        rows = document["predictions"]
        assert [r["input"] for r in rows] == [p.name for p in files]
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected]
        for got, want in zip(rows, expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)

        # KServe V2 inference, built by hand from the protocol: base64 image files in a BYTES tensor
        request = {"id": "42", "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES",
                                           "data": [base64.b64encode(p.read_bytes()).decode() for p in files]}]}
        status, answer = client.json("POST", "/v2/models/stripes/infer", request)
        assert status == 200 and answer["model_name"] == "stripes" and answer["id"] == "42"
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["label"]["data"] == [r["prediction"] for r in expected]
        assert outputs["probabilities"]["shape"] == [2, 2]
        classes = list(expected[0]["probabilities"])
        want = [r["probabilities"][c] for r in expected for c in classes]
        assert outputs["probabilities"]["data"] == pytest.approx(want, abs=1e-5)
        status, answer = client.json("POST", "/v2/models/stripes/infer", {**request, "outputs": [{"name": "label"}]})
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["label"]

        # bad inputs: always a 4xx with a one-line JSON error, and the server keeps serving
        good = files[0].read_bytes()
        assert_error(*client.upload("/predict", [("cut.png", good[: len(good) // 2])]), 400)  # truncated
        status, document = client.upload("/predict", [("notes.png", b"not an image at all")])
        assert_error(status, document, 400)
        assert "notes.png" in document["error"] and "object at 0x" not in document["error"]  # no Python repr
        bomb = png_bytes(Image.new("L", (2000, 2000)))  # 4 MP in a few kB: refused before decoding
        assert len(bomb) < 50_000
        status, document = client.upload("/predict", [("bomb.png", bomb)])
        assert_error(status, document, 400)
        assert "limit" in document["error"]
        assert_error(*client.upload("/predict", []), 400)
        assert_error(*client.json("POST", "/predict", {"texts": ["a"]}), 415)  # JSON to an image model
        status, data, _ = client.request("POST", "/predict", b"--x\r\nbroken", "multipart/form-data; boundary=x")
        assert_error(status, json.loads(data), 400)
        status, data, headers = client.request("POST", "/predict", b"\0" * (50 * 2**20), "application/octet-stream")
        assert_error(status, json.loads(data), 413)
        status, data, _ = client.request("POST", "/v2/models/stripes/infer", b"{not json", "application/json")
        assert_error(status, json.loads(data), 400)
        for depth in (2000, 900):  # too deep for the JSON parser / for a recursive walk of the tensor data
            nested = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": "x"}]}
            body = json.dumps(nested).replace('"x"', "[" * depth + '"aGk="' + "]" * depth).encode()
            status, data, _ = client.request("POST", "/v2/models/stripes/infer", body, "application/json")
            assert_error(status, json.loads(data), 400)
        status, data, _ = client.request("POST", "/v2/models/stripes/infer", b"{}", "text/plain")
        assert_error(status, json.loads(data), 415)
        for bad in ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
                    {"inputs": [{"name": "input", "shape": [3], "datatype": "BYTES", "data": ["aGk="]}]},
                    {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
                    {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [7]}]},
                    {"inputs": "nope"}, {"inputs": [{"name": "input", "shape": [0], "datatype": "BYTES",
                                                     "data": []}]},
                    {**request, "outputs": [{"name": "logits"}]}):
            assert_error(*client.json("POST", "/v2/models/stripes/infer", bad), 400)
        assert_error(*client.json("POST", "/v1/embeddings", {"input": ["hi"]}), 400)  # not a text model
        assert_error(*client.json("POST", "/search", {"query": "hi"}), 404)  # no --index
        assert_error(*client.json("GET", "/nowhere"), 404)
        assert_error(*client.json("GET", "/predict"), 405)

        status, text, headers = client.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        text = text.decode()
        assert metric(text, "transferkit_requests_total", route="/predict", status="200") == 1
        assert metric(text, "transferkit_requests_total", route="/predict", status="400") == 5
        assert metric(text, "transferkit_requests_total", route="/predict", status="413") == 1
        assert metric(text, "transferkit_batch_size_sum", kind="predict") == 6  # 3 requests of 2 images
        assert metric(text, "transferkit_request_seconds_count", route="/v2/models/{name}/infer") >= 10
        assert not any(f'status="5{d}' in text for d in "0123456789")  # never a server error
        assert client.json("GET", "/v2/health/live") == (200, {"live": True})
        stop_cleanly(process)


def test_text_model_token_batching_embeddings_and_search(text_run):
    from transferkit.memory.index import VectorIndex, embed

    texts = ["cat dog mat sat", "guitar plays market today", "the dog fell"]
    model = transferkit.load(text_run["run"])
    expected = transferkit.predict(model, texts)
    args = ["--model", text_run["run"], "--index", text_run["index"], "--token-file", text_run["token"],
            "--max-wait-ms", 300, "--max-batch", 16]
    with running_server(args) as (port, process):
        name = Path(text_run["run"]).name
        anonymous, wrong, client = Client(port), Client(port, "wrong"), Client(port, "s3cret-token")
        assert anonymous.json("GET", "/v2/health/ready") == (200, {"ready": True})  # probes stay open
        assert_error(*anonymous.json("GET", "/v2"), 401)
        assert_error(*wrong.json("POST", "/predict", {"texts": texts}), 401)
        assert_error(*wrong.json("GET", "/metrics"), 401)

        status, document = client.json("POST", "/predict", {"texts": texts})
        assert status == 200
        for got, want in zip(document["predictions"], expected):
            assert got["input"] == want["input"] and got["prediction"] == want["prediction"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert_error(*client.json("POST", "/predict", {"texts": []}), 400)
        assert_error(*client.json("POST", "/predict", {"texts": "cat"}), 400)
        assert_error(*client.json("POST", "/predict", {"texts": ["x" * 30_000]}), 413)
        status, data, _ = client.request("POST", "/predict", b"cat dog", "text/plain")
        assert_error(status, json.loads(data), 415)

        request = {"inputs": [{"name": "input", "shape": [3], "datatype": "BYTES", "data": texts}]}
        status, answer = client.json("POST", f"/v2/models/{name}/infer", request)
        assert status == 200 and answer["outputs"][0]["data"] == [r["prediction"] for r in expected]

        # OpenAI embeddings: float and base64 encodings equal the model's own encoder
        own = embed(model.module.backbone, texts)
        status, answer = client.json("POST", "/v1/embeddings", {"input": texts, "model": name})
        assert status == 200 and answer["object"] == "list" and answer["model"] == name
        assert [d["index"] for d in answer["data"]] == [0, 1, 2] and answer["usage"]["prompt_tokens"] > 0
        np.testing.assert_allclose(np.array([d["embedding"] for d in answer["data"]]), own, atol=1e-5)
        status, answer = client.json("POST", "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, own[0], atol=1e-5)
        assert_error(*client.json("POST", "/v1/embeddings", {"input": [[1, 2, 3]]}), 400)
        assert_error(*client.json("POST", "/v1/embeddings", {"input": []}), 400)
        assert_error(*client.json("POST", "/v1/embeddings", {"input": ["a"], "model": "gpt-9"}), 404)

        # /search answers like `transferkit search --json`
        index = VectorIndex.load(text_run["index"])
        want = [h.to_json() for h in index.search(["cat on the mat"], 2)[0]]
        status, answer = client.json("POST", "/search", {"query": "cat on the mat", "k": 2})
        assert status == 200 and answer["query"] == "cat on the mat"
        assert [h["source"] for h in answer["results"]] == [h["source"] for h in want]
        assert [h["score"] for h in answer["results"]] == pytest.approx([h["score"] for h in want], abs=1e-4)
        assert_error(*client.json("POST", "/search", {"query": "cat", "k": 0}), 400)
        assert_error(*client.json("POST", "/search", {"k": 2}), 400)

        # dynamic batching: 8 concurrent one-text requests share fewer than 8 forward passes
        def metrics() -> str:
            return client.request("GET", "/metrics")[1].decode()

        before = metric(metrics(), "transferkit_batch_size_count", kind="predict")
        words = [w for w in BERT_WORDS if w in ANIMALS + MUSIC]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda w: client.json("POST", "/predict", {"texts": [w]}), words[:8]))
        assert all(status == 200 for status, _ in answers)
        assert [a["predictions"][0]["prediction"] for _, a in answers] == model.predict(words[:8])
        after = metrics()
        assert metric(after, "transferkit_batch_size_count", kind="predict") - before < 8
        assert metric(after, "transferkit_requests_total", route="/predict", status="401") == 1
        stop_cleanly(process)


def test_serve_refuses_bad_setup(image_run, tmp_path, capsys, monkeypatch):
    from transferkit.cli.main import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--model", str(image_run), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    (tmp_path / "empty-token").write_text("\n")
    assert main(["serve", "--model", str(image_run), "--token-file", str(tmp_path / "empty-token")]) == 2
    assert "token" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(image_run), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the 'serve' extra not installed
    assert main(["serve", "--model", str(image_run)]) == 2
    err = capsys.readouterr().err
    assert "serve' extra" in err and len(err.strip().splitlines()) == 1


def test_max_image_pixels_is_the_servers_limit_not_pils(image_run, monkeypatch):
    """PIL refuses images above its own limit (Image.MAX_IMAGE_PIXELS, ~89.5 MP: a warning, that the decoder turned
    into an error, and above twice that an error) whatever --max-image-pixels said. serve, a dedicated process,
    raises PIL's limit to --max-image-pixels (never lowers it), and uploads are refused above --max-image-pixels
    with the server's own message. PIL's limit stands in small here: 1,000 pixels."""
    from transferkit.data.images import decode_image_bytes
    from transferkit.errors import TransferkitError
    from transferkit.serving import app as serving
    from transferkit.serving.app import ServeConfig

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = png_bytes(Image.new("L", (40, 40)))  # 1,600 pixels: above PIL's limit, below twice it
    assert decode_image_bytes(image, "a.png", 5000).size == (40, 40)
    with pytest.raises(TransferkitError, match="a.png has 40x40 pixels, more than the limit of 1,500"):
        decode_image_bytes(image, "a.png", 1500)

    def loaded(config):
        raise TransferkitError("stop here", "(the test)")

    monkeypatch.setattr(serving, "load_service", loaded)
    with pytest.raises(TransferkitError, match="stop here"):
        serving.serve(ServeConfig(model=str(image_run), max_image_pixels=500))
    assert Image.MAX_IMAGE_PIXELS == 1000  # a lower limit is the server's check, not PIL's
    with pytest.raises(TransferkitError, match="stop here"):
        serving.serve(ServeConfig(model=str(image_run), max_image_pixels=5000))
    assert Image.MAX_IMAGE_PIXELS == 5000
    large = png_bytes(Image.new("L", (60, 60)))  # 3,600 pixels: above twice PIL's default here
    assert decode_image_bytes(large, "b.png", 5000).size == (60, 60)
    with pytest.raises(TransferkitError, match="b.png has 60x60 pixels, more than the limit of 3,000"):
        decode_image_bytes(large, "b.png", 3000)
