"""jaxllm.server: the FastAPI app (native + OpenAI endpoints) over the AsyncEngine.

`build_app(config, engine)` lives in `jaxllm.server.app`; `python -m jaxllm.server` runs it.
"""
