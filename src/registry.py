"""Register a model version, gate it against the current champion with a paired test, move the aliases.

Aliases, not stages (deprecated in MLflow 3): `champion` is what serving loads
(`models:/NAME@champion`), `challenger` a registered candidate that did not beat it with evidence,
and `previous-champion` the version a promotion replaced, so one command rolls back:

    python -m src.registry rollback --registered-model-name imdb-sentiment

The gate: candidate and champion predict the same held-out examples (those that neither trained on);
McNemar's exact test on the examples where exactly one of them is right, and a paired bootstrap
interval of the accuracy difference. `champion` moves only when the candidate is better, p < alpha
and the interval excludes 0. A first champion must beat the majority-class baseline the same way.
alpha is the registered model's policy (`python -m src.registry policy`); a submitter may only ask
for a stricter one. Every model is read through `serving.load`: nothing from the store is unpickled.
Every Model Registry call of the project is made here.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import numpy as np

from .cli import fail, main
from .config import DEFAULT_PROMOTION_ALPHA, ConfigError, RunConfig
from .names import CHALLENGER, CHAMPION, PREVIOUS

BOOTSTRAP_SAMPLES = 10_000
POLICY_TAG = "promotion.alpha"  # on the registered model
LOCK_SUFFIX = ".gate-lock"
LOCK_STALE = 600.0  # seconds; the lock is held for a registration and two alias moves, not for scoring
MAX_REJUDGE = 5


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
    against: str = ""
    excluded_seen_in_training: int = 0
    note: str = ""

    def tags(self) -> dict[str, str]:
        """Only what has a value; floats rounded for reading (the decision JSON keeps them exact)."""
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {f"evidence.{k}": str(v) for k, v in shown.items() if v not in (None, "")}


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
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_or_first(client, name: str):
    """The champion, or None when the model has no version yet. A model that has versions but no
    champion (its version or alias deleted) is not "first": that would let any candidate in."""
    champion = current_champion(client, name)
    if champion is None and client.search_model_versions(f"name = '{name}'", max_results=1):
        raise ConfigError(f"registered model {name!r} has versions but no champion (was it deleted?); choose one "
                          f"with `python -m src.registry promote --registered-model-name {name} --version N`")
    return champion


def policy_alpha(client, name: str) -> float:
    """The model's promotion level, set by its owner (`python -m src.registry policy`); the default
    until one is set."""
    from mlflow.exceptions import MlflowException

    try:
        return float(client.get_registered_model(name).tags.get(POLICY_TAG, DEFAULT_PROMOTION_ALPHA))
    except MlflowException:
        return DEFAULT_PROMOTION_ALPHA


def version_labels(name: str, version: str) -> list[str]:
    """The label map a version was logged with, read from its artifacts (tags can be edited)."""
    from pathlib import Path

    from . import serving

    with tempfile.TemporaryDirectory() as tmp:
        weights, config = serving.fetch(f"models:/{name}/{version}", Path(tmp), weights=False)
        if config.get("labels"):
            return list(config["labels"])
        weights, config = serving.fetch(f"models:/{name}/{version}", Path(tmp))
        id2label = json.loads((weights / "config.json").read_text()).get("id2label", {})
        return [id2label[k] for k in sorted(id2label, key=int)]


def check_registration(name: str, labels: list[str]) -> None:
    """Before training: a registration the gate would refuse (label map, no champion) fails now."""
    import mlflow

    from .tracking import local_path

    store = local_path(mlflow.get_tracking_uri())
    if store is not None and not store.exists():
        return  # no store yet, so no champion (and opening it would create it)
    champion = champion_or_first(mlflow.MlflowClient(), name)
    if champion is not None:
        _same_labels(name, champion.version, labels)


def _same_labels(name: str, version: str, labels: list[str]) -> None:
    theirs = version_labels(name, version)
    if theirs != labels:
        raise ConfigError(f"the champion of {name!r} (version {version}) has labels {theirs}, this "
                          f"model {labels}; register under another --registered-model-name")


@dataclass
class Candidate:
    """A logged (not yet registered) model and what the gate judges it on: its predictions on
    held-out examples, and the texts it trained on (left out of the comparison)."""

    model_uri: str
    labels: list[str]
    split: str
    texts: list[str]
    truth: np.ndarray
    preds: np.ndarray
    train_hashes: set[str]
    majority: int  # the most frequent training label: the baseline a first champion must beat
    contract: dict[str, str] = field(default_factory=dict)


def gather_evidence(client, name: str, champion, cand: Candidate, alpha: float) -> Evidence:
    """The candidate against the champion (or, for a first champion, the majority-class baseline) on
    the held-out examples that neither trained on."""
    from . import serving

    seen = set(cand.train_hashes)
    champion_hashes = serving.train_text_hashes(f"models:/{name}/{champion.version}") if champion else set()
    seen |= champion_hashes or set()
    keep = np.array([serving.text_hash(t) not in seen for t in cand.texts], dtype=bool)
    texts = [t for t, k in zip(cand.texts, keep, strict=True) if k]
    truth, preds = cand.truth[keep], cand.preds[keep]
    if not len(texts):
        raise ConfigError(f"every {cand.split} example also occurs in training data: the gate has nothing to judge on")
    notes = []
    if champion is None:
        other = np.full(len(texts), cand.majority)
        against, notes = f"majority class {cand.labels[cand.majority]!r}", ["first champion of this model"]
    else:
        _same_labels(name, champion.version, cand.labels)
        index = {label: i for i, label in enumerate(cand.labels)}
        other = np.array([index[p] for p in serving.load(f"models:/{name}/{champion.version}")
                          .classify(texts)["label"]])
        against = f"champion version {champion.version}"
        if champion_hashes is None:
            notes.append("the champion recorded no training texts: its own may be among these examples")
        notes += _contract_notes(client, champion, cand.contract)
    evidence = paired_evidence(preds == truth, other == truth, alpha, cand.split)
    if cand.split == "val":
        notes.append("judged on validation, the split that selected the candidate: biased in its favour")
    evidence.against, evidence.excluded_seen_in_training = against, int((~keep).sum())
    evidence.note = "; ".join(notes)
    return evidence


def _contract_notes(client, champion, contract: dict[str, str]) -> list[str]:
    if not contract:
        return []
    theirs = client.get_run(champion.run_id).data.tags
    same = all(theirs.get(k) == contract.get(k) for k in ("data.fingerprint.train", "data.split_seed"))
    return [] if same else ["the champion was trained on other data or another split"]


@contextlib.contextmanager
def gate_lock(client, name: str, wait: float = 300.0):
    """One gate decision at a time per registered model, across processes and machines: creating a
    registered model is atomic on every MLflow backend (its name is unique), so a marker model
    `<name>.gate-lock` is the lock. A marker older than LOCK_STALE (its holder died) is taken over."""
    import os
    import socket
    import time

    from mlflow.exceptions import MlflowException

    marker, deadline = f"{name}{LOCK_SUFFIX}", time.time() + wait
    holder = f"held by pid {os.getpid()} on {socket.gethostname()} for the promotion gate of {name}"
    while True:
        try:
            client.create_registered_model(marker, description=holder)
            break
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        with contextlib.suppress(MlflowException):
            held = client.get_registered_model(marker)
            if time.time() - held.creation_timestamp / 1000 > LOCK_STALE:
                client.delete_registered_model(marker)
                continue
        if time.time() > deadline:
            raise ConfigError(f"the promotion gate of {name!r} stays locked ({marker}); if no registration is "
                              f"running, delete the registered model {marker!r}")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(marker)


def register_gated(cand: Candidate, name: str, requested_alpha: float,
                   version_tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge a logged model, then, under the gate's lock and only if the champion is still the one it
    was judged against (compare-and-swap), register it with its evidence and move the aliases. A
    first candidate that does not beat the baseline is not registered. Returns the decision."""
    import mlflow

    client = mlflow.MlflowClient()
    alpha = min(policy_alpha(client, name), requested_alpha)  # a submitter may only be stricter
    for _ in range(MAX_REJUDGE):
        champion = champion_or_first(client, name)
        evidence = gather_evidence(client, name, champion, cand, alpha)
        with gate_lock(client, name):
            now = champion_or_first(client, name)
            if _version(now) != _version(champion):
                continue  # another candidate moved the champion meanwhile: judge again against it
            decision = _apply(client, name, cand, champion, evidence, version_tags or {})
        mlflow.log_dict(decision, "registry/decision.json")
        mlflow.set_tags({"registry.model": name, "registry.version": decision["candidate_version"] or "",
                         "registry.decision": decision["decision"]})
        return decision
    raise ConfigError(f"the champion of {name!r} changed {MAX_REJUDGE} times while this candidate was judged; "
                      f"register again")


