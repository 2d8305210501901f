"""The OpenAI-compatible HTTP server (``furiosa-llm serve``), laid out as vLLM's: request and
response models (``protocol``), one ``serving_*`` module per endpoint over the async engine,
Prometheus ``metrics``, the ``serve`` flags (``cli_args``) and the FastAPI app and uvicorn
runner (``api_server``).  FastAPI, uvicorn and prometheus_client are imported only here, so
``import furiosa_runtime`` stays light.
"""
