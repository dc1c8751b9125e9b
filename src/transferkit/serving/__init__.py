"""Serving a trained model over HTTP (``transferkit serve``): KServe V2 routes, ``/predict``, OpenAI-style
``/v1/embeddings``, ``/search`` and Prometheus ``/metrics``, with dynamic batching on one model copy."""

from transferkit.serving.app import ServeConfig, create_app, load_service, serve

__all__ = ["ServeConfig", "create_app", "load_service", "serve"]
