"""tabular-exact: certified whole-row recovery from FedSGD gradients of tabular models (issue 19).

Modules: ``span`` (first-layer row space, valid rows by meet in the middle), ``layer2`` (continuous
values the first layer leaves open, solved on the second layer; the shared two-pass root search;
the declared-noise slack), ``peel`` (past the first layer's rank), ``verify`` (second-layer filter,
whole-gradient least-squares certificate), ``stages`` (the peeling stages, certificate helpers),
``fallback`` (TabLeak seeded with the certified rows, best effort under noise), ``budget`` (the
exact stage's time budget), ``attack`` (``TabularExact`` and its config).
"""
from .attack import TabularExact, TabularExactConfig

__all__ = ["TabularExact", "TabularExactConfig"]
