"""Register a model version, gate it against the current champion with a paired test, move the aliases.

Aliases, not stages (deprecated in MLflow 3): `champion` is what serving loads
(`models:/NAME@champion`), `challenger` a registered candidate that did not beat it with evidence,
and `previous-champion` the version a promotion replaced, so one command rolls back:

    python -m src.registry rollback --registered-model-name imdb-sentiment

The gate: candidate and champion predict the same held-out examples; McNemar's exact test on the
examples where exactly one of them is right, and a paired bootstrap interval of the accuracy
difference. `champion` moves only when the candidate is better, p < alpha and the interval excludes 0.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np

from .cli import fail, main
from .config import ConfigError, RunConfig

BOOTSTRAP_SAMPLES = 10_000


@dataclass
class Evidence:
    split: str
    n: int
    candidate_accuracy: float
    champion_accuracy: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    level: float
    only_candidate_right: int | None
    only_champion_right: int | None
    p_value: float | None
    significant: bool
    same_training_data: bool | None = None
    note: str = ""

    def tags(self) -> dict[str, str]:
        return {f"evidence.{k}": "" if v is None else str(v) for k, v in asdict(self).items()}


def paired_evidence(candidate_correct: np.ndarray, champion_correct: np.ndarray, alpha: float, split: str,
                    seed: int = 0) -> Evidence:
    """McNemar (exact, two-sided) and a paired bootstrap CI of accuracy(candidate) - accuracy(champion)."""
    from scipy.stats import binomtest

    a = np.asarray(candidate_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    diff = (only_a - only_b) / n
    # Resampling examples with replacement only moves the counts of the three kinds of pairs
    # (only candidate right, only champion right, same): a multinomial draw is the exact same
    # bootstrap without an n x B index matrix.
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=BOOTSTRAP_SAMPLES)
    boot = (draws[:, 0] - draws[:, 1]) / n
    low, high = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    return Evidence(split=split, n=n, candidate_accuracy=float(a.mean()), champion_accuracy=float(b.mean()),
                    difference=float(diff), ci_low=low, ci_high=high, level=1 - alpha,
                    only_candidate_right=only_a, only_champion_right=only_b, p_value=p,
                    significant=bool(diff > 0 and p < alpha and low > 0))


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def champion_labels(name: str, version) -> list[str]:
    """The champion's label map: from its tag, else from the columns its model predicts."""
    if "labels" in version.tags:
        return json.loads(version.tags["labels"])
    import mlflow
    import pandas as pd

    out = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").predict(pd.DataFrame({"text": ["a"]}))
    return [c[len("prob_"):] for c in out.columns if c.startswith("prob_")]


def check_label_map(name: str, labels: list[str]) -> None:
    """Before training: a registration the gate would refuse for its label map fails now."""
    import mlflow

    from .tracking import local_path

    store = local_path(mlflow.get_tracking_uri())
    if store is not None and not store.exists():
        return  # no store yet, so no champion (and opening it would create it)
    champion = current_champion(mlflow.MlflowClient(), name)
    if champion is not None:
        _same_labels(name, champion, labels)


def _same_labels(name: str, champion, labels: list[str]) -> None:
    theirs = champion_labels(name, champion)
    if theirs != labels:
        raise ConfigError(f"the champion of {name!r} (version {champion.version}) has labels {theirs}, this "
                          f"model {labels}; register under another --registered-model-name")


