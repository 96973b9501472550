"""The MLflow side of a pipeline run: what the parent run records, and `slimstep compare` over parents.

A flow run mirrors the workspace it leaves behind onto its parent run (params.yaml flattened, every
leaderboard metric, the featurizer's hash), so each pipeline run is comparable even when DVC skipped
every stage. Parents made by a plain `slimstep repro` have none of that: their eval child's metrics,
params and featurizer tag are used instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import tracking
from pipeline.modelio import model_hash
from pipeline.tracking.registry import FEATURIZER_TAG

RANK_METRIC = "distill-fgd/onestep/fd"  # the one-step SlimFlow student's FD
KEY_SUFFIX = "/fd"


class IncomparableRuns(ValueError):
    """The chosen runs' FDs were measured in different feature spaces (or one is unknown)."""


def workspace_metrics(root: Path) -> dict[str, float]:
    """reports/metrics.json as MLflow metrics: `<model>/<sampler>/<key>` (`@` → `-`, like eval's own)."""
    path = root / "reports/metrics.json"
    if not path.exists():
        return {}
    flat: dict[str, float] = {}
    for row, values in json.loads(path.read_text()).items():
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                flat[tracking.metric_name(f"{row}/{key}")] = float(value)
    return flat


def record_pipeline_run(run_id: str, root: Path) -> None:
    """Params, leaderboard metrics, featurizer hash and the leaderboard file onto the parent run."""
    tracker = tracking.MlflowTracker(run_id)
    params = yaml.safe_load((root / "params.yaml").read_text())
    tracker.log_params(params)
    tracker.log_metrics(workspace_metrics(root))
    if (root / "models/featurizer/meta.json").exists():
        tracker.set_tags({FEATURIZER_TAG: model_hash(root / "models/featurizer")})
    if (root / "reports/leaderboard.csv").exists():
        tracker.log_artifact(root / "reports/leaderboard.csv")


@dataclass
class Comparison:
    table: pd.DataFrame  # one column per run (oldest first), one row per field
    featurizers: dict[str, str]  # column → featurizer hash ("unknown" when not recorded)
    rank_metric: str
    run_ids: dict[str, str] = field(default_factory=dict)  # column → MLflow run id


def _client() -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.MlflowClient()


def pipeline_runs(last: int = 5, run_ids: list[str] | None = None) -> list[Any]:
    """The newest `last` pipeline (parent) runs, or the given ids (a unique prefix is enough); oldest first."""
    client = _client()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {tracking.EXPERIMENT!r} at {tracking.tracking_uri()}")
    found = client.search_runs(
        [experiment.experiment_id], "tags.`slimstep.kind` = 'pipeline'", order_by=["attributes.start_time DESC"],
        max_results=1000 if run_ids else last,
    )  # fmt: skip
    if run_ids:
        chosen = []
        for wanted in run_ids:
            matches = [r for r in found if r.info.run_id.startswith(wanted)]
            if len(matches) != 1:
                raise LookupError(f"run {wanted!r} matches {len(matches)} pipeline runs (need exactly one)")
            chosen.append(matches[0])
        found = chosen
    return sorted(found, key=lambda r: r.info.start_time)


def _children(client: Any, run: Any) -> list[Any]:
    return client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=1000
    )  # fmt: skip


def _view(client: Any, run: Any) -> tuple[dict[str, float], dict[str, str], str]:
    """(metrics, params, featurizer) of a pipeline run: its own record, else its stage children's."""
    metrics, params = dict(run.data.metrics), dict(run.data.params)
    featurizer = run.data.tags.get(FEATURIZER_TAG)
    if not any(k.endswith(KEY_SUFFIX) for k in metrics) or featurizer is None:
        for child in _children(client, run):
            params = {**child.data.params, **params}
            if child.data.tags.get("slimstep.stage") == "eval":
                metrics = {**child.data.metrics, **metrics}
                featurizer = featurizer or child.data.tags.get(FEATURIZER_TAG)
    return metrics, params, featurizer or "unknown"


def compare(runs: list[Any], rank_metric: str = RANK_METRIC) -> Comparison:
    """Side by side: header fields, rank (by `rank_metric`, lower is better), key metrics, params that differ."""
    client = _client()
    columns, metrics, params, featurizers, header = [], {}, {}, {}, {}
    for run in runs:
        column = f"{run.info.run_name} ({run.info.run_id[:8]})"
        columns.append(column)
        metrics[column], params[column], featurizers[column] = _view(client, run)
        header[column] = {
            "started": pd.Timestamp(run.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M:%S"),
            "status": run.info.status,
            "profile": run.data.tags.get("slimstep.profile", ""),
            "git commit": run.data.tags.get("git.commit", "")[:10],
            "featurizer": featurizers[column],
        }
    rows: dict[str, dict[str, Any]] = {name: {c: header[c][name] for c in columns} for name in header[columns[0]]}
    keys = sorted({k for c in columns for k in metrics[c] if k.endswith(KEY_SUFFIX)})
    rows[f"rank ({rank_metric})"] = ranks({c: metrics[c].get(rank_metric, math.nan) for c in columns})
    rows.update({k: {c: metrics[c].get(k, math.nan) for c in columns} for k in keys})
    for key in sorted({k for c in columns for k in params[c]}):
        values = {c: params[c].get(key, "") for c in columns}
        if len(set(values.values())) > 1:
            rows[f"param {key}"] = values
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    return Comparison(table, featurizers, rank_metric, {c: r.info.run_id for c, r in zip(columns, runs, strict=True)})


def ranks(scores: dict[str, float]) -> dict[str, int | str]:
    """1 = lowest score; equal scores share the better rank (1, 1, 3); a run without the score gets ""."""
    known = sorted(v for v in scores.values() if not math.isnan(v))
    return {c: known.index(v) + 1 if not math.isnan(v) else "" for c, v in scores.items()}


def as_json(comparison: Comparison) -> dict[str, Any]:
    """The comparison for scripts: one entry per run, every field by its full name, NaN as null."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        return value.item() if hasattr(value, "item") else value

    return {
        "rank_metric": comparison.rank_metric,
        "runs": [
            {"name": column, "run_id": comparison.run_ids.get(column, ""),
             "fields": {str(f): plain(v) for f, v in comparison.table[column].items()}}
            for column in comparison.table.columns
        ],
    }  # fmt: skip


def check_comparable(comparison: Comparison) -> None:
    """Refuse to rank FDs from different featurizers: each lives in its own feature space."""
    distinct = set(comparison.featurizers.values())
    if len(distinct) > 1 or "unknown" in distinct:
        listing = "\n".join(f"  {run}: featurizer {h}" for run, h in comparison.featurizers.items())
        raise IncomparableRuns(
            "cannot rank these runs: their FDs were measured with different featurizers (or one is not "
            f"recorded), so the numbers are not on one scale:\n{listing}\n"
            "Pick runs that share a featurizer with --runs id,id."
        )
