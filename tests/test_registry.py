"""The promotion gate on a real MLflow registry, with real classifiers whose answers are known.

Each model is a tiny encoder trained to label 8 words a fixed way (tests/builders.py), so its
predictions on the gate's 400 held-out texts, its accuracy and every paired comparison are exact.
"""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from src.config import ConfigError
from src.registry import (
    check_registration,
    current_champion,
    paired_evidence,
    register_gated,
    rollback,
)
from tests.builders import answers_for, lookup_classifier, submit_logged
from tests.conftest import ROOT

N = 400
FLIPS = {"A": (), "B": (0,), "C": (0, 1), "coin": (0, 1, 2, 3), "E": (7,)}  # accuracy .9075 .7925 .6775 .4475 .8975


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


@pytest.fixture(scope="module")
def models(distilbert_dir):
    return {key: lookup_classifier(distilbert_dir, answers_for(flips)) for key, flips in FLIPS.items()}


def submit(models, key: str, name: str, alpha: float = 0.05, **kwargs) -> dict:
    model, tokenizer = models[key]
    with mlflow.start_run(run_name=f"candidate-{key}"):
        return register_gated(submit_logged(model, tokenizer, answers_for(FLIPS[key]), **kwargs), name, alpha)


def versions(client, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


def registry_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.registry", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


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


def test_first_champion_must_beat_the_majority_baseline(tracking, models):
    mlflow.set_experiment("gate-first")
    coin = submit(models, "coin", "first")
    assert coin["decision"] == "refused" and coin["candidate_version"] is None
    assert coin["against"] == "majority class '0'" and coin["p_value"] == pytest.approx(1.0)
    assert versions(tracking, "first") == []  # nothing registered: the next candidate is still first
    first = submit(models, "E", "first")
    assert first["decision"] == "champion" and first["candidate_accuracy"] == pytest.approx(0.8975)
    assert first["champion_accuracy"] == pytest.approx(0.4475) and first["p_value"] < 1e-6
    tags = tracking.get_model_version("first", first["candidate_version"]).tags
    assert tags["decision"] == "champion" and tags["evidence.against"] == "majority class '0'"
    assert all(v != "" for v in tags.values())  # only tags with a value
    assert tracking.get_registered_model("first").tags["promotion.alpha"] == "0.05"


def test_gate_promotes_only_with_evidence_and_rollback_restores(tracking, models):
    mlflow.set_experiment("gate")
    v1 = submit(models, "C", "gated")["candidate_version"]
    strong = submit(models, "A", "gated")
    assert strong["decision"] == "champion" and strong["against"] == f"champion version {v1}"
    assert strong["difference"] == pytest.approx(0.23) and strong["ci_low"] > 0
    v2 = strong["candidate_version"]
    assert current_champion(tracking, "gated").version == v2
    assert tracking.get_model_version_by_alias("gated", "previous-champion").version == v1
    weaker = submit(models, "B", "gated")
    assert weaker["decision"] == "challenger" and weaker["difference"] == pytest.approx(-0.115)
    assert tracking.get_model_version_by_alias("gated", "challenger").version == weaker["candidate_version"]
    assert current_champion(tracking, "gated").version == v2

    assert rollback(tracking, "gated") == {"champion": v1, "previous-champion": v2}
    assert tracking.get_model_version("gated", v2).tags["rollback"] == "demoted"
    assert tracking.get_model_version("gated", v2).tags["decision"] == "champion"  # what the gate decided stays
    rollback(tracking, "gated")
    assert current_champion(tracking, "gated").version == v2

    # another label map is refused before anything is registered, and before a training run starts
    count = len(versions(tracking, "gated"))
    model, tokenizer = models["A"]
    with mlflow.start_run(run_name="other-labels"):
        candidate = submit_logged(model, tokenizer, answers_for())
        candidate.labels = ["neg", "pos"]
        with pytest.raises(ConfigError, match=r"has labels \['0', '1'\], this model \['neg', 'pos'\]"):
            register_gated(candidate, "gated", 0.05)
    assert len(versions(tracking, "gated")) == count
    check_registration("gated", ["0", "1"])
    with pytest.raises(ConfigError, match="register under another --registered-model-name"):
        check_registration("gated", ["neg", "pos"])


def test_the_promotion_level_is_the_models_policy(tracking, models):
    mlflow.set_experiment("gate-policy")
    submit(models, "E", "policy")
    # +1% on 50 disagreements (p = 0.67): a submitter asking for alpha 0.99 does not get it
    loose = submit(models, "A", "policy", alpha=0.99)
    assert loose["decision"] == "challenger" and loose["level"] == pytest.approx(0.95)
    assert loose["difference"] == pytest.approx(0.01) and loose["p_value"] > 0.5
    assert "promotion alpha 0.05" in registry_cli("policy", "--registered-model-name", "policy").stdout
    owner = registry_cli("policy", "--registered-model-name", "policy", "--alpha", "0.99")
    assert owner.returncode == 0 and "promotion alpha 0.99" in owner.stdout
    assert submit(models, "A", "policy", alpha=0.99)["decision"] == "champion"
    stricter = submit(models, "B", "policy", alpha=0.01)
    assert stricter["level"] == pytest.approx(0.99)  # stricter than the policy: taken
    bad = registry_cli("policy", "--registered-model-name", "policy", "--alpha", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --alpha must be between 0 and 1 exclusive, got 1.5"


def test_a_model_without_champion_is_not_first(tracking, models):
    mlflow.set_experiment("gate-orphaned")
    v1 = submit(models, "E", "orphaned")["candidate_version"]
    tracking.delete_registered_model_alias("orphaned", "champion")
    with pytest.raises(ConfigError, match="has versions but no champion"):
        submit(models, "coin", "orphaned")
    with pytest.raises(ConfigError, match=r"src.registry promote --registered-model-name orphaned --version N"):
        check_registration("orphaned", ["0", "1"])
    assert len(versions(tracking, "orphaned")) == 1
    promoted = registry_cli("promote", "--registered-model-name", "orphaned", "--version", v1)
    assert promoted.returncode == 0, promoted.stderr
    assert current_champion(tracking, "orphaned").version == v1
    assert tracking.get_model_version("orphaned", v1).tags["decision"] == "champion (promoted by hand)"
    assert submit(models, "coin", "orphaned")["decision"] == "challenger"
    missing = registry_cli("promote", "--registered-model-name", "orphaned", "--version", "99")
    assert missing.stderr.strip() == "error: registered model 'orphaned' has no version 99"


def test_gate_leaves_out_texts_either_model_trained_on(tracking, models):
    mlflow.set_experiment("gate-seen")
    submit(models, "C", "seen", train_words=("great",))
    decision = submit(models, "A", "seen", train_words=("awful",))
    assert decision["excluded_seen_in_training"] == 100 and decision["n"] == 300
    # A and C disagree only on words 0 and 1, now both left out: nothing between them remains
    assert decision["difference"] == 0 and decision["decision"] == "challenger"


def test_concurrent_gates_leave_consistent_aliases(tracking, models, distilbert_dir, tmp_path):
    """Two candidates judged against the same champion at the same moment, in two processes: the
    one that beats the other holds `champion`, and the later registration was judged against the
    earlier one (compare-and-swap), not against the champion both started from."""
    mlflow.set_experiment("gate-race")
    first = submit(models, "C", "race")["candidate_version"]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = {key: subprocess.Popen([sys.executable, "-m", "tests.gate_worker", str(distilbert_dir), "race",
                                    ",".join(map(str, FLIPS[key])), str(barrier)], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
             for key in ("A", "B")}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    a, b = out["A"], out["B"]
    assert a["decision"] == "champion"
    assert current_champion(tracking, "race").version == a["candidate_version"]
    later, earlier = (a, b) if int(a["candidate_version"]) > int(b["candidate_version"]) else (b, a)
    assert later["champion_version"] == earlier["candidate_version"]  # judged against what it replaced
    for v in versions(tracking, "race"):
        aliases = set(tracking.get_model_version("race", v.version).aliases)
        if "champion" in aliases:
            assert v.tags["decision"] == "champion"
    if b["decision"] == "champion":  # B registered first, then A beat it
        assert tracking.get_model_version_by_alias("race", "previous-champion").version == b["candidate_version"]
    else:
        assert b["decision"] == "challenger" and b["champion_version"] == a["candidate_version"]
    assert first != a["candidate_version"]
    assert "race.gate-lock" not in [m.name for m in tracking.search_registered_models()]


def test_rollback_command_without_a_previous_champion(tracking):
    tracking.create_registered_model("lonely")
    proc = registry_cli("rollback", "--registered-model-name", "lonely")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: registered model 'lonely' has no previous-champion to " \
                                                   "roll back to"
