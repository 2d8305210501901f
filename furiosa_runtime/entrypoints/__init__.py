"""The ways in: the Python API (``LLM``, ``LLMEngine``, ``AsyncLLMEngine``, ``EngineArgs``)
and the command line.  This layer imports the engine and the NPU; nothing below imports it.
"""
