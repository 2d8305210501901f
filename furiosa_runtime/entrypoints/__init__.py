"""The ways in: the Python API (``LLM``, ``LLMEngine``, ``AsyncLLMEngine``, ``EngineArgs``),
the command line, and the OpenAI-compatible HTTP server (``openai/``).  This layer imports
the engine and the NPU; nothing below imports it.
"""
