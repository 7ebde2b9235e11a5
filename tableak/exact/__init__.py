"""tabular-exact: certified whole-row recovery from FedSGD gradients of tabular models (issue 19).

Modules: ``span`` (first-layer row space, valid rows by meet in the middle), ``verify`` (second-layer
filter, whole-gradient least-squares certificate), ``attack`` (``TabularExact`` and its config).
"""
from .attack import TabularExact, TabularExactConfig

__all__ = ["TabularExact", "TabularExactConfig"]
