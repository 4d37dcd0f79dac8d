"""The promotion gate on the MLflow Model Registry: judge a logged model against the current champion,
register it with its evidence, move the aliases. Every Model Registry call of the project is here.

Aliases, not stages (deprecated in MLflow 3): `champion` is what serving loads
(`models:/NAME@champion`), `challenger` a registered candidate that did not beat it with evidence,
and `previous-champion` the version a promotion replaced, so one command rolls back
(`python -m src.registry rollback`). The rule itself (statistics and decision) is promotion.py; the
policy (alpha, fewest distinct texts) is the registered model's, set by its owner. Every model is
read through `serving.load`: its files checked against their recorded digests, nothing unpickled.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base.config import ConfigError
from ..base.names import CHALLENGER, CHAMPION, PREVIOUS
from ..core import promotion
from . import serving
from .tracking import local_path

LOCK_SUFFIX = ".gate-lock"
LOCK_STALE = 600.0  # seconds a waiter sees the same ticket at the head before it takes it for a dead holder's
MAX_REJUDGE = 5
VERSION_TAGS = ("split", "n", "difference", "p_value")  # of the evidence, beside `decision` and `files.sha256`


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


def policy(client, name: str) -> promotion.Policy:
    """The registered model's promotion policy; the defaults until its owner sets one."""
    from mlflow.exceptions import MlflowException

    try:
        return promotion.Policy.from_tags(client.get_registered_model(name).tags)
    except MlflowException:
        return promotion.Policy()


def version_labels(name: str, version: str) -> list[str]:
    """The label map a version was logged with, from its (checked) classifier.json."""
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        _, config = serving.fetch(f"models:/{name}/{version}", Path(tmp), weights=False)
    return list(config.get("labels") or [])


def check_registration(name: str, labels: list[str]) -> None:
    """Before training: a registration the gate would refuse (label map, no champion) fails now."""
    import mlflow

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
    files_digest: str = ""  # serving.manifest_digest of the logged model's files: recorded on the version


def gather_evidence(client, name: str, champion, cand: Candidate, rule: promotion.Policy) -> promotion.Evidence:
    """The candidate against the champion (or, for a first champion, the majority-class baseline) on
    the distinct held-out texts that neither trained on."""

    champion_hashes = serving.train_text_hashes(f"models:/{name}/{champion.version}") if champion else set()
    seen = set(cand.train_hashes) | (champion_hashes or set())
    hashes = [serving.text_hash(t) for t in cand.texts]
    first = promotion.distinct(hashes)
    keep = first & np.array([h not in seen for h in hashes], dtype=bool)
    texts = [t for t, k in zip(cand.texts, keep, strict=True) if k]
    if not texts:
        raise ConfigError(f"every {cand.split} example also occurs in training data: the gate has nothing to judge on")
    notes = []
    if champion is None:
        other = np.full(len(texts), cand.majority)
        against, notes = f"majority class {cand.labels[cand.majority]!r}", ["first champion of this model"]
    else:
        _same_labels(name, champion.version, cand.labels)
        index = {label: i for i, label in enumerate(cand.labels)}
        answers = serving.load(f"models:/{name}/{champion.version}").classify(texts)["label"]
        other = np.array([index[p] for p in answers])
        against = f"champion version {champion.version}"
        if champion_hashes is None:
            notes.append("the champion recorded no training texts: its own may be among these examples")
        notes += _contract_notes(client, champion, cand.contract)
    truth, preds = cand.truth[keep], cand.preds[keep]
    evidence = promotion.paired_evidence(preds == truth, other == truth, rule.alpha, cand.split)
    if cand.split == "val":
        notes.append("judged on validation, the split that selected the candidate: biased in its favour")
    evidence.against, evidence.min_texts = against, rule.min_texts
    evidence.excluded_seen_in_training = int((first & ~keep).sum())
    evidence.duplicates_dropped = int((~first).sum())
    evidence.note = "; ".join(notes)
    return evidence


def _contract_notes(client, champion, contract: dict[str, str]) -> list[str]:
    if not contract:
        return []
    theirs = client.get_run(champion.run_id).data.tags
    same = all(theirs.get(k) == contract.get(k) for k in ("data.fingerprint.train", "data.split_seed"))
    return [] if same else ["the champion was trained on other data or another split"]


@contextlib.contextmanager
def gate_lock(client, name: str, wait: float = 300.0, stale: float = LOCK_STALE):
    """One gate decision at a time per registered model, across processes and machines, trusting no
    clock but the waiter's own. The lock is a queue of tickets: the versions of a marker model
    `<name>.gate-lock`, whose numbers MLflow assigns atomically and never reuses. A process takes a
    ticket, holds the lock while its ticket is the oldest left, and releases by deleting its own ticket
    by number, so it never frees another's. A waiter that has watched the same ticket at the head for
    `stale` seconds of its own monotonic clock deletes that ticket, by number: a newer holder's is
    never touched, and two waiters doing it at once delete the same one."""
    import os
    import socket
    import uuid

    from mlflow.exceptions import MlflowException

    marker = f"{name}{LOCK_SUFFIX}"
    with contextlib.suppress(MlflowException):  # exists already: fine
        client.create_registered_model(marker, description=f"Queue of the promotion gate of {name}: a version is a "
                                       f"registration in progress or waiting (src/gate.py).")
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    mine = int(client.create_model_version(marker, source=f"gate-lock:/{uuid.uuid4().hex}", description=holder,
                                           await_creation_for=0).version)
    try:
        _wait_for_turn(client, marker, mine, wait, stale)
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_model_version(marker, str(mine))


