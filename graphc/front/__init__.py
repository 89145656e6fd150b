"""What users call: the Python API, the ``graphc`` command, the demo, ``--recipe auto`` and
greedy generation. Built on ``graphc.core`` and ``graphc.checks``."""

from graphc.core import submodules_on_access

__getattr__ = submodules_on_access(__name__)
