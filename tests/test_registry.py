"""The promotion gate on a real MLflow registry, with real classifiers whose answers are known.

Each model is a tiny encoder trained to label texts by their first word, one of 8 (tests/builders.py),
so its predictions on the gate's 400 distinct held-out texts, its accuracy and every paired comparison
are exact.
"""

import json
import os
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest

from src.base.config import ConfigError
from src.core.promotion import paired_evidence
from src.mlflow_io.gate import (
    check_registration,
    current_champion,
    gate_lock,
    register_gated,
    rollback,
)
from tests.builders import GATE_TEXTS, answers_for, gate_truth, lookup_classifier, submit_logged
from tests.conftest import ROOT

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

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
    version = tracking.get_model_version("first", first["candidate_version"])
    assert version.tags["decision"] == "champion" and len(version.tags) <= 8
    assert all(v != "" for v in version.tags.values())  # only tags with a value
    # the version reads like a decision: the gate's sentence is its description
    assert version.description.startswith("first: version 1 is champion: test accuracy 0.897 vs 0.448 (majority "
                                          "class '0'), difference +0.450")
    assert "n 400 distinct texts" in version.description
    assert tracking.get_registered_model("first").tags["promotion.alpha"] == "0.05"
    assert tracking.get_registered_model("first").tags["promotion.min_texts"] == "100"


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
    assert "promotion policy alpha 0.05, min_texts 100" in registry_cli("policy", "--registered-model-name",
                                                                        "policy").stdout
    owner = registry_cli("policy", "--registered-model-name", "policy", "--alpha", "0.99")
    assert owner.returncode == 0 and "promotion policy alpha 0.99, min_texts 100" in owner.stdout
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
    assert versions(tracking, "race.gate-lock") == []  # every ticket of the lock's queue was given back


def test_rollback_command_without_a_previous_champion(tracking):
    tracking.create_registered_model("lonely")
    proc = registry_cli("rollback", "--registered-model-name", "lonely")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: registered model 'lonely' has no previous-champion to " \
                                                   "roll back to"


def test_duplicates_count_once_and_too_few_texts_never_promote(tracking, models):
    """One text repeated 200 times, on which the candidate is right and the champion wrong, is one
    piece of evidence; and clear evidence from fewer distinct texts than the policy's minimum does
    not promote either."""
    mlflow.set_experiment("gate-duplicates")
    submit(models, "E", "duplicates")  # champion E: wrong on the texts of word 7 that carry its label
    one = next(i for i, t in enumerate(GATE_TEXTS) if t.startswith("story") and gate_truth()[i] == 0)
    model, tokenizer = models["A"]
    with mlflow.start_run(run_name="repeated"):
        cand = submit_logged(model, tokenizer, answers_for(), texts=[GATE_TEXTS[one]] * 200, truth=[0] * 200)
        repeated = register_gated(cand, "duplicates", 0.05)
    assert repeated["decision"] == "challenger" and repeated["n"] == 1 and repeated["duplicates_dropped"] == 199
    assert "(199 duplicates left out)" in tracking.get_model_version("duplicates",
                                                                     repeated["candidate_version"]).description
    # 60 distinct texts where A is right and E is wrong on 24: significant, but under the minimum of 100
    few = [i for i, t in enumerate(GATE_TEXTS) if t.split()[0] in ("story", "great")][:60]
    with mlflow.start_run(run_name="few"):
        cand = submit_logged(model, tokenizer, answers_for(), texts=[GATE_TEXTS[i] for i in few],
                             truth=gate_truth()[few])
        scarce = register_gated(cand, "duplicates", 0.05)
    assert scarce["n"] == 60 and scarce["p_value"] < 0.05 and scarce["decision"] == "challenger"
    assert "fewer than the 100 distinct texts the policy needs" in tracking.get_model_version(
        "duplicates", scarce["candidate_version"]).description


def test_gate_lock_trusts_no_clock_and_frees_only_its_own_ticket(tracking, monkeypatch):
    """A waiter whose clock runs 11 minutes ahead does not take a lock held a moment ago, and giving up
    it removes only its own ticket: the holder keeps the lock."""
    name = "clock-skew"
    real = time.time
    with gate_lock(tracking, name):
        held = [v.version for v in versions(tracking, f"{name}.gate-lock")]
        monkeypatch.setattr(time, "time", lambda: real() + 660)
        with pytest.raises(ConfigError, match="stays locked"), gate_lock(tracking, name, wait=3.0):
            pass
        assert [v.version for v in versions(tracking, f"{name}.gate-lock")] == held
    assert versions(tracking, f"{name}.gate-lock") == []


def test_two_waiters_on_a_stale_lock_hold_it_one_at_a_time(tracking):
    """A dead holder's ticket, watched unchanged for `stale` seconds, is removed by number; the two
    waiters then hold the lock in turn, never together."""
    name = "stale-lock"
    tracking.create_registered_model(f"{name}.gate-lock")
    dead = tracking.create_model_version(f"{name}.gate-lock", source="gate-lock:/dead-holder", await_creation_for=0)
    spans, errors = [], []

    def waiter() -> None:
        try:
            with gate_lock(mlflow.MlflowClient(), name, wait=60.0, stale=2.0):
                start = time.monotonic()
                time.sleep(1.0)
                spans.append((start, time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # one holder at a time
    assert versions(tracking, f"{name}.gate-lock") == []
    assert dead.version not in [v.version for v in versions(tracking, f"{name}.gate-lock")]
