"""The promotion gate, its evidence and rollback, on a real MLflow registry.

Champion and candidates are pyfunc models that answer from a fixed table, so their prediction
vectors, and therefore the evidence, are known exactly.
"""

import mlflow
import numpy as np
import pandas as pd
import pytest

from src.config import ConfigError
from src.registry import check_label_map, current_champion, decide, gather_evidence, paired_evidence, rollback

N = 400
NAME = "gated"


class Lookup(mlflow.pyfunc.PythonModel):
    """Predicts the label stored for each text in its model config."""

    def load_context(self, context):
        self.answers = context.model_config["answers"]

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return pd.DataFrame({"label": [self.answers[t] for t in model_input["text"]]})


def vectors(seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, N)
    texts = [f"review {i}" for i in range(N)]
    return texts, truth, rng


def with_accuracy(truth, accuracy, rng):
    """Predictions right on exactly `accuracy` of the examples, at random positions."""
    preds = truth.copy()
    wrong = rng.choice(N, size=int(round(N * (1 - accuracy))), replace=False)
    preds[wrong] = 1 - preds[wrong]
    return preds


def register(texts, preds):
    with mlflow.start_run(run_name="lookup-model"):
        info = mlflow.pyfunc.log_model(name="model", python_model=Lookup(), registered_model_name=NAME,
                                       model_config={"answers": {t: str(p) for t, p in zip(texts, preds, strict=True)}})
    return str(info.registered_model_version)


def test_paired_evidence_from_known_vectors():
    texts, truth, rng = vectors()
    strong, weak = with_accuracy(truth, 0.92, rng), with_accuracy(truth, 0.70, rng)
    better = paired_evidence(strong == truth, weak == truth, alpha=0.05, split="test")
    assert better.significant and better.p_value < 1e-6 and better.ci_low > 0
    assert better.difference == pytest.approx(0.22) and better.n == N
    assert better.only_candidate_right - better.only_champion_right == round(0.22 * N)
    # the same accuracy with other mistakes: indistinguishable
    a, b = with_accuracy(truth, 0.80, rng), with_accuracy(truth, 0.80, rng)
    same = paired_evidence(a == truth, b == truth, alpha=0.05, split="test")
    assert not same.significant and same.p_value == pytest.approx(1.0) and same.ci_low < 0 < same.ci_high
    # a small gain on few disagreements: real but not shown
    slight = np.zeros(N, bool), np.zeros(N, bool)
    slight[0][:12], slight[1][12:20] = True, True
    small = paired_evidence(slight[0], slight[1], alpha=0.05, split="test")
    assert small.difference > 0 and not small.significant and small.p_value > 0.05


