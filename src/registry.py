"""Register a model version, compare it with the current champion, move the aliases.

Aliases, not stages (deprecated in MLflow 3): `champion` is what serving loads
(`models:/NAME@champion`), `challenger` a registered candidate that did not beat it, and
`previous-champion` the version a promotion replaced, so one alias move rolls back.
"""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from .config import RunConfig


def current_champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def promote(client, name: str, version: str, metric: str, value: float, direction: str) -> dict[str, Any]:
    """`champion` moves to `version` only if its validation metric is strictly better."""
    champion = current_champion(client, name)
    decision: dict[str, Any] = {"model": name, "candidate_version": version, "metric": f"val/{metric}",
                                "candidate_value": value, "direction": direction}
    if champion is not None:
        decision["champion_version"] = champion.version
        old = champion.tags.get("val_metric_value")
        decision["champion_value"] = float(old) if old is not None else None
        same_metric = champion.tags.get("val_metric") == metric
        if same_metric and old is not None:
            better = value < float(old) if direction == "minimize" else value > float(old)
        else:
            better = False  # incomparable: keep the champion, a person decides
            decision["note"] = "champion has no comparable validation metric"
    else:
        better = True
        decision["champion_version"] = None
        decision["champion_value"] = None
    if better:
        if champion is not None:
            client.set_registered_model_alias(name, "previous-champion", champion.version)
        client.set_registered_model_alias(name, "champion", version)
        decision["alias"] = "champion"
    else:
        client.set_registered_model_alias(name, "challenger", version)
        decision["alias"] = "challenger"
    client.set_model_version_tag(name, version, "decision", decision["alias"])
    return decision


def register_best(cfg: RunConfig, *, best_run_id: str, best_params: dict[str, Any], study_name: str,
                  trial_number: int, metric: str, value: float, direction: str,
                  evaluate_test: bool) -> dict[str, Any]:
    """Rebuild the winning trial from its logged adapter (no retraining), optionally test it once,
    log it as a servable model in the current (parent) run, register it and decide its alias."""
    import dataclasses

    import peft

    from . import tracking
    from .experiment import prepare
    from .loop import pick_device, predict, resolve_precision
    from .modeling import build_model, servable

    lora = dataclasses.replace(cfg.lora, **{k: v for k, v in best_params.items() if k.startswith("lora_")})
    cfg = dataclasses.replace(cfg, lora=lora)
    prepared = prepare(cfg)
    client = mlflow.MlflowClient()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = mlflow.artifacts.download_artifacts(run_id=best_run_id, artifact_path="adapter", dst_path=tmp)
        base = build_model(cfg.model.model, "full", prepared.splits.labels, cfg.lora)
        model = peft.PeftModel.from_pretrained(base, adapter)
        if evaluate_test:
            device = pick_device()
            dtype = resolve_precision(cfg.train.precision, device)
            ev = predict(model.to(device), prepared.encoded["test"], cfg.train.eval_batch_size,
                         prepared.tokenizer.pad_token_id, device, dtype, progress="test (winner)")
            result["test"] = tracking.log_evaluation("test", ev, prepared.splits.labels,
                                                     prepared.splits.test["text"].tolist())
        name = cfg.tracking.registered_model_name
        info = tracking.log_servable(servable(model).cpu(), prepared.tokenizer, cfg.data.max_length, name)
    version = str(info.registered_model_version)
    for key, tag in {"optuna.study": study_name, "optuna.trial": trial_number, "trial_run_id": best_run_id,
                     "val_metric": metric, "val_metric_value": value,
                     **{f"param.{k}": v for k, v in best_params.items()}}.items():
        client.set_model_version_tag(name, version, key, str(tag))
    decision = promote(client, name, version, metric, value, direction)
    mlflow.log_dict(decision, "registry/decision.json")
    mlflow.set_tags({"registry.model": name, "registry.version": version, "registry.alias": decision["alias"]})
    result.update({"registered_model": name, "version": version, "alias": decision["alias"], "decision": decision})
    return result
