"""Calibration, slices, class imbalance and the data contract: computed, logged and served."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from src.base.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from src.core.data import load_splits, tokenize
from src.core.evaluate import (
    Evaluation,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    length_slices,
    slice_table,
)
from src.core.inference import apply_temperature
from src.core.loop import fit, predict, seed_everything
from src.core.modeling import build_model, load_tokenizer
from src.flows.finetune import finetune
from src.mlflow_io.serving import TextClassifier
from tests.builders import sentiment_frame
from tests.conftest import artifact_paths

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def overconfident(n, accuracy, seed):
    """Binary predictions right `accuracy` of the time, each made with 95-99.9% confidence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    preds = np.where(rng.random(n) < accuracy, labels, 1 - labels)
    conf = rng.uniform(0.95, 0.999, n)
    probs = np.empty((n, 2))
    probs[np.arange(n), preds] = conf
    probs[np.arange(n), 1 - preds] = 1 - conf
    return Evaluation(labels=labels, probs=probs, loss=0.0)


def test_ece_and_brier_of_known_cases():
    labels = np.array([1] * 6 + [0] * 4)
    probs = np.tile([0.1, 0.9], (10, 1))  # always 90% sure of class 1, right 60% of the time
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)
    assert brier_score(probs, labels) == pytest.approx(0.6 * 2 * 0.01 + 0.4 * 2 * 0.81)
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(perfect, labels) == 0 and brier_score(perfect, labels) == 0


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    val, test = overconfident(2000, 0.75, seed=0), overconfident(2000, 0.75, seed=1)
    before = expected_calibration_error(test.probs, test.labels)
    temperature = fit_temperature(val)  # fitted on validation only
    after_probs = apply_temperature(test.probs, temperature)
    after = expected_calibration_error(after_probs, test.labels)
    assert temperature > 1.5 and before > 0.2 and after < before / 4, (temperature, before, after)
    assert (after_probs.argmax(1) == test.probs.argmax(1)).all()  # accuracy untouched
    assert brier_score(after_probs, test.labels) < brier_score(test.probs, test.labels)


def test_length_slices_and_their_table():
    lengths = np.array([5, 100, 128, 129, 300, 511, 512])
    slices = length_slices(lengths, 512)
    assert slices == ["1-128", "1-128", "1-128", "129-256", "257-384", "385-511", "512 (truncated)"]
    ev = Evaluation(labels=np.array([0, 1, 0, 1, 0, 1, 1]),
                    probs=np.eye(2)[[0, 1, 1, 1, 0, 0, 1]], loss=0.0)
    table = slice_table(ev, slices, ["neg", "pos"])
    rows = {(k, s): (n, a, e) for k, s, n, a, e in
            zip(table["kind"], table["slice"], table["n"], table["accuracy"], table["errors"], strict=True)}
    assert rows[("length", "1-128")] == (3, pytest.approx(0.6667), 1)
    assert rows[("length", "385-511")] == (1, 0.0, 1)
    assert rows[("class", "pos")] == (4, 0.75, 1) and rows[("class", "neg")] == (3, pytest.approx(0.6667), 1)
    assert sum(n for k, n in zip(table["kind"], table["n"], strict=True) if k == "length") == len(lengths)


@pytest.fixture(scope="module")
def imbalanced_files(tmp_path_factory):
    """Train: 1 positive per 22 negatives; test: balanced, so minority recall is measured on many examples."""
    d = tmp_path_factory.mktemp("imbalanced")
    frame = sentiment_frame(1000, seed=5)
    train = pd.concat([frame[frame.label == 0].head(450), frame[frame.label == 1].head(20)])
    train.sample(frac=1, random_state=0).to_parquet(d / "train.parquet")
    sentiment_frame(300, seed=6).to_parquet(d / "test.parquet")
    return d / "train.parquet", d / "test.parquet"


def minority_recall(model_dir, files, class_weights):
    splits = load_splits(DataConfig(train_data=str(files[0]), test_data=str(files[1])))
    tok = load_tokenizer(str(model_dir))
    train, val, test = (tokenize(df, tok, 128) for df in (splits.train, splits.val, splits.test))
    seed_everything(0)
    model = build_model(str(model_dir), "lora", splits.labels, LoraConfig())
    # One short epoch: long enough to learn the majority class, too short to catch up on the minority
    # without weights.
    cfg = TrainConfig(epochs=1, batch_size=16, learning_rate=2e-3, seed=0, class_weights=class_weights)
    fit(model, train, val, cfg, 2e-3, 2, tok.pad_token_id)
    import torch

    ev = predict(model, test, 64, tok.pad_token_id, torch.device("cpu"), torch.float32)
    return float(((ev.preds == 1) & (ev.labels == 1)).sum() / (ev.labels == 1).sum())