def test_gate_promotes_only_with_evidence_and_rollback_restores(tracking, tmp_path):
    mlflow.set_experiment("registry-gate")
    texts, truth, rng = vectors(1)
    labels = ["0", "1"]
    first, strong = with_accuracy(truth, 0.70, rng), with_accuracy(truth, 0.90, rng)

    champion, evidence = gather_evidence(tracking, NAME, labels, first, truth, texts, 0.05, "test")
    assert champion is None and evidence.significant  # nothing to beat: the first version is champion
    v1 = register(texts, first)
    decide(tracking, NAME, v1, champion, evidence, labels)
    assert current_champion(tracking, NAME).version == v1
    assert tracking.get_model_version(NAME, v1).tags["evidence.note"] == "first champion of this model"

    # clearly better: promoted, the old champion keeps an alias, the evidence is on the version
    champion, evidence = gather_evidence(tracking, NAME, labels, strong, truth, texts, 0.05, "test")
    assert champion.version == v1 and evidence.champion_accuracy == pytest.approx(0.70)
    v2 = register(texts, strong)
    decision = decide(tracking, NAME, v2, champion, evidence, labels)
    assert decision["alias"] == "champion" and decision["p_value"] < 1e-6
    assert current_champion(tracking, NAME).version == v2
    assert tracking.get_model_version_by_alias(NAME, "previous-champion").version == v1
    tags = tracking.get_model_version(NAME, v2).tags
    assert float(tags["evidence.ci_low"]) > 0 and tags["evidence.n"] == str(N) and tags["decision"] == "champion"
    assert float(tags["evidence.candidate_accuracy"]) == pytest.approx(0.90)

    # indistinguishable from the champion: challenger, champion unchanged
    peer = with_accuracy(truth, 0.90, rng)
    champion, evidence = gather_evidence(tracking, NAME, labels, peer, truth, texts, 0.05, "test")
    v3 = register(texts, peer)
    assert decide(tracking, NAME, v3, champion, evidence, labels)["alias"] == "challenger"
    assert current_champion(tracking, NAME).version == v2
    assert tracking.get_model_version_by_alias(NAME, "challenger").version == v3
    assert float(tracking.get_model_version(NAME, v3).tags["evidence.p_value"]) > 0.05

    # one command rolls back, and a second undoes it
    assert rollback(tracking, NAME) == {"champion": v1, "previous-champion": v2}
    assert current_champion(tracking, NAME).version == v1
    assert tracking.get_model_version(NAME, v2).tags["rollback"] == "demoted"
    assert tracking.get_model_version(NAME, v2).tags["decision"] == "champion"  # what the gate decided stays
    rollback(tracking, NAME)
    assert current_champion(tracking, NAME).version == v2

    # a candidate with another label map is refused before anything is registered
    versions = len(tracking.search_model_versions(f"name = '{NAME}'"))
    with pytest.raises(ConfigError, match=r"has labels \['0', '1'\], this model \['neg', 'pos'\]"):
        gather_evidence(tracking, NAME, ["neg", "pos"], strong, truth, texts, 0.05, "test")
    assert len(tracking.search_model_versions(f"name = '{NAME}'")) == versions
    # ... and a training run checks the same before its first step
    check_label_map(NAME, ["0", "1"])
    with pytest.raises(ConfigError, match="register under another --registered-model-name"):
        check_label_map(NAME, ["neg", "pos"])


def test_evidence_notes_a_champion_trained_on_other_data(tracking):
    mlflow.set_experiment("registry-contract")
    texts, truth, rng = vectors(2)
    first = with_accuracy(truth, 0.7, rng)
    with mlflow.start_run(run_name="lookup-model", tags={"data.fingerprint.train": "aaaa", "data.split_seed": "42"}):
        info = mlflow.pyfunc.log_model(name="model", python_model=Lookup(), registered_model_name="contract",
                                       model_config={"answers": {t: str(p) for t, p in zip(texts, first, strict=True)}})
    tracking.set_registered_model_alias("contract", "champion", info.registered_model_version)
    tracking.set_model_version_tag("contract", info.registered_model_version, "labels", '["0", "1"]')
    candidate = with_accuracy(truth, 0.9, rng)
    same = {"data.fingerprint.train": "aaaa", "data.split_seed": "42"}
    _, evidence = gather_evidence(tracking, "contract", ["0", "1"], candidate, truth, texts, 0.05, "test", same)
    assert evidence.same_training_data is True and evidence.note == ""
    other = {"data.fingerprint.train": "bbbb", "data.split_seed": "42"}
    _, evidence = gather_evidence(tracking, "contract", ["0", "1"], candidate, truth, texts, 0.05, "val", other)
    assert evidence.same_training_data is False
    assert "trained on other data" in evidence.note and "judged on validation" in evidence.note


def test_rollback_command_without_a_previous_champion(tracking):
    import subprocess
    import sys

    from tests.conftest import ROOT

    tracking.create_registered_model("lonely")
    proc = subprocess.run([sys.executable, "-m", "src.registry", "rollback", "--registered-model-name", "lonely"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: registered model 'lonely' has no previous-champion to " \
                                                   "roll back to"
