"""Metrics: pure, keyword-only functions returning ``dict[str, float]``.

Every metric scores per example first and then takes a plain mean; predictions must be
aligned to references (``common.matching.align``) before a metric is called. A non-finite
reconstruction (NaN, Inf, ``None``) is always scored as wrong: the metric's worst value,
never a crash and never credit.

Metrics are data: each package declares a plain ``METRICS`` table of ``MetricInfo`` (the
function, the output keys it writes into a record, their direction and range). This module
holds the common ones; ``metric_table`` builds the full table from every package's table
without mutating anything, and ``higher_is_better`` / ``metric_info`` read that table, so
the direction of e.g. ``mcd`` or ``nrmse`` is known without building the catalog (and
without importing torch: the tables are plain data).

One key, two meanings: ``accuracy`` in a *tabular* record is TabLeak's cell accuracy (the
fraction of feature cells recovered after row matching; entry ``tabular_accuracy``), while
the common ``accuracy`` function is classification accuracy; recovered labels are reported
by every kit as ``label_accuracy``. ``metric_info(key, modality=...)`` picks the right one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, Mapping

from ..registry import Registry

INF = float("inf")
#: The packages whose ``METRICS`` tables make up the default table (same list as the catalog).
METRIC_PACKAGES = ("common", "tableak", "textleak", "speechleak")
PLUGIN_ENV = "GRADLEAK_PLUGINS"  # as in eval.catalog: comma-separated extra modules with the same tables


@dataclass(frozen=True)
class MetricInfo:
    name: str
    target: str  # "module:function"
    modality: str  # "text" | "tabular" | "speech" | "any"
    outputs: tuple[str, ...]  # keys of the returned dict
    #: direction of every output; None: no direction (a count or a context number, e.g. ``pesq_wb_n``)
    higher_is_better: bool | None = True
    range: tuple[float, float] | None = (0.0, 1.0)  # None: unbounded (e.g. dB)
    description: str = ""

    @property
    def worst(self) -> float:
        """The value a broken (non-finite) reconstruction gets: the bad end of the range."""
        lo, hi = self.range or (-INF, INF)
        return float("nan") if self.higher_is_better is None else (lo if self.higher_is_better else hi)


METRICS: Registry[MetricInfo] = Registry("metric")  # the common layer's own entries (never mutated later)

for _info in (
    MetricInfo("rouge", "common.metrics.text:rouge", "text", ("rouge1", "rouge2", "rougeL"),
               description="ROUGE-1/2/L F-measure per example (rouge_score, Unicode-aware tokens), then mean"),
    MetricInfo("token_accuracy", "common.metrics.text:token_accuracy", "text", ("token_accuracy",),
               description="fraction of reference tokens recovered at the same position"),
    MetricInfo("exact_match", "common.metrics.text:exact_match", "text", ("exact_match",),
               description="fraction of examples reconstructed exactly"),
    MetricInfo("accuracy", "common.metrics.classification:accuracy", "any", ("accuracy",),
               description="classification accuracy (tabular records: see tabular_accuracy)"),
    MetricInfo("label_accuracy", "common.metrics.classification:label_accuracy", "any", ("label_accuracy",),
               description="recovered labels as a multiset against the true labels"),
    MetricInfo("wer", "common.metrics.speech:wer", "speech", ("wer", "wer_mean"), higher_is_better=False,
               range=(0.0, INF), description="word error rate: corpus-level (wer) and per-utterance mean (wer_mean)"),
    MetricInfo("cer", "common.metrics.speech:cer", "speech", ("cer", "cer_mean"), higher_is_better=False,
               range=(0.0, INF), description="character error rate: corpus-level and per-utterance mean"),
):
    METRICS.add(_info.name, _info)


class MetricTable:
    """An immutable table of metrics (name -> MetricInfo) with per-output-key lookups."""

    def __init__(self, infos: Iterable[MetricInfo]) -> None:
        entries: dict[str, MetricInfo] = {}
        by_key: dict[str, list[MetricInfo]] = {}
        for info in infos:
            if info.name in entries:
                if entries[info.name] != info:
                    raise ValueError(f"metric {info.name!r} is registered twice with different definitions")
                continue
            entries[info.name] = info
            for key in dict.fromkeys(info.outputs):
                by_key.setdefault(key, []).append(info)
        for key, infos_k in by_key.items():
            dirs = {i.higher_is_better for i in infos_k if i.higher_is_better is not None}
            if len(dirs) > 1:
                raise ValueError(f"metric key {key!r} is registered both higher- and lower-is-better "
                                 f"({', '.join(i.name for i in infos_k)})")
        self._entries = entries
        self._by_key = {k: tuple(v) for k, v in by_key.items()}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> MetricInfo:
        if name not in self._entries:
            import difflib

            from ..registry import UnknownName

            hint = difflib.get_close_matches(name, list(self._entries), n=3)
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise UnknownName(f"unknown metric {name!r}{did}; known: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Every output key some metric writes into a record."""
        return sorted(self._by_key)

    def info(self, key: str, *, modality: str | None = None) -> MetricInfo | None:
        """The entry that defines output ``key`` (for ``modality`` when given: a modality's own
        entry wins over an "any" one; entries with a direction win over direction-less ones)."""
        cands = self._by_key.get(key) or ((self._entries[key],) if key in self._entries else ())
        if modality is not None:
            own = [i for i in cands if i.modality == modality]
            cands = tuple(own) or tuple(i for i in cands if i.modality == "any") or cands
        directed = [i for i in cands if i.higher_is_better is not None]
        return (directed or list(cands) or [None])[0]

    def higher_is_better(self, key: str) -> bool | None:
        info = self.info(key)
        return None if info is None else info.higher_is_better


