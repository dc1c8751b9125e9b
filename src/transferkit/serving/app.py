"""``transferkit serve``: one trained model (one copy, one model thread) behind HTTP, with dynamic batching.

Routes (JSON everywhere; every error is ``{"error": "<one line>"}`` with a 4xx status):

* Open Inference Protocol / KServe V2: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``. The input is one BYTES
  tensor of shape ``[n]``: UTF-8 strings for text models, base64-encoded image files for image models (the
  convention Triton and KServe clients use); outputs ``label`` (BYTES ``[n]``) and ``probabilities``
  (FP32 ``[n, classes]``).
* ``POST /predict``: multipart field ``file`` (repeatable) for image models, JSON ``{"texts": [...]}`` for text
  models; answers ``{"predictions": [...]}`` with the rows of ``transferkit predict --json``.
* ``POST /v1/embeddings``: the OpenAI embeddings request and response (text models: the backbone's embedding).
* ``POST /search``: with ``--index``; ``{"query": "...", "k": 5}`` (text index) or multipart ``file`` / JSON
  ``{"image": "<base64>"}`` (image index); answers like ``transferkit search --json``.
* ``GET /metrics``: Prometheus text (requests by route and status, latency histogram, batch sizes).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (``request: Request``)
# at run time.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.serving.batching import DynamicBatcher, QueueFull

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Options of ``transferkit serve`` (the CLI flags are generated from these fields)."""

    model: str = field(default="", metadata={"help": "Run folder written by `transferkit fit` (required)."})
    index: str | None = field(default=None, metadata={"help": "Index folder (`transferkit index build`) "
                                                               "served at POST /search."})
    name: str | None = field(default=None, metadata={"help": "Model name in the V2 routes and the OpenAI "
                                                              "`model` field (default: the run folder's name)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes the server to "
                                                             "the network (use --token-file then)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    token_file: str | None = field(default=None, metadata={"help": "File holding a bearer token: every route but "
                                                                   "the health probes then needs "
                                                                   "`Authorization: Bearer <token>`."})
    max_batch: int = field(default=32, metadata={"help": "Most items in one forward pass (1: no batching)."})
    device: str = field(default="auto", metadata={"help": "Where the model runs: auto (this process's GPU if any, "
                                                           "else the CPU), cpu, cuda, cuda:N or mps."})
    max_wait_ms: float = field(default=5.0, metadata={"help": "Longest wait for more requests to fill a batch."})
    max_body_mb: float = field(default=16.0, metadata={"help": "Largest request body accepted (413 above)."})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "Largest image (width x height) decoded; "
                                                                        "larger ones are refused unread."})
    max_items: int = field(default=256, metadata={"help": "Most inputs (images or texts) in one request."})
    max_text_chars: int = field(default=20_000, metadata={"help": "Longest text accepted (characters)."})
    queue_limit: int = field(default=1024, metadata={"help": "Requests waiting for the model before 503."})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch, or for onnxruntime when MODEL is an "
                                                       "ONNX export (0: the library's default)."})

    def validate(self) -> None:
        if not self.model:
            raise TransferkitError("no model given", "pass --model RUN (a folder written by `transferkit fit`)")
        checks = [("--port", self.port, 0 <= self.port <= 65535, "0..65535"),
                  ("--max-batch", self.max_batch, self.max_batch >= 1, ">= 1"),
                  ("--max-wait-ms", self.max_wait_ms, 0 <= self.max_wait_ms <= 10_000, "0..10000"),
                  ("--max-body-mb", self.max_body_mb, 0 < self.max_body_mb <= 1024, "in (0, 1024]"),
                  ("--max-image-pixels", self.max_image_pixels, self.max_image_pixels >= 1, ">= 1"),
                  ("--max-items", self.max_items, self.max_items >= 1, ">= 1"),
                  ("--max-text-chars", self.max_text_chars, self.max_text_chars >= 1, ">= 1"),
                  ("--queue-limit", self.queue_limit, self.queue_limit >= 1, ">= 1"),
                  ("--threads", self.threads, self.threads >= 0, ">= 0")]
        for flag, value, ok, allowed in checks:
            if not ok:
                raise TransferkitError(f"invalid {flag} {value}", f"use a value {allowed}")