def _version(model_version) -> str | None:
    return None if model_version is None else model_version.version


def _apply(client, name: str, cand: Candidate, champion, evidence: Evidence,
           version_tags: dict[str, Any]) -> dict[str, Any]:
    """Evidence and decision go in with the version itself; the aliases follow at once."""
    import mlflow

    if champion is None and not evidence.significant:
        decision = "refused"  # a first champion must beat the baseline; nothing is registered
        version = None
    else:
        decision = CHAMPION if evidence.significant else CHALLENGER
        tags = {**evidence.tags(), **{k: str(v) for k, v in version_tags.items()}, "decision": decision}
        version = mlflow.register_model(cand.model_uri, name, tags=tags).version
        if not client.get_registered_model(name).tags.get(POLICY_TAG):
            client.set_registered_model_tag(name, POLICY_TAG, str(DEFAULT_PROMOTION_ALPHA))
        if decision == CHAMPION and champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, decision, str(version))
    return {"model": name, "candidate_version": None if version is None else str(version), "decision": decision,
            "champion_version": _version(champion), **asdict(evidence)}


def describe(decision: dict[str, Any]) -> str:
    """The gate's decision in one readable line."""
    if decision.get("difference") is None:
        return f"{decision['model']}: {decision['decision']}"
    version = decision["candidate_version"]
    what = f"version {version} is {decision['decision']}" if version else "not registered (refused)"
    excluded = decision.get("excluded_seen_in_training") or 0
    return (f"{decision['model']}: {what}: {decision['split']} accuracy {decision['candidate_accuracy']:.3f} vs "
            f"{decision['champion_accuracy']:.3f} ({decision['against']}), difference "
            f"{decision['difference']:+.3f} [{decision['level']:.0%} CI {decision['ci_low']:+.3f}, "
            f"{decision['ci_high']:+.3f}], McNemar p {decision['p_value']:.3g}, n {decision['n']}"
            + (f" ({excluded} seen in training left out)" if excluded else ""))


