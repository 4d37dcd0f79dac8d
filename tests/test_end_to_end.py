"""`mlflow run . -e lora|full` as a user runs it, against a real `mlflow server` on 127.0.0.1."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import BIN, COMMON_METRICS, ROOT, artifact_paths, mlflow_run, only_run

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow
# What each run's `mlflow run` printed (stdout, then stderr), by entry point.
CONSOLE: dict[str, str] = {}
# Library progress bars that say nothing a user acts on (src/cli.py: quiet_libraries).
CHATTER = ("Loading weights", "Downloading artifacts")


@pytest.fixture(scope="module")
def lora_run(tracking, distilbert_dir, data_files, tmp_path_factory):
    params = {"model": distilbert_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 3,
              "batch_size": 16, "learning_rate": "5e-3", "lora_r": 4, "registered_model_name": "tiny-sentiment"}
    proc = mlflow_run("lora", params, "e2e-lora", cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    CONSOLE["lora"] = proc.stdout + proc.stderr
    return only_run(tracking, "e2e-lora")


@pytest.fixture(scope="module")
def full_run(tracking, distilbert_dir, data_files, tmp_path_factory):
    params = {"model": distilbert_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 2,
              "batch_size": 16, "learning_rate": "1e-3"}
    proc = mlflow_run("full", params, "e2e-full", cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    CONSOLE["full"] = proc.stdout + proc.stderr
    return only_run(tracking, "e2e-full")


def logged_model(client, run):
    (output,) = run.outputs.model_outputs
    return client.get_logged_model(output.model_id)


def test_lora_run_is_tracked_completely(tracking, lora_run):
    run = lora_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lora-r4-a32-lr5e-3"
    assert run.data.tags["strategy"] == "lora" and run.data.tags["dataset"] == "train.parquet"
    p = run.data.params
    assert p["lora_r"] == "4" and float(p["learning_rate"]) == 5e-3
    assert int(p["trainable_params"]) == 2 * 3 * 4 * (32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert int(p["total_params"]) > int(p["trainable_params"]) and 0 < float(p["trainable_pct"]) < 100
    assert p["lora_target_modules"] == "auto" and p["train_size"] == "360" and p["val_size"] == "40"
    # params are the model's definition; where it ran and how it reported are elsewhere
    operational = {"checkpoint_dir", "checkpoint_steps", "logging_steps", "device", "dist_timeout",
                   "run_name", "resume_run_id", "experiment_name", "eval_batch_size", "system_metrics",
                   "resolved_device", "compute_dtype", "world_size", "test_texts_in_train"}
    assert not operational & set(p), operational & set(p)
    assert run.data.tags["runtime.device"] == "cpu" and run.data.tags["data.test_texts_in_train"] == "0"
    from src.mlflow_io.tracking import logged_config

    config = logged_config(run.info.run_id)
    assert config["checkpoint_dir"] and config["lora_r"] == 4  # every resolved setting, to reproduce the run
    assert COMMON_METRICS <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # opt-in (--system-metrics)
    assert sorted(run.data.metrics)[0].startswith("test/")  # MLflow's compare page lists them by name
    assert run.data.metrics["val/best_accuracy"] >= 0.85
    epochs = [m.step for m in tracking.get_metric_history(run.info.run_id, "val/accuracy")]
    assert epochs == [1, 2, 3]
    files = set(artifact_paths(tracking, run.info.run_id))
    for f in ("test/confusion_matrix.png", "test/confusion_matrix.json", "val/confusion_matrix.png",
              "test/roc_curve.png", "test/classification_report.json", "test/misclassified.json",
              "config/resolved_config.yaml", "config/label_map.json"):
        assert f in files, f
    import mlflow

    matrix = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/test/confusion_matrix.json")
    assert np.array(matrix["matrix"]).sum() == 120
    assert np.trace(matrix["matrix"]) / 120 == pytest.approx(run.data.metrics["test/accuracy"])
    inputs = {d.tags[0].value for d in run.inputs.dataset_inputs}
    assert inputs == {"train", "validation", "test"}
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "train-validation", "test"}
    experiment = tracking.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "test/accuracy" in experiment.tags["mlflow.sharedViewState.results"]


def test_full_and_lora_share_metric_keys(full_run, lora_run):
    assert full_run.info.status == "FINISHED"
    assert full_run.data.tags["strategy"] == "full"
    assert "lora_r" not in full_run.data.params
    assert full_run.data.params["trainable_params"] == full_run.data.params["total_params"]
    assert COMMON_METRICS <= set(full_run.data.metrics)
    assert set(full_run.data.metrics) == set(lora_run.data.metrics)


def test_registered_model_reloads_offline_and_predicts_identically(tracking, lora_run, distilbert_dir, data_files,
                                                                    tmp_path):
    import mlflow
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    versions = tracking.search_model_versions("name='tiny-sentiment'")
    assert [v.run_id for v in versions] == [lora_run.info.run_id]
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-sentiment/1")
    test = pd.read_parquet(data_files[1])
    out = pyfunc.predict(test[["text"]])
    assert list(out.columns) == ["label", "prob_0", "prob_1"]
    accuracy = (out["label"].astype(int) == test["label"]).mean()
    assert accuracy == pytest.approx(lora_run.data.metrics["test/accuracy"])

    # an independent reload of the run's logged model: its adapter folder on the base through peft,
    # unmerged; the folder carries the label map
    model_id = logged_model(tracking, lora_run).model_id
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path)))
    adapter = root / "artifacts" / "weights"
    config = AutoConfig.from_pretrained(adapter)
    assert config.id2label == {0: "0", 1: "1"}
    base = AutoModelForSequenceClassification.from_pretrained(distilbert_dir, config=config)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    with torch.no_grad():
        probs = torch.softmax(model(**tok(test["text"].tolist(), padding=True, return_tensors="pt")).logits, -1)
    assert np.allclose(probs.numpy(), out[["prob_0", "prob_1"]].to_numpy(), atol=1e-5)
    assert (probs.argmax(-1).numpy() == out["label"].astype(int).to_numpy()).all()
    size = sum(f.stat().st_size for f in adapter.iterdir())
    assert size < 2_000_000


def stored_bytes(server_folder, client, run) -> tuple[int, int]:
    """(bytes of the run's artifacts, bytes of its logged model) in the server's artifact store."""
    model = server_folder / "artifacts" / logged_model(client, run).artifact_location.removeprefix("mlflow-artifacts:/")
    run_dir = server_folder / "artifacts" / run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    size = lambda folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())  # noqa: E731
    return size(run_dir), size(model)


def test_every_run_logs_its_model_with_linked_metrics(tracking, server_folder, lora_run, full_run):
    """MLflow 3's model-centric view: each run logged its model, holding the run's definition as params
    and its held-out metrics tied to their datasets; what each costs in the store is printed."""
    for run in (lora_run, full_run):
        model = logged_model(tracking, run)
        assert model.name == "model" and model.source_run_id == run.info.run_id
        assert model.model_type == run.data.tags["strategy"]
        assert model.params["learning_rate"] == run.data.params["learning_rate"]
        assert "checkpoint_dir" not in model.params
        linked = {(m.key, m.dataset_name): m for m in model.metrics}
        for key in ("test/accuracy", "test/f1", "test/roc_auc"):
            assert linked[(key, "test")].value == pytest.approx(run.data.metrics[key])
            assert linked[(key, "test")].run_id == run.info.run_id
        assert linked[("val/best_accuracy", "train-validation")].value == run.data.metrics["val/best_accuracy"]
        run_bytes, model_bytes = stored_bytes(server_folder, tracking, run)
        print(f"{run.info.run_name}: run artifacts {run_bytes:,} bytes, logged model {model_bytes:,} bytes")
    lora_model, full_model = (stored_bytes(server_folder, tracking, r)[1] for r in (lora_run, full_run))
    assert lora_model < full_model  # the adapter and a reference to its base, not a copy of the base
    # the model ships only what serving needs: its loader and scoring, no trainer
    from src.mlflow_io.serving import CODE

    root = server_folder / "artifacts" / logged_model(tracking, lora_run).artifact_location.removeprefix(
        "mlflow-artifacts:/")
    shipped = {p.relative_to(root / "code" / "src").as_posix() for p in (root / "code" / "src").rglob("*.py")}
    assert shipped == set(CODE)
    print(f"code shipped with the model: {sum((root / 'code' / 'src' / c).stat().st_size for c in CODE):,} bytes")


def test_system_metrics_are_opt_in(tracking, distilbert_dir, data_files):
    from tests.conftest import run_cli

    proc = run_cli(["--model", str(distilbert_dir), "--train-data", str(data_files[0]), "--test-data",
                    str(data_files[1]), "--epochs", "1", "--max-train-samples", "64", "--experiment-name",
                    "system-metrics", "--system-metrics", "true", "--checkpoint-dir", ""])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = only_run(tracking, "system-metrics")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    link = [ln for ln in proc.stderr.splitlines() if ln.startswith("view in MLflow: ")]
    assert link == [f"view in MLflow: {tracking.tracking_uri}/#/experiments/{run.info.experiment_id}/runs?"
                    f"workflowType=machine_learning&viewStateShareKey=results"]


def test_the_console_holds_the_runs_lines_not_library_progress_bars(lora_run, full_run):
    """The registered LoRA run reads its logged model back through the gate; neither run shows
    transformers' or MLflow's progress bars, and each ends with its result and its link."""
    for entry in ("lora", "full"):
        console = CONSOLE[entry]
        assert not [bar for bar in CHATTER if bar in console], console[-3000:]
        assert "Warning" not in console, console[-3000:]
        assert console.count("; test accuracy ") == 1 and console.count("view in MLflow: ") == 1, console[-3000:]
    assert "tiny-sentiment: version 1 is " in CONSOLE["lora"]


def test_an_earlier_run_is_registered_later_and_served(tracking, full_run, tmp_path):
    """`python -m src.registry register --run-id`: the full run's model, as stored, scored on its test
    split and judged by the gate; registered, then served over HTTP."""
    import json
    import urllib.request

    from tests.conftest import free_port

    proc = subprocess.run([sys.executable, "-m", "src.registry", "register", "--run-id", full_run.info.run_id,
                           "--registered-model-name", "registered-later"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("registered-later: version 1 is champion: test accuracy"), line
    assert line not in proc.stderr and "Warning" not in proc.stderr  # the sentence once, on stdout
    assert not [bar for bar in CHATTER if bar in proc.stdout + proc.stderr], proc.stderr[-2000:]
    version = tracking.get_model_version("registered-later", "1")
    assert version.run_id == full_run.info.run_id and version.description == line
    assert tracking.get_run(full_run.info.run_id).data.tags["registry.decision"] == "champion"
    again = subprocess.run([sys.executable, "-m", "src.registry", "register", "--run-id", "0" * 32],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: run 00000000")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "src.serve", "--model", "models:/registered-later@champion",
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        answer, body = None, json.dumps({"inputs": {"text": ["a great film"]}}).encode()
        for _ in range(240):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    assert answer is not None and answer["predictions"][0]["label"] in ("0", "1")


def test_train_module_runs_without_mlflow_projects(tracking, distilbert_dir, data_files):
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "--strategy", "full", "--model", str(distilbert_dir),
         "--train-data", str(data_files[0]), "--test-data", str(data_files[1]), "--epochs", "1",
         "--max-train-samples", "64", "--experiment-name", "direct", "--run-name", "direct-full"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tracking, "direct")
    assert run.info.status == "FINISHED" and run.info.run_name == "direct-full"
    assert run.data.params["learning_rate"] == "5e-05" and run.data.params["train_size"] == "64"


def test_predict_command_matches_the_registered_model(lora_run, data_files, tmp_path):
    import mlflow

    texts = ["great superb film loved it", "awful boring plot hated it"]
    shown = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/tiny-sentiment/1", *texts],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.splitlines()[0].split() == ["text", "label", "prob_0", "prob_1"]
    assert "LOAD REPORT" not in shown.stderr and "Warning" not in shown.stderr, shown.stderr[-2000:]
    expected = mlflow.pyfunc.load_model("models:/tiny-sentiment/1").predict(pd.DataFrame({"text": texts}))
    assert [line.split()[-3] for line in shown.stdout.splitlines()[1:]] == list(expected["label"])

    test = pd.read_parquet(data_files[1])
    test.to_csv(tmp_path / "in.csv", index=False)
    written = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/tiny-sentiment/1",
                              "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr[-2000:]
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == len(test) and list(out["text"]) == list(test["text"])
    accuracy = (out["predicted_label"] == test["label"]).mean()
    assert accuracy == pytest.approx(lora_run.data.metrics["test/accuracy"])

    bad = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/no-such-model/1", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: cannot load model")

    # true labels given: checked against the model's label map, accuracy reported
    checked = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/tiny-sentiment/1",
                              "--input", str(tmp_path / "in.csv"), "--label-column", "label"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert f"accuracy against 'label': {accuracy:.4f}" in checked.stderr
    test.assign(label=test["label"].map({0: "neg", 1: "pos"})).to_csv(tmp_path / "named.csv", index=False)
    other = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/tiny-sentiment/1",
                            "--input", str(tmp_path / "named.csv"), "--label-column", "label"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2
    assert "labels ['neg', 'pos'] in column 'label'" in other.stderr.strip().splitlines()[-1], other.stderr[-2000:]


def test_mlflow_models_serve_answers_http(lora_run, tmp_path):
    """`mlflow models serve` on the registered model answers a real POST /invocations."""
    import json
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/tiny-sentiment/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_records": [{"text": "great superb film loved it"},
                                                 {"text": "awful boring plot hated it"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    rows = answer["predictions"]
    assert [sorted(r) for r in rows] == [["label", "prob_0", "prob_1"]] * 2
    assert all(abs(r["prob_0"] + r["prob_1"] - 1) < 1e-5 for r in rows)
    assert [r["label"] for r in rows] == ["1", "0"]


def test_readme_run_lands_where_compare_reads(tracking, distilbert_dir, data_files, tmp_path):
    """The README's first `mlflow run` line as typed (plus tiny data) puts its run in compare's experiment."""
    import shlex

    from src.base.config import CompareConfig

    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("mlflow run . -e lora"))
    args = shlex.split(line, comments=True)
    args[0], args[2] = str(BIN / "mlflow"), str(ROOT)
    args += ["-P", f"model={distilbert_dir}", "-P", f"train_data={data_files[0]}", "-P", f"test_data={data_files[1]}",
             "-P", "epochs=1", "-P", "max_train_samples=32", "-P", "max_test_samples=16"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tracking, CompareConfig().experiment_name)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "lora"


def test_compare_page_has_common_top_level_figures(tracking, full_run, lora_run):
    """MLflow's compare page shows only top-level artifact files: the key figures and summary sit there."""
    import mlflow

    roots = {}
    for run in (full_run, lora_run):
        roots[run.data.tags["strategy"]] = {f.path for f in tracking.list_artifacts(run.info.run_id) if not f.is_dir}
    assert roots["full"] == roots["lora"] and {"confusion_matrix.png", "roc_curve.png", "summary.json"} <= roots["lora"]
    summary = mlflow.artifacts.load_dict(f"runs:/{lora_run.info.run_id}/summary.json")
    assert summary["strategy"] == "lora"
    assert summary["trainable_params"] == int(lora_run.data.params["trainable_params"])
    assert summary["test_accuracy"] == round(lora_run.data.metrics["test/accuracy"], 4)
    note = lora_run.data.tags["mlflow.note.content"]
    assert note.startswith("LoRA r4 ") and f"test acc {lora_run.data.metrics['test/accuracy']:.3f}," in note
    assert full_run.data.tags["mlflow.note.content"].startswith("Full fine-tuning: test acc ")


def test_names_say_what_was_used(tracking, distilbert_dir, data_files):
    """Local files: the dataset param names the file; the same derived name twice: the second gets -e<epochs>."""
    from tests.conftest import run_cli

    tiny = ["--model", str(distilbert_dir), "--train-data", str(data_files[0]), "--test-data", str(data_files[1]),
            "--epochs", "1", "--max-train-samples", "32", "--max-test-samples", "16", "--experiment-name", "names"]
    for _ in range(2):
        proc = run_cli(tiny)
        assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = tracking.get_experiment_by_name("names").experiment_id
    runs = tracking.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in runs] == ["lora-r8-a32-lr5e-4", "lora-r8-a32-lr5e-4-e1"]
    assert {r.data.params["dataset"] for r in runs} == {"train.parquet"}