def gather_evidence(client, name: str, labels: list[str], candidate_preds: np.ndarray, true_labels: np.ndarray,
                    texts: list[str], alpha: float, split: str,
                    contract: dict[str, str] | None = None) -> tuple[Any, Evidence]:
    """Everything the decision needs, before anything is registered: a label map that differs from
    the champion's is refused here, with nothing written. `contract` (the candidate's data tags) is
    compared with the champion's run: a champion trained on other data may have seen these examples."""
    candidate_correct = candidate_preds == true_labels
    champion = current_champion(client, name)
    if champion is None:
        return None, Evidence(split=split, n=len(texts), candidate_accuracy=float(candidate_correct.mean()),
                              champion_accuracy=None, difference=None, ci_low=None, ci_high=None, level=1 - alpha,
                              only_candidate_right=None, only_champion_right=None, p_value=None, significant=True,
                              note="first champion of this model")
    _same_labels(name, champion, labels)
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{name}/{champion.version}")
    predicted = model.predict(pd.DataFrame({"text": texts}))["label"].astype(str).tolist()
    index = {label: i for i, label in enumerate(labels)}
    champion_correct = np.array([index[p] for p in predicted]) == true_labels
    evidence = paired_evidence(candidate_correct, champion_correct, alpha, split)
    notes = []
    if contract:
        theirs = client.get_run(champion.run_id).data.tags
        keys = ("data.fingerprint.train", "data.split_seed")
        evidence.same_training_data = all(theirs.get(k) == contract.get(k) for k in keys)
        if not evidence.same_training_data:
            notes.append("the champion was trained on other data or another split and may have seen these "
                         "examples")
    if split == "val":
        notes.append("judged on validation, the split that selected the candidate: biased in its favour")
    evidence.note = "; ".join(notes)
    return champion, evidence


def decide(client, name: str, version: str, champion, evidence: Evidence, labels: list[str]) -> dict[str, Any]:
    """Evidence first, aliases last: a version is never champion without its evidence tags."""
    for key, value in {**evidence.tags(), "labels": json.dumps(labels)}.items():
        client.set_model_version_tag(name, version, key, value)
    alias = "champion" if evidence.significant else "challenger"
    if alias == "champion":
        if champion is not None:
            client.set_registered_model_alias(name, "previous-champion", champion.version)
        client.set_registered_model_alias(name, "champion", version)
    else:
        client.set_registered_model_alias(name, "challenger", version)
    client.set_model_version_tag(name, version, "decision", alias)
    return {"model": name, "candidate_version": version, "alias": alias,
            "champion_version": champion.version if champion is not None else None, **asdict(evidence)}


def register_gated(model, tokenizer, max_length: int, temperature: float, name: str, labels: list[str],
                   candidate_preds: np.ndarray, true_labels: np.ndarray, texts: list[str], alpha: float,
                   split: str, version_tags: dict[str, Any] | None = None,
                   contract: dict[str, str] | None = None) -> dict[str, Any]:
    """Gate, then log the servable model in the active run, register it, tag it and move the aliases."""
    import mlflow

    from . import tracking

    client = mlflow.MlflowClient()
    champion, evidence = gather_evidence(client, name, labels, candidate_preds, true_labels, texts, alpha, split,
                                         contract)
    info = tracking.log_servable(model, tokenizer, max_length, name, temperature=temperature)
    version = str(info.registered_model_version)
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    decision = decide(client, name, version, champion, evidence, labels)
    mlflow.log_dict(decision, "registry/decision.json")
    mlflow.set_tags({"registry.model": name, "registry.version": version, "registry.alias": decision["alias"]})
    return decision


def rollback(client, name: str) -> dict[str, str]:
    """`champion` back to `previous-champion`; the demoted version becomes `previous-champion`, so a
    second rollback undoes the first. `decision` tags keep what the gate decided at registration;
    `rollback` tags say which version a rollback restored and which it demoted."""
    from mlflow.exceptions import MlflowException

    try:
        previous = client.get_model_version_by_alias(name, "previous-champion")
    except MlflowException:
        raise ConfigError(f"registered model {name!r} has no previous-champion to roll back to") from None
    current = current_champion(client, name)
    client.set_registered_model_alias(name, "champion", previous.version)
    client.set_model_version_tag(name, previous.version, "rollback", "restored")
    if current is not None:
        client.set_registered_model_alias(name, "previous-champion", current.version)
        client.set_model_version_tag(name, current.version, "rollback", "demoted")
    return {"champion": previous.version, "previous-champion": current.version if current else ""}


