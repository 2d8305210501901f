"""The Hydra configs of ``python -m furiosa_build``, importable as ``furiosa_build.conf``.

``furiosa_build/conf`` is a link to this folder, so the package (editable or installed
from a wheel, where setuptools copies these files as package data) carries its configs
and the entry point finds them on Hydra's search path as ``pkg://furiosa_build.conf``
from any working directory.  Hydra reads a ``pkg://`` folder only if it holds this file.
"""
