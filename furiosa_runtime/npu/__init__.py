"""The simulated NPU: what an artifact is and how its programs run.

``artifact`` reads and verifies an artifact folder (``jit_store`` the buckets compiled
for it later, recorded beside it), ``weights`` maps its safetensors,
``isa`` is the instruction set and its NumPy kernels, ``hardware`` the device and mesh
description, ``simulator`` runs compiled programs on the processing elements, and
``timing`` models how long each step would take on the real chip.  Nothing here knows
about requests, sampling or tokenizers; this layer imports no other layer of the runtime.
"""
