"""The serving engine: requests in, scheduled NPU steps, outputs out.

``core.EngineCore`` owns continuous batching over an artifact's buckets: ``scheduler``
picks each step's bucket and rows, ``block_manager`` owns the paged KV cache,
``model_runner`` turns a batch into program feeds for the simulator, ``sampler`` picks
tokens, ``sequence`` tracks each request's state, ``jit`` compiles the buckets traffic asks
for in worker processes (``enable_jit_compilation``).  The request types (``sampling_params``,
``outputs``, ``inputs``), the ``tokenizer`` and ``pooling`` for embedding artifacts live
here too.  This layer imports only ``furiosa_runtime.npu``.
"""