def register_best(cfg: RunConfig, *, best_run_id: str, best_params: dict[str, Any], study_name: str,
                  trial_number: int, metric: str, value: float, evaluate_test: bool) -> dict[str, Any]:
    """Rebuild the winning trial from its logged adapter (no retraining), optionally test it once,
    then register it through the gate, in the current (parent) run."""
    import dataclasses

    import mlflow
    import peft

    from . import tracking
    from .evaluate import fit_temperature
    from .experiment import prepare
    from .loop import pick_device, predict, resolve_precision
    from .modeling import build_model, servable

    strategy = best_params.get("strategy", "lora")
    lora = dataclasses.replace(cfg.lora, **{k: v for k, v in best_params.items() if k.startswith("lora_")})
    cfg = dataclasses.replace(cfg, lora=lora)
    prepared = prepare(cfg)
    splits, encoded, tokenizer = prepared.splits, prepared.encoded, prepared.tokenizer
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        device = pick_device()
        dtype = resolve_precision(cfg.train.precision, device)
        if strategy == "lora":
            adapter = mlflow.artifacts.download_artifacts(run_id=best_run_id, artifact_path="adapter", dst_path=tmp)
            base = build_model(cfg.model.model, "full", splits.labels, cfg.lora)
            model = peft.PeftModel.from_pretrained(base, adapter).to(device)
        else:
            weights = mlflow.artifacts.download_artifacts(run_id=best_run_id, artifact_path="weights", dst_path=tmp)
            model = build_model(weights, "full", splits.labels, cfg.lora).to(device)

        def score(split: str):
            return predict(model, encoded[split], cfg.train.eval_batch_size, tokenizer.pad_token_id, device, dtype,
                           progress=f"{split} (winner)")

        temperature = 1.0
        if cfg.train.temperature_scaling:
            temperature = fit_temperature(score("val"))
            mlflow.log_metric("calibration/temperature", temperature)
        split = "test" if evaluate_test else "val"  # the gate's held-out examples
        ev = score(split)
        frame = splits.test if split == "test" else splits.val
        if evaluate_test:
            result["test"] = tracking.log_evaluation("test", ev, splits.labels, frame["text"].tolist(),
                                                     lengths=encoded["test"].lengths,
                                                     max_length=cfg.data.max_length, temperature=temperature)
        name = cfg.tracking.registered_model_name
        contract = tracking.data_contract(splits, cfg.data.split_seed, tokenizer)
        mlflow.set_tags(contract)  # the study's run holds the registered model: it carries the data tags
        tags = {"optuna.study": study_name, "optuna.trial": trial_number, "trial_run_id": best_run_id,
                "val_metric": metric, "val_metric_value": value, **{f"param.{k}": v for k, v in best_params.items()}}
        decision = register_gated(servable(model).cpu(), tokenizer, cfg.data.max_length, temperature, name,
                                  splits.labels, ev.preds, ev.labels, frame["text"].tolist(),
                                  cfg.tracking.promotion_alpha, split, tags, contract)
    result.update({"registered_model": name, "version": decision["candidate_version"], "alias": decision["alias"],
                   "decision": decision})
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def registry() -> None:
    """Model registry actions."""


@registry.command("rollback")
@click.option("--registered-model-name", required=True, help="Registered model whose champion goes back one step.")
def rollback_command(registered_model_name: str) -> None:
    """Point `champion` back at `previous-champion` (run it again to undo)."""
    import mlflow

    from .tracking import check_reachable

    try:
        check_reachable()
        moved = rollback(mlflow.MlflowClient(), registered_model_name)
    except ConfigError as exc:
        fail(exc)
        return
    click.echo(f"{registered_model_name}: champion -> version {moved['champion']}, "
               f"previous-champion -> version {moved['previous-champion']}")


if __name__ == "__main__":
    main(registry, "python -m src.registry")