def _wait_for_turn(client, marker: str, mine: int, wait: float, stale: float) -> None:
    import time

    from mlflow.exceptions import MlflowException

    deadline, head_seen, since = time.monotonic() + wait, None, 0.0
    while True:
        tickets = sorted(int(v.version) for v in client.search_model_versions(f"name = '{marker}'"))
        if mine not in tickets:
            raise ConfigError(f"this process's ticket in {marker!r} was removed as stale while it waited; register "
                              f"again")
        head = tickets[0]
        if head == mine:
            return
        now = time.monotonic()
        if head != head_seen:
            head_seen, since = head, now
        elif now - since > stale:
            with contextlib.suppress(MlflowException):  # another waiter may have removed it first
                client.delete_model_version(marker, str(head))
            continue
        if now > deadline:
            raise ConfigError(f"the promotion gate stays locked by version {head} of {marker!r}; if no registration "
                              f"is running, delete that version")
        time.sleep(0.5)


def register_gated(cand: Candidate, name: str, requested_alpha: float,
                   version_tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge a logged model, then, under the gate's lock and only if the champion is still the one it
    was judged against (compare-and-swap), register it with its evidence and move the aliases. A
    first candidate that does not beat the baseline is not registered. Returns the decision."""
    import dataclasses

    import mlflow

    client = mlflow.MlflowClient()
    rule = policy(client, name)
    rule = dataclasses.replace(rule, alpha=min(rule.alpha, requested_alpha))  # a submitter may only be stricter
    for _ in range(MAX_REJUDGE):
        champion = champion_or_first(client, name)
        evidence = gather_evidence(client, name, champion, cand, rule)
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


def _apply(client, name: str, cand: Candidate, champion, evidence: promotion.Evidence,
           version_tags: dict[str, Any]) -> dict[str, Any]:
    """The version goes in with its decision sentence as description and a few tags (the whole
    evidence is the run's registry/decision.json); the aliases follow at once."""

    verdict = promotion.decide(evidence, first=champion is None)
    decision = {"model": name, "candidate_version": None, "decision": verdict, "champion_version": _version(champion),
                **evidence.as_dict(), **({"submitted": version_tags} if version_tags else {})}
    if verdict == promotion.REFUSED:
        return decision  # a first champion must beat the baseline; nothing is registered
    shown = {f"evidence.{k}": _short(getattr(evidence, k)) for k in VERSION_TAGS}
    tags = {"decision": verdict, **shown, **({"files.sha256": cand.files_digest} if cand.files_digest else {})}
    version = _register(client, name, cand.model_uri, tags)
    decision["candidate_version"] = version
    client.update_model_version(name, version, description=promotion.describe(decision))
    if not client.get_registered_model(name).tags.get(promotion.Policy.tag("alpha")):
        for key, value in promotion.Policy().tags().items():
            client.set_registered_model_tag(name, key, value)
    if verdict == CHAMPION and champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
    client.set_registered_model_alias(name, CHAMPION if verdict == CHAMPION else CHALLENGER, version)
    return decision


def _register(client, name: str, model_uri: str, tags: dict[str, str]) -> str:
    """A new version of `name` from a logged model: MLflow's `register_model` without its console
    lines (the gate prints its own decision)."""
    from mlflow.exceptions import MlflowException

    stored = serving.resolve(model_uri)
    with contextlib.suppress(MlflowException):  # exists already
        client.create_registered_model(name)
    return str(client.create_model_version(name, source=f"models:/{stored.model_id}", run_id=stored.run_id or None,
                                           tags=tags, model_id=stored.model_id, await_creation_for=0).version)


def _short(value: Any) -> str:
    return str(round(value, 4) if isinstance(value, float) else value)


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


def seal(client, name: str, version: str) -> dict[str, str]:
    """Record the digests of a version's files as they are now, for a model logged by a release that
    recorded none (trust on first use, by the model's owner): from then on it loads like any other."""
    import re
    from pathlib import Path

    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise ConfigError(f"registered model {name!r} has no version {version}") from None
    found = re.fullmatch(r"models:/(m-[0-9a-f]+)", mv.source or "")
    if not found:
        raise ConfigError(f"version {version} of {name!r} was not registered from a logged model; log it again")
    logged = client.get_logged_model(found.group(1))
    if logged.tags.get(serving.MANIFEST_TAG):
        raise ConfigError(f"version {version} of {name!r} has its digests already")
    with tempfile.TemporaryDirectory() as tmp:
        repo = get_artifact_repository(logged.artifact_location)
        repo.download_artifacts("artifacts", tmp)
        serving.refuse_code(Path(tmp) / "artifacts", f"version {version} of {name!r}")
        files = serving.manifest(Path(tmp))
    client.set_logged_model_tags(logged.model_id, {serving.MANIFEST_TAG: json.dumps(files)})
    client.set_model_version_tag(name, version, "files.sha256", serving.manifest_digest(files))
    return files
