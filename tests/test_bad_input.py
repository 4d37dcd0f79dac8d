"""Bad input: one clear `error:` line, non-zero exit, before training, and no MLflow run left behind."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest

from tests.builders import sentiment_frame
from tests.conftest import ROOT, free_port, mlflow_run, run_cli

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, distilbert_dir):
    d = tmp_path_factory.mktemp("bad")
    shutil.copytree(distilbert_dir, d / "bin-only")  # weights only as a pickle, which is never loaded
    (d / "bin-only" / "model.safetensors").unlink()
    (d / "bin-only" / "pytorch_model.bin").write_bytes(b"not loaded, so never unpickled")
    good = sentiment_frame(60)
    good.to_parquet(d / "train.parquet")
    good.head(20).to_parquet(d / "test.parquet")
    good.assign(label=1).to_parquet(d / "one_class.parquet")
    good.assign(text=[""] * 3 + good.text.tolist()[3:]).to_parquet(d / "empty_texts.parquet")
    good.head(20).assign(label=7).to_parquet(d / "unseen_label.parquet")
    (d / "notes.txt").write_text("hello")
    return d


CASES = {
    "missing file": (["--train-data", "{d}/nope.parquet", "--test-data", "{d}/test.parquet"],
                     "data file not found"),
    "wrong text column": (["--text-column", "review"], "no column 'review'"),
    "wrong label column": (["--label-column", "sentiment"], "no column 'sentiment'"),
    "one class only": (["--train-data", "{d}/one_class.parquet"], "single label"),
    "empty texts": (["--train-data", "{d}/empty_texts.parquet"], "3 empty or non-text"),
    "test label unseen in train": (["--test-data", "{d}/unseen_label.parquet"], "never seen in train"),
    "unsupported file type": (["--train-data", "{d}/notes.txt"], "unsupported data file type"),
    "zero rank": (["--lora-r", "0"], "--lora-r must be a positive integer"),
    "attention dropout of 1": (["--attention-dropout", "1"], "--attention-dropout must be in [0, 1)"),
    "negative alpha": (["--lora-alpha", "-4"], "--lora-alpha must be positive"),
    "zero learning rate": (["--learning-rate", "0"], "--learning-rate must be a positive number"),
    "negative learning rate": (["--learning_rate=-1e-4"], "--learning-rate must be a positive number"),
    "unknown strategy": (["--strategy", "adapters"], "Invalid value for '--strategy'"),
    "missing model folder": (["--model", "{d}/no-such-model"], "could not load a tokenizer"),
    "unknown LoRA target": (["--lora-target-modules", "q_proj"], "LoRA targets ['q_proj'] do not match"),
    "train without test": (["--test-data", ""], "--train-data needs --test-data"),
    "max_length beyond the model": (["--max-length", "1024"], "--max-length 1024 exceeds"),
    "tracking server down": (["--experiment-name", "x"], "is not reachable"),
    "bad registered model name": (["--registered-model-name", "my model!"], "--registered-model-name may hold"),
    "class weights per label": (["--class-weights", "1,2,3"], "--class-weights gives 3 weight(s) for 2 labels"),
    "class weights not numbers": (["--class-weights", "heavy"], "--class-weights must be numbers"),
    "promotion alpha out of range": (["--promotion-alpha", "2"], "--promotion-alpha must be between 0 and 1"),
    "checkpoint folder is a file": (["--checkpoint-dir", "{d}/notes.txt"], "is not a folder"),
    "negative bucket width": (["--bucket-width", "-64"], "--bucket-width must be >= 0 (0 = off), got -64"),
    "deleted experiment": (["--experiment-name", "bad-deleted experiment"], "is deleted; restore it with"),
    "one column as text and label": (["--label-column", "text"], "both name column 'text'"),
    "negative split seed": (["--split-seed", "-1"], "--split-seed must be an integer from 0 to 4294967295"),
    "negative seed": (["--seed", "-5"], "--seed must be an integer from 0 to 4294967295"),
    "empty experiment name": (["--experiment-name", ""], "--experiment-name must not be empty"),
    "not a device": (["--device", "gpu0"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    "a GPU this process cannot see": (["--device", "cuda:99"], "--device cuda:99 names a GPU this process cannot see"),
    "collective timeout of 0": (["--dist-timeout", "0"], "--dist-timeout must be at least 1 second"),
    "model folder without safetensors": (["--model", "{d}/bin-only"], "has no safetensors weights (found "
                                         "pytorch_model.bin"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_fast_and_cleanly(name, bad_files, distilbert_dir, tracking):
    args, message = CASES[name]
    base = {"--model": str(distilbert_dir), "--train-data": f"{bad_files}/train.parquet",
            "--test-data": f"{bad_files}/test.parquet", "--experiment-name": f"bad-{name}"}
    given = [a.format(d=bad_files) for a in args]
    for i in range(0, len(given) - 1, 2):
        base.pop(given[i], None)
    argv = [x for kv in base.items() for x in kv] + given
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"} if name == "tracking server down" else None
    if name == "deleted experiment":
        tracking.delete_experiment(tracking.create_experiment(f"bad-{name}"))
    proc = run_cli(argv, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    experiment = tracking.get_experiment_by_name(f"bad-{name}")
    if name == "deleted experiment":  # it exists, deleted, and stays empty
        assert experiment.lifecycle_stage == "deleted"
        assert not tracking.search_runs([experiment.experiment_id], run_view_type=mlflow.entities.ViewType.ALL)
    else:
        assert experiment is None  # nothing created in MLflow


def test_refused_input_under_mlflow_run_ends_that_run_failed_with_the_reason(tracking, bad_files, tmp_path):
    """`mlflow run` creates the run before the command starts; the refusal must not leave it
    RUNNING or failed without a word: the UI shows the error line as the run's description."""
    params = {"model": bad_files / "bin-only", "train_data": bad_files / "train.parquet",
              "test_data": bad_files / "test.parquet", "seed": -1}
    proc = mlflow_run("lora", params, "bad-project-run", cwd=tmp_path)
    line = "error: --seed must be an integer from 0 to 4294967295, got -1"
    assert proc.returncode != 0 and line in proc.stderr, proc.stderr[-2000:]
    [run] = tracking.search_runs([tracking.get_experiment_by_name("bad-project-run").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.note.content"] == line and run.data.tags["error"] == line.removeprefix("error: ")
    assert run.info.run_name == "refused: --seed must be an integer from 0 to 4294967295, got -1"


def test_checkpoint_from_before_a_new_setting_still_resumes():
    from src.base.config import ConfigError, RunConfig
    from src.core.checkpoint import check_settings

    config = RunConfig().flat()
    older = {k: v for k, v in config.items() if k != "class_weights"}  # written before the setting existed
    check_settings(older, config, "0" * 32)  # its default then equals the default now
    with pytest.raises(ConfigError, match="class_weights: None -> 'balanced'"):
        check_settings(older, {**config, "class_weights": "balanced"}, "0" * 32)


def test_checkpoints_that_cannot_fit_the_disk_are_refused_before_work(tmp_path):
    from src.base.config import ConfigError
    from src.core.checkpoint import check_space

    assert check_space(tmp_path / "new" / "sub", trainable=1000) > 0  # a folder still to create is fine
    with pytest.raises(ConfigError, match=r"GiB free, checkpoints of this model need"):
        check_space(tmp_path, trainable=10**15)  # 32 PB of checkpoints


@pytest.mark.parametrize("env, fix", [
    ({}, "pass --train-data /abs/train.parquet --test-data /abs/test.parquet --model /abs/model-folder"),
    ({"IMDB_SENTIMENT_MAKE_TARGET": "full"},
     'run `make full ARGS="-P train_data=/abs/train.parquet -P test_data=/abs/test.parquet -P model=/abs/'),
])
def test_offline_hub_error_names_the_fix_in_the_commands_spelling(env, fix, distilbert_dir, tmp_path):
    """HF_HUB_OFFLINE set (as in the suite) and IMDB not cached: the hint says so, and how to go on."""
    proc = run_cli(["--model", str(distilbert_dir), "--experiment-name", "bad-offline"], env=env, timeout=120)
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert proc.returncode == 2 and last.startswith("error: could not load hub dataset 'imdb'"), proc.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read and 'imdb' is not in it" in last
    assert fix in last and "the model must be local too" in last


def test_an_unreachable_hub_is_reported_in_seconds(distilbert_dir):
    """HF_HUB_OFFLINE unset and the hub not answering (here: a closed port as its endpoint): a one-second
    probe instead of the libraries' half minute of retries, and a hint that does not tell the user to
    set what would not have helped."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "",
           "HF_ENDPOINT": f"http://127.0.0.1:{closed}"}
    start = time.monotonic()
    proc = run_cli(["--model", "distilbert-base-uncased", "--experiment-name", "bad-hub"], env=env, timeout=120)
    took = time.monotonic() - start
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert proc.returncode == 2 and last.startswith("error: could not load hub dataset 'imdb'"), proc.stderr[-2000:]
    assert f"the Hugging Face Hub (http://127.0.0.1:{closed}) does not answer and 'imdb' is not in the local cache" \
        in last
    assert "HF_HUB_OFFLINE" not in last and took < 20, took  # python and the imports take most of it


def test_offline_fix_under_mlflow_run_uses_project_parameters(monkeypatch):
    from src.base.hub import local_files_fix

    monkeypatch.delenv("IMDB_SENTIMENT_MAKE_TARGET", raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    assert local_files_fix().startswith("add `-P train_data=/abs/train.parquet -P test_data=/abs/test.parquet -P "
                                        "model=")


@pytest.fixture(scope="module")
def predict_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    pd.DataFrame({"text": ["a fine film", None, float("nan")]}).to_parquet(d / "missing.parquet")
    rows = [{"text": "a fine film", "label": 1}, {"text": None, "label": 0}, {"text": 3, "label": 1},
            {"text": ["a", "list"], "label": 0}, {"text": "  ", "label": 1}]
    (d / "odd.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "no_label.csv").write_text("text,label\na fine film,1\na dull one,\n")
    return d


PREDICT_CASES = {  # name: (arguments after --model, what the one line says)
    "argument whose bytes are not UTF-8": (["a fine film", "\udcff"], "text argument 2 is not valid UTF-8 (byte 0xff)"),
    "empty argument": ([" "], "text argument 1 is empty"),
    "null and NaN in a parquet text column": (["--input", "{d}/missing.parquet"],
                                              "2 row(s) of column 'text' of {d}/missing.parquet hold no usable text "
                                              "(row 2: empty, row 3: empty;"),
    "null, number, list and blank in JSON lines": (["--input", "{d}/odd.jsonl"],
                                                   "4 row(s) of column 'text' of {d}/odd.jsonl hold no usable text "
                                                   "(row 2: empty, row 3: int, row 4: list;"),
    "missing label": (["--input", "{d}/no_label.csv", "--label-column", "label"],
                      "1 row(s) of column 'label' of {d}/no_label.csv hold no usable label (row 2: empty;"),
    "tracking server down": (["a fine film"], "MLflow tracking server http://127.0.0.1:"),
}


@pytest.mark.parametrize("name", list(PREDICT_CASES))
def test_predict_refuses_bad_input_with_one_line_before_loading(name, predict_files, tracking):
    """Each of these once ended in a traceback after the model loaded, or (server down) after 4 minutes
    of MLflow's retries: now one line within seconds, the model never fetched."""
    args, message = PREDICT_CASES[name]
    env = {**os.environ}
    if name == "tracking server down":
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models:/never-registered@champion",
                           *[a.format(d=predict_files) for a in args]], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert time.monotonic() - start < 10
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert message.format(d=predict_files) in lines[-1] and "Traceback" not in proc.stderr, lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--registered-model-name", "bad name!"], "--registered-model-name may hold letters, digits"),
    (["--promotion-alpha", "3"], "--promotion-alpha must be between 0 and 1 exclusive, got 3.0"),
])
def test_register_refuses_a_bad_name_or_level_before_contacting_the_server(args, message):
    """Nothing listens on port 9: a check made after contacting the server would say it is unreachable."""
    out = subprocess.run([sys.executable, "-m", "src.registry", "register", "--run-id", "0" * 32, *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr, out.stderr