def build_metric_table(tables: Iterable[Iterable[MetricInfo] | Mapping[str, MetricInfo] | Registry]) -> MetricTable:
    """A fresh table from several ``METRICS`` tables (sequences of MetricInfo, or registries)."""
    infos: list[MetricInfo] = []
    for t in tables:
        if isinstance(t, Registry):
            infos += [t.get(n) for n in t.names()]
        elif isinstance(t, Mapping):
            infos += list(t.values())
        else:
            infos += list(t)
    return MetricTable(infos)


def metric_packages() -> tuple[str, ...]:
    extra = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    return METRIC_PACKAGES + tuple(m for m in extra if m not in METRIC_PACKAGES)


def metric_table(packages: Iterable[str] | None = None) -> MetricTable:
    """The full metric table of ``packages`` (default: the built-in ones plus ``$GRADLEAK_PLUGINS``).
    Pure: reads each package's plain ``METRICS`` table (imports only the package's ``__init__``)."""
    return _metric_table(metric_packages() if packages is None else tuple(packages))


@lru_cache(maxsize=8)
def _metric_table(packages: tuple[str, ...]) -> MetricTable:
    import importlib

    tables: list = []
    for pkg in packages:
        mod = importlib.import_module(pkg)
        tables.append(METRICS if pkg == "common" else getattr(mod, "METRICS", ()))
    return build_metric_table(tables)


def metric_function(name: str):
    import importlib

    info = metric_table().get(name)
    module, _, attr = info.target.partition(":")
    return getattr(importlib.import_module(module), attr)


def metric_info(key: str, *, modality: str | None = None) -> MetricInfo | None:
    """The entry that defines output key ``key`` (e.g. 'mcd'), from the full table; None when unknown."""
    return metric_table().info(key, modality=modality)


def higher_is_better(output_key: str) -> bool | None:
    """Direction of a metric output key (e.g. 'rouge2', 'mcd'); None when unknown or direction-less."""
    return metric_table().higher_is_better(output_key)


def worst_value(output_key: str, *, modality: str | None = None) -> float:
    """The score a non-finite reconstruction gets for ``output_key`` (the bad end of its range)."""
    info = metric_info(output_key, modality=modality)
    if info is None:
        raise KeyError(f"metric key {output_key!r} is not registered")
    return info.worst

