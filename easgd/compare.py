"""What tells runs apart: each run folder's settings and the keys whose values differ between runs.

A run folder of ``easgd.train`` keeps the overrides it was started with in ``.hydra/overrides.yaml``
(as typed: ``algorithm.learning_rate=0.05``) and its full config in ``summary.json``. The keys
compared are those any of the runs overrode; a run that did not override one has the value of
its config (its default). A folder without overrides (the own-loop API) is described by its
summary's algorithm, workers, period, learning rate, momentum and seed. :mod:`easgd.plot` labels
curves with the differing keys; :mod:`easgd.sweep` groups runs that differ only in ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OVERRIDES = Path(".hydra") / "overrides.yaml"

PRESENTATION_KEYS = frozenset({"progress", "tensorboard", "run_dir"})
"""Overrides that change how a run reports, not what it computes (left out of comparisons)."""

SUMMARY_KEYS = {
    "algorithm": "algorithm",
    "workers": "workers",
    "comm.period": "comm_period",
    "algorithm.learning_rate": "learning_rate",
    "algorithm.momentum": "momentum",
    "seed": "seed",
}
"""Override spelling -> summary.json key: how a run without overrides is described."""


@dataclass(frozen=True)
class RunInfo:
    """One run folder: its overrides (as typed) and its summary (None: not finished)."""

    path: Path
    overrides: dict[str, str]
    summary: dict[str, Any] | None


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """``["algorithm=eamsgd", "+x=1", "hydra.run.dir=..."]`` -> ``{"algorithm": "eamsgd", "x": "1"}``
    (``hydra.*``, deletions ``~key`` and presentation keys left out)."""
    settings: dict[str, str] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+")
        if not sep or key.startswith(("hydra.", "~")) or key in PRESENTATION_KEYS:
            continue
        settings[key] = value
    return settings


def load_run(path: Path) -> RunInfo:
    """Read ``path``'s overrides (none without a ``.hydra`` folder) and its summary.json."""
    overrides_path, summary_path = path / OVERRIDES, path / "summary.json"
    lines = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else None
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return RunInfo(path, parse_overrides(lines or []), summary)


def show(value: Any) -> str:
    """One spelling per value, whichever source it came from (``0.050`` and ``0.05`` agree)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def value_of(run: RunInfo, key: str) -> str:
    """``key``'s value in ``run``: its override, else its config, else its summary ("default")."""
    if key in run.overrides:
        return show(run.overrides[key])
    summary = run.summary or {}
    node: Any = summary.get("config")
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):  # a config group (algorithm=eamsgd): its name
        node = node.get("name")
    if node is None and key in SUMMARY_KEYS:
        node = summary.get(SUMMARY_KEYS[key])
    return "default" if node is None else show(node)


def settings(runs: Sequence[RunInfo]) -> list[dict[str, str]]:
    """Each run's value of every key any run overrode (the summary keys if none did)."""
    keys: dict[str, None] = {}  # ordered as typed, first run first
    for run in runs:
        keys.update(dict.fromkeys(run.overrides))
    if not keys:
        keys = dict.fromkeys(SUMMARY_KEYS)
    return [{key: value_of(run, key) for key in keys} for run in runs]


def differing_keys(table: Sequence[dict[str, str]]) -> list[str]:
    """The keys (in first-seen order) whose value is not the same in every row (missing counts)."""
    keys: dict[str, None] = {}
    for row in table:
        keys.update(dict.fromkeys(row))
    return [k for k in keys if len({row.get(k) for row in table}) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``algorithm.learning_rate`` -> ``learning_rate`` where the last part names one key only."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {
        key: name if last.count(name) == 1 else key for key, name in zip(keys, last, strict=True)
    }


def legend_labels(table: Sequence[dict[str, str]], fallbacks: Sequence[str]) -> list[str]:
    """One label per run: the differing keys, ``"learning_rate=0.05 seed=1"``; when nothing
    differs, ``fallbacks`` (with the row number where two would read the same)."""
    keys = differing_keys(table)
    if not keys:
        repeated = len(set(fallbacks)) < len(fallbacks)
        return [f"{text} #{i}" if repeated else text for i, text in enumerate(fallbacks)]
    names = short_names(list(dict.fromkeys(k for row in table for k in row)))  # among all keys
    return [" ".join(f"{names[k]}={row.get(k, 'default')}" for k in keys) for row in table]