def rollback(client, name: str) -> dict[str, str]:
    """`champion` back to `previous-champion`; the demoted version becomes `previous-champion`, so a
    second rollback undoes the first. `decision` tags keep what the gate decided at registration;
    `rollback` tags say which version a rollback restored and which it demoted."""
    from mlflow.exceptions import MlflowException

    with gate_lock(client, name):
        try:
            previous = client.get_model_version_by_alias(name, PREVIOUS)
        except MlflowException:
            raise ConfigError(f"registered model {name!r} has no previous-champion to roll back to") from None
        current = current_champion(client, name)
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        client.set_model_version_tag(name, previous.version, "rollback", "restored")
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, current.version)
            client.set_model_version_tag(name, current.version, "rollback", "demoted")
    return {CHAMPION: previous.version, PREVIOUS: current.version if current else ""}


def promote(client, name: str, version: str) -> str | None:
    """The owner's choice, without the gate: `version` becomes champion (recorded on the version)."""
    from mlflow.exceptions import MlflowException

    with gate_lock(client, name):
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise ConfigError(f"registered model {name!r} has no version {version}") from None
        current = current_champion(client, name)
        if current is not None and current.version != version:
            client.set_registered_model_alias(name, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "decision", "champion (promoted by hand)")
    return _version(current)


@dataclass
class Trained:
    """A trained model ready to publish, with what it was trained on."""

    model: Any
    tokenizer: Any
    splits: Any  # data.Splits
    temperature: float  # the softmax temperature the served model applies (1.0 = uncalibrated)
    contract: dict[str, str]  # data-contract tags (tracking.data_contract)