class ApiError(Exception):
    """A client error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_token(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"token file '{path}' does not exist", "write the token into it (one line)")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise TransferkitError(f"token file '{path}' holds no usable token",
                               "write one token without spaces, e.g. `openssl rand -hex 32 > token`")
    return token


class ModelService:
    """The served model, the optional index, and the batchers that run them on one model thread."""

    def __init__(self, loaded: Any, name: str, config: ServeConfig, index: Any | None = None) -> None:
        from transferkit.api import prediction_rows

        self.loaded = loaded
        self.name = name
        self.config = config
        self.index = index
        self.classify = loaded.tasks[0].kind == "classify"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="transferkit-model")
        self._prediction_rows = prediction_rows
        self.observe_batch = lambda kind, n: None  # replaced by the app's metrics
        self.predict_batcher = self._batcher(self._predict_batch, "predict")
        self.embed_batcher = self._batcher(self._embed_batch, "embed")

    def _batcher(self, run, kind: str) -> DynamicBatcher:
        return DynamicBatcher(run, self.executor, max_batch=self.config.max_batch,
                              max_wait_ms=self.config.max_wait_ms, queue_limit=self.config.queue_limit,
                              on_batch=lambda n: self.observe_batch(kind, n))

    @property
    def modality(self) -> str:
        return self.loaded.modality

    def start(self) -> None:
        self.predict_batcher.start()
        self.embed_batcher.start()

    async def stop(self) -> None:
        await self.predict_batcher.stop()
        await self.embed_batcher.stop()
        self.executor.shutdown(wait=True)

    # --- work run on the model thread ---------------------------------------------------------------------
    def _predict_batch(self, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        names, objects = [n for n, _ in items], [o for _, o in items]
        return self._prediction_rows(self.loaded, objects, names, batch_size=len(objects))

    def _embed_batch(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        from transferkit.memory.index import embed

        backbone = self.loaded.module.backbone
        vectors = embed(backbone, texts, batch_size=len(texts))
        tokenizer = getattr(backbone, "tokenizer", None)
        if tokenizer is not None:
            counts = [len(ids) for ids in tokenizer(texts, truncation=True,
                                                    max_length=getattr(backbone, "max_length", None))["input_ids"]]
        else:
            counts = [len(t.split()) for t in texts]
        return list(zip(vectors, counts))

    def search(self, query: Any, k: int) -> list[dict[str, Any]]:
        assert self.index is not None
        return [hit.to_json() for hit in self.index.search([query], k)[0]]


def _index_encoder_reuse(loaded: Any, index: Any) -> None:
    """Let the index embed queries with the served model's backbone when that is exactly the index's (pretrained,
    frozen) encoder: one model copy instead of two."""
    from transferkit.strategies import strategy_class

    strategy = loaded.config.get("strategy")
    strategy = strategy.get("name", "") if isinstance(strategy, dict) else ""  # an ONNX export has no backbone
    try:
        frozen = strategy_class(strategy).frozen_backbone
    except TransferkitError:
        return
    if frozen:  # check_encoder keeps the backbone as the index's encoder when it matches; else the index builds its own
        with contextlib.suppress(TransferkitError):
            index.check_encoder(loaded.module.backbone)


def load_service(config: ServeConfig) -> ModelService:
    """Load the model (and index) named by ``config``; every error is a TransferkitError before anything binds."""
    import torch

    from transferkit.api import load

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load(config.model, config.device, config.threads)
    loaded.refuse_language_model()
    name = config.name or Path(config.model).resolve().name
    if not name or "/" in name:
        raise TransferkitError(f"invalid model name '{name}'", "pass --name with a name without '/'")
    index = None
    if config.index:
        from transferkit.memory.index import VectorIndex

        index = VectorIndex.load(config.index)
        _index_encoder_reuse(loaded, index)
        index.encoder  # noqa: B018 - built now, so that "ready" means ready
    return ModelService(loaded, name, config, index)


# --- request parsing ---------------------------------------------------------------------------------------


def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_END = object()


async def read_json(request, what: str = "the body") -> dict[str, Any]:
    if _media_type(request) != "application/json":
        raise ApiError(415, f"{what} must be JSON (Content-Type: application/json), got "
                            f"'{request.headers.get('content-type', 'none')}'")
    raw = await request.body()
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"{what} is not valid JSON ({getattr(exc, 'msg', exc.__class__.__name__)})") from None
    except RecursionError:
        raise ApiError(400, f"{what} nests JSON arrays or objects too deeply") from None
    if not isinstance(document, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    return document


def _flatten(data: Any) -> list[Any]:
    """Tensor data in row-major order, whether sent flat or nested (both are allowed by the protocol); iterative,
    so a deeply nested request is no RecursionError."""
    flat: list[Any] = []
    stack = [iter([data])]
    while stack:
        element = next(stack[-1], _END)
        if element is _END:
            stack.pop()
        elif isinstance(element, list):
            stack.append(iter(element))
        else:
            flat.append(element)
    return flat


class App:
    """Builds the FastAPI application around a ModelService (``create_app`` below)."""

    def __init__(self, service: ModelService, token: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.service = service
        self.token = token
        self.max_body = int(service.config.max_body_mb * 2**20)
        self.registry = CollectorRegistry()
        self.requests = Counter("transferkit_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("transferkit_request_seconds", "HTTP request latency (seconds) by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batches = Histogram("transferkit_batch_size", "Items per model forward pass",
                                 ["kind"], registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        service.observe_batch = lambda kind, n: self.batches.labels(kind).observe(n)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    # --- inputs -------------------------------------------------------------------------------------------
    def check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise ApiError(400, f"no {what} given")
        if n > self.service.config.max_items:
            raise ApiError(413, f"{n} {what} in one request exceed the limit of {self.service.config.max_items}")

    def check_texts(self, texts: Any, field_name: str) -> list[str]:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"'{field_name}' must be a list of strings")
        self.check_count(len(texts), "texts")
        limit = self.service.config.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                raise ApiError(413, f"{field_name}[{i}] has {len(text):,} characters, more than the limit of "
                                    f"{limit:,}")
        return texts

    async def decode_images(self, blobs: list[tuple[str, bytes]]) -> list[tuple[str, Any]]:
        """PIL images from untrusted file bytes, decoded in worker threads (the event loop stays free)."""
        from starlette.concurrency import run_in_threadpool

        from transferkit.data.images import decode_image_bytes

        def decode_all() -> list[tuple[str, Any]]:
            return [(name, decode_image_bytes(data, name, self.service.config.max_image_pixels))
                    for name, data in blobs]

        try:
            return await run_in_threadpool(decode_all)
        except TransferkitError as exc:
            raise ApiError(400, str(exc)) from None

    async def uploads(self, request, field_name: str = "file") -> list[tuple[str, bytes]]:
        if _media_type(request) != "multipart/form-data":
            raise ApiError(415, f"send the images as multipart/form-data field '{field_name}' (Content-Type "
                                f"was '{request.headers.get('content-type', 'none')}')")
        limit = self.service.config.max_items
        try:
            form = await request.form(max_files=limit, max_fields=limit + 8)
        except Exception as exc:  # malformed multipart (starlette raises several types)
            detail = getattr(exc, "detail", None) or str(exc) or exc.__class__.__name__
            raise ApiError(400, f"malformed multipart body ({str(detail).splitlines()[0]})") from None
        files = [f for f in form.getlist(field_name) if hasattr(f, "read")]
        self.check_count(len(files), f"files in field '{field_name}'")
        blobs = []
        for i, upload in enumerate(files):
            blobs.append((upload.filename or f"{field_name}[{i}]", await upload.read()))
            await upload.close()
        return blobs

    async def run(self, batcher: DynamicBatcher, items: list[Any]) -> list[Any]:
        try:
            return await batcher.submit(items)
        except QueueFull:
            raise ApiError(503, "too many requests waiting for the model; retry shortly") from None
        except TransferkitError as exc:
            raise ApiError(400, str(exc)) from None

    def check_name(self, name: str) -> None:
        if name != self.service.name:
            raise ApiError(404, f"unknown model '{name}'; this server serves '{self.service.name}'")

    # --- the routes -------------------------------------------------------------------------------------------
    def build(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from starlette.exceptions import HTTPException

        from transferkit import __version__

        service = self.service

        async def lifespan(_app):
            service.start()
            yield
            await service.stop()

        app = FastAPI(title="transferkit serve", version=__version__, lifespan=lifespan, docs_url=None,
                      redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request, exc: ApiError):
            return JSONResponse({"error": exc.message}, status_code=exc.status,
                                headers={"retry-after": "1"} if exc.status == 503 else None)

        @app.exception_handler(HTTPException)
        async def http_error(_request, exc: HTTPException):
            message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
            return JSONResponse({"error": message}, status_code=exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_request, exc: RequestValidationError):
            return JSONResponse({"error": "invalid request"}, status_code=400)

        # --- Open Inference Protocol (KServe V2) ---------------------------------------------------------
        @app.get("/v2")
        async def server_metadata():
            return {"name": "transferkit", "version": __version__, "extensions": []}

        @app.get("/v2/health/live")
        async def live():
            return {"live": True}

        @app.get("/v2/health/ready")
        async def ready():
            return {"ready": True}

        @app.get("/v2/models/{name}")
        async def model_metadata(name: str):
            self.check_name(name)
            return self.model_metadata()

        @app.get("/v2/models/{name}/ready")
        async def model_ready(name: str):
            self.check_name(name)
            return {"name": name, "ready": True}

        @app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request):
            self.check_name(name)
            return await self.infer(await read_json(request, "an inference request"))

        # --- plain routes --------------------------------------------------------------------------------
        @app.post("/predict")
        async def predict(request: Request):
            if service.modality == "image":
                items = await self.decode_images(await self.uploads(request))
            else:
                document = await read_json(request)
                texts = self.check_texts(document.get("texts"), "texts")
                items = list(zip(texts, texts))
            return {"predictions": await self.run(service.predict_batcher, items)}

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            return await self.embeddings(await read_json(request))

        @app.post("/search")
        async def search(request: Request):
            return await self.search(request)

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return app

    def model_metadata(self) -> dict[str, Any]:
        service = self.service
        n_classes = len(service.loaded.classes_)
        outputs = ([{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_classes]}] if service.classify
                   else [{"name": "prediction", "datatype": "BYTES", "shape": [-1]}])
        from transferkit.api import LoadedModel

        # KServe / Triton platform names: an ONNX export runs on onnxruntime, a run folder on PyTorch
        platform = "transferkit_pytorch" if isinstance(service.loaded, LoadedModel) else "onnxruntime_onnx"
        return {"name": service.name, "versions": [], "platform": platform,
                "inputs": [{"name": "input", "datatype": "BYTES", "shape": [-1]}], "outputs": outputs}

    async def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        service = self.service
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise ApiError(400, "'inputs' must hold exactly one tensor (name 'input', datatype BYTES)")
        tensor = inputs[0]
        if tensor.get("datatype") != "BYTES":
            raise ApiError(400, f"input datatype must be BYTES, got {tensor.get('datatype')!r}")
        if (tensor.get("parameters") or {}).get("binary_data_size") is not None:
            raise ApiError(400, "the binary tensor data extension is not supported: send the data as JSON")
        shape = tensor.get("shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ApiError(400, "input shape must be a list of non-negative integers, e.g. [2]")
        data = _flatten(tensor.get("data"))
        if math.prod(shape) != len(data):
            raise ApiError(400, f"input shape {shape} does not match its {len(data)} data elements")
        if not all(isinstance(d, str) for d in data):
            raise ApiError(400, "BYTES input data must be strings (texts, or base64-encoded image files)")
        self.check_count(len(data), "input elements")
        requested = request.get("outputs")
        known = [o["name"] for o in self.model_metadata()["outputs"]]
        if requested is None:
            wanted = known
        elif (isinstance(requested, list) and all(isinstance(o, dict) for o in requested)
              and all(o.get("name") in known for o in requested)):
            wanted = [o["name"] for o in requested]
        else:
            raise ApiError(400, f"requested outputs must be among {known}")
        if service.modality == "image":
            blobs = []
            for i, text in enumerate(data):
                try:
                    blobs.append((f"input[{i}]", base64.b64decode(text, validate=True)))
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"input element {i} is not valid base64") from None
            items = await self.decode_images(blobs)
        else:
            texts = self.check_texts(data, "input data")
            items = [(f"input[{i}]", t) for i, t in enumerate(texts)]
        rows = await self.run(service.predict_batcher, items)
        tensors = {}
        if service.classify:
            classes = service.loaded.classes_
            tensors["label"] = {"name": "label", "datatype": "BYTES", "shape": [len(rows)],
                                "data": [r["prediction"] for r in rows]}
            tensors["probabilities"] = {"name": "probabilities", "datatype": "FP32", "shape": [len(rows), len(classes)],
                                        "data": [r["probabilities"][c] for r in rows for c in classes]}
        else:
            tensors["prediction"] = {"name": "prediction", "datatype": "BYTES", "shape": [len(rows)],
                                     "data": [json.dumps(r["prediction"]) for r in rows]}
        response: dict[str, Any] = {"model_name": service.name, "outputs": [tensors[n] for n in wanted]}
        if isinstance(request.get("id"), str):
            response["id"] = request["id"]
        return response

    async def embeddings(self, request: dict[str, Any]) -> dict[str, Any]:
        service = self.service
        if service.modality != "text":
            raise ApiError(400, f"model '{service.name}' takes {service.modality} input: /v1/embeddings serves "
                                "text models")
        if not hasattr(service.loaded, "module"):
            raise ApiError(400, "an ONNX export holds no encoder: serve the run folder for /v1/embeddings")
        model = request.get("model")
        if model is not None and model != service.name:
            raise ApiError(404, f"unknown model '{model}'; this server serves '{service.name}'")
        texts = request.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
            raise ApiError(400, "token-id input is not supported: send strings")
        texts = self.check_texts(texts, "input")
        if any(not t for t in texts):
            raise ApiError(400, "'input' must not contain empty strings")
        encoding = request.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'")
        dim = service.loaded.module.backbone.feature_dim
        dimensions = request.get("dimensions")
        if dimensions is not None and dimensions != dim:
            raise ApiError(400, f"this encoder gives {dim}-dimensional embeddings ('dimensions' was {dimensions})")
        results = await self.run(service.embed_batcher, texts)
        data = []
        for i, (vector, _) in enumerate(results):
            vector = np.asarray(vector, dtype="<f4")
            embedding: Any = (base64.b64encode(vector.tobytes()).decode() if encoding == "base64"
                              else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = int(sum(count for _, count in results))
        return {"object": "list", "data": data, "model": service.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def search(self, request) -> dict[str, Any]:
        service = self.service
        if service.index is None:
            raise ApiError(404, "this server has no index: start it with --index IDX")
        image_index = service.index.meta.modality == "image"
        if image_index and _media_type(request) == "multipart/form-data":
            blobs = await self.uploads(request)
            if len(blobs) != 1:
                raise ApiError(400, "send exactly one query image in field 'file'")
            k_value: Any = (await request.form()).get("k", 5)
        else:
            document = await read_json(request)
            k_value = document.get("k", 5)
            if image_index:
                if not isinstance(document.get("image"), str):
                    raise ApiError(400, "this index holds images: send {\"image\": \"<base64 file>\"} or a "
                                        "multipart field 'file'")
                try:
                    blobs = [("image", base64.b64decode(document["image"], validate=True))]
                except (binascii.Error, ValueError):
                    raise ApiError(400, "'image' is not valid base64") from None
            else:
                query = document.get("query")
                if not isinstance(query, str) or not query.strip():
                    raise ApiError(400, "this index holds text: send {\"query\": \"...\", \"k\": 5}")
                self.check_texts([query], "query")
        try:
            k = int(k_value)
            if isinstance(k_value, (bool, float)) or not 1 <= k <= 1000:
                raise ValueError
        except (TypeError, ValueError):
            raise ApiError(400, f"'k' must be a whole number from 1 to 1000, got {k_value!r}") from None
        if image_index:
            label, query = blobs[0][0], (await self.decode_images(blobs))[0][1]
        else:
            label = query
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(service.executor, service.search, query, k)
        except TransferkitError as exc:
            raise ApiError(400, str(exc)) from None
        return {"query": label, "results": results}


def create_app(service: ModelService, token: str | None = None):
    """The ASGI application: the FastAPI routes inside the RequestGuard (body limit, token, metrics)."""
    from transferkit.serving.guard import RequestGuard

    app = App(service, token)
    return RequestGuard(app.build(), max_body=app.max_body, token=token, observe=app.observe)


def _listen(host: str, port: int) -> socket.socket:
    """A bound listening socket (so that a taken port is a one-line error, not uvicorn's exit)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                               "choose a free --port or another --host") from None
    return listener


def serve(config: ServeConfig) -> None:
    """Load the model and run the server until SIGINT / SIGTERM (uvicorn's graceful shutdown)."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise TransferkitError(f"`transferkit serve` needs the 'serve' extra ({exc.name} is missing)",
                               "pip install 'transferkit[serve]'") from None
    from PIL import Image

    # PIL refuses images above twice its process-wide MAX_IMAGE_PIXELS (~89.5 MP by default) before the server's
    # own check could allow them: this process only serves, so PIL's limit is raised to --max-image-pixels (never
    # lowered: a smaller --max-image-pixels is decode_image_bytes' check, with its own message)
    if Image.MAX_IMAGE_PIXELS is not None and config.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    token = read_token(config.token_file) if config.token_file else None
    service = load_service(config)
    application = create_app(service, token)
    server_config = uvicorn.Config(application, host=config.host, port=config.port, log_level="warning",
                                   access_log=False, timeout_graceful_shutdown=10, lifespan="on")
    server = uvicorn.Server(server_config)
    listener = _listen(config.host, config.port)
    logger.info("serving '%s' (%s, %d classes) on http://%s:%d%s", service.name, service.modality,
                len(service.loaded.classes_), config.host, listener.getsockname()[1],
                "; bearer token required" if token else "")
    # uvicorn finishes the requests in flight on SIGINT / SIGTERM, then re-raises the signal: with these handlers
    # that is the end of a clean shutdown (exit 0), not a KeyboardInterrupt or a kill
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
    logger.info("server stopped")