def test_class_weights_raise_minority_recall(distilbert_dir, imbalanced_files):
    plain = minority_recall(distilbert_dir, imbalanced_files, "")
    balanced = minority_recall(distilbert_dir, imbalanced_files, "balanced")
    explicit = minority_recall(distilbert_dir, imbalanced_files, "1,9")
    assert balanced > plain + 0.1 and explicit > plain + 0.1, (plain, balanced, explicit)


def test_class_weight_values():
    assert TrainConfig(class_weights="balanced").loss_weights([450, 50]) == pytest.approx([500 / 900, 500 / 100])
    three = TrainConfig(class_weights="balanced").loss_weights([10, 10, 20])
    assert three == pytest.approx([40 / 30, 40 / 30, 40 / 60])
    assert TrainConfig(class_weights="1,9").loss_weights([450, 50]) == [1.0, 9.0]
    assert TrainConfig().loss_weights([450, 50]) is None


def test_calibrated_weighted_run_is_logged_served_and_guarded(tracking, distilbert_dir, imbalanced_files, tmp_path):
    cfg = RunConfig.from_flat({
        "model": str(distilbert_dir), "train_data": str(imbalanced_files[0]), "test_data": str(imbalanced_files[1]),
        "epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "max_length": 128, "checkpoint_dir": "",
        "class_weights": "balanced", "temperature_scaling": True, "registered_model_name": "calibrated-tiny",
        "experiment_name": "quality"})
    out = finetune(cfg)
    run = tracking.get_run(out.run_id)
    m, tags = run.data.metrics, run.data.tags
    temperature = m["calibration/temperature"]
    for key in ("test/ece", "test/brier", "test/ece_uncalibrated", "test/brier_uncalibrated", "val/best_ece",
                "test/recall_0", "test/recall_1", "test/precision_1", "test/f1_0"):
        assert key in m, key
    assert run.data.params["class_weights"] == "balanced" and run.data.params["temperature_scaling"] == "True"
    files = set(artifact_paths(tracking, out.run_id))
    assert {"test/reliability.png", "test/slices.png", "test/slices.json", "val/reliability.png"} <= files

    slices = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="test/slices.json",
                                                                 dst_path=str(tmp_path))).read_text())
    frame = pd.DataFrame(slices["data"], columns=slices["columns"])
    assert frame.loc[frame.kind == "length", "n"].sum() == int(run.data.params["test_size"])
    assert set(frame.loc[frame.kind == "class", "slice"]) == {"0", "1"}
    recall_1 = frame.loc[(frame.kind == "class") & (frame.slice == "1"), "accuracy"].item()
    assert recall_1 == pytest.approx(m["test/recall_1"], abs=1e-4)  # a class slice's accuracy is its recall

    # the data contract: fingerprints, split seed, label map and tokenizer on the run
    assert len(tags["data.fingerprint.train"]) == 16 and tags["data.split_seed"] == "42"
    assert json.loads(tags["data.label_map"]) == ["0", "1"] and len(tags["tokenizer.hash"]) == 16

    # the registered model applies the temperature: its probabilities are the calibrated ones
    model = mlflow.pyfunc.load_model("models:/calibrated-tiny/1")
    classifier = model.unwrap_python_model()
    assert classifier.temperature == pytest.approx(temperature)
    texts = pd.read_parquet(imbalanced_files[1])["text"].head(40).tolist()
    served = model.predict(pd.DataFrame({"text": texts}))[["prob_0", "prob_1"]].to_numpy()
    classifier.temperature = 1.0
    raw = classifier.classify(texts)[["prob_0", "prob_1"]].to_numpy()
    assert np.allclose(served, apply_temperature(raw, temperature), atol=1e-6)
    assert tracking.get_model_version_by_alias("calibrated-tiny", "champion").version == "1"

    # a model folder whose label map differs from what training recorded refuses to load
    root = Path(mlflow.artifacts.download_artifacts("models:/calibrated-tiny/1", dst_path=str(tmp_path / "m")))
    folder, config = root / "artifacts" / "weights", json.loads((root / "artifacts" / "classifier.json").read_text())
    TextClassifier().load(str(folder), config)
    with pytest.raises(ValueError, match=r"has labels \['0', '1'\], its training recorded \['neg', 'pos'\]"):
        TextClassifier().load(str(folder), {**config, "labels": ["neg", "pos"]})