@dataclass
class HeldOut:
    """The model's predictions on held-out examples: the evidence the gate weighs."""

    split: str  # "test" when the test split was scored, else "val"
    ev: Any  # evaluate.Evaluation on that split
    metrics: dict[str, float] = field(default_factory=dict)  # as logged to the run, e.g. test/accuracy


def publish(trained: Trained, held_out: HeldOut, cfg: RunConfig,
            version_tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one way a trained model reaches the registry (a training run, a search's winner): log it
    as a servable classifier in the active run, then register it through the gate."""
    from . import serving, tracking
    from .modeling import servable

    splits = trained.splits
    hashes = serving.text_hashes(splits.train["text"])
    settings = {"max_length": cfg.data.max_length, "temperature": trained.temperature,
                "max_batch_size": cfg.tracking.max_batch_size}
    info = tracking.log_servable(servable(trained.model).cpu(), trained.tokenizer, settings, hashes)
    if held_out.metrics:
        tracking.link_to_model(info.model_id, held_out.metrics, cfg, splits, held_out.split)
    frame = splits.test if held_out.split == "test" else splits.val
    counts = splits.label_counts()
    cand = Candidate(model_uri=info.model_uri, labels=splits.labels, split=held_out.split,
                     texts=frame["text"].tolist(), truth=np.asarray(held_out.ev.labels),
                     preds=np.asarray(held_out.ev.preds), train_hashes=hashes,
                     majority=counts.index(max(counts)), contract=trained.contract)
    decision = register_gated(cand, cfg.tracking.registered_model_name, cfg.tracking.promotion_alpha, version_tags)
    click.echo(describe(decision), err=True)
    return decision


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def registry() -> None:
    """Model registry actions."""


NAME_OPTION = click.option("--registered-model-name", required=True, help="The registered model.")


def _client_or_fail():
    import mlflow

    from .tracking import check_reachable

    try:
        check_reachable()
    except ConfigError as exc:
        fail(exc)
    return mlflow.MlflowClient()


@registry.command("rollback")
@NAME_OPTION
def rollback_command(registered_model_name: str) -> None:
    """Point `champion` back at `previous-champion` (run it again to undo)."""
    client = _client_or_fail()
    try:
        moved = rollback(client, registered_model_name)
    except ConfigError as exc:
        fail(exc)
        return
    click.echo(f"{registered_model_name}: champion -> version {moved['champion']}, "
               f"previous-champion -> version {moved['previous-champion']}")


@registry.command("promote")
@NAME_OPTION
@click.option("--version", required=True, help="The version that becomes champion, without the gate.")
def promote_command(registered_model_name: str, version: str) -> None:
    """Make a version champion by hand (the owner's choice, recorded on the version)."""
    client = _client_or_fail()
    try:
        before = promote(client, registered_model_name, version)
    except ConfigError as exc:
        fail(exc)
        return
    click.echo(f"{registered_model_name}: champion -> version {version}"
               + (f", previous-champion -> version {before}" if before and before != version else ""))


@registry.command("policy")
@NAME_OPTION
@click.option("--alpha", type=float, help="Promotion level: a candidate must beat the champion at p < alpha.")
def policy_command(registered_model_name: str, alpha: float | None) -> None:
    """Show or set the registered model's promotion level; submitters may only be stricter."""
    from mlflow.exceptions import MlflowException

    client = _client_or_fail()
    try:
        client.get_registered_model(registered_model_name)
    except MlflowException:
        fail(ConfigError(f"no registered model {registered_model_name!r}"))
    if alpha is not None:
        if not 0.0 < alpha < 1.0:
            fail(ConfigError(f"--alpha must be between 0 and 1 exclusive, got {alpha}"))
        client.set_registered_model_tag(registered_model_name, POLICY_TAG, str(alpha))
    click.echo(f"{registered_model_name}: promotion alpha {policy_alpha(client, registered_model_name)}")


if __name__ == "__main__":
    main(registry, "python -m src.registry")
