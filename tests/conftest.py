"""Shared fixtures: offline environment, tiny models, synthetic data, a real MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.builders import write_data, write_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub, no telemetry, and nothing written outside temp folders."""
    home = tmp_path_factory.mktemp("home")
    values = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "MPLCONFIGDIR": str(home / "mpl"),
        "MLFLOW_ENV_ROOT": str(home / "mlflow-envs"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        # System metrics every second instead of every 10 s: every run of the suite lasts long enough to
        # log them, so two runs' metric keys are comparable.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        # `mlflow run --env-manager local` starts `python` from PATH: make it this interpreter.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def distilbert_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int, store: str = "") -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 with its store (default: sqlite) and artifacts in `folder`;
    waits for /health. Clients reach the artifacts through the server (proxied), never the folder."""
    log = open(folder / "server.log", "a")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store or f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,  # its workers die with it
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a fresh PostgreSQL store runs every migration first
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def server_folder(tmp_path_factory) -> Path:
    """Where the session's server keeps its store and artifacts (what an artifact-store writer can reach)."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="session")
def mlflow_server(server_folder):
    """The session's server; tests that stop a server start their own."""
    port = free_port()
    proc = start_mlflow_server(server_folder, port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def tracking(mlflow_server):
    """Point this process and its children at the test server; returns a client of it."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow.MlflowClient(mlflow_server)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)


def run_cli(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


COMMON_METRICS = {
    "train/loss", "train/learning_rate", "val/loss", "val/accuracy", "val/f1", "val/best_accuracy", "val/best_f1",
    "test/accuracy", "test/f1", "test/precision", "test/recall", "test/roc_auc", "test/loss",
    "train/runtime_s", "train/samples_per_s", "train/peak_memory_mb", "val/best_epoch", "test/ece", "test/brier",
    "val/best_ece", "test/recall_0", "test/recall_1",
}


def mlflow_run(entry, params, experiment, cwd=ROOT):
    """`mlflow run` of this project as a user types it (local env manager), against the test server."""
    args = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local",
            "--experiment-name", experiment]
    for k, v in params.items():
        args += ["-P", f"{k}={v}"]
    # mlflow.set_experiment in this process exports MLFLOW_EXPERIMENT_ID, which `mlflow run` would
    # take as a second experiment choice.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=400)


def only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_paths(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def wait_for_metric(client, experiment, key, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and key in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no {key} in {experiment} after {timeout}s")


BATCH_SIZE = 16


def train_cmd(model_dir, data_files, experiment, checkpoints, *extra):
    return [sys.executable, "-m", "src.train", "--model", str(model_dir), "--train-data", str(data_files[0]),
            "--test-data", str(data_files[1]), "--experiment-name", experiment, "--checkpoint-dir", str(checkpoints),
            "--learning-rate", "5e-3", "--batch-size", str(BATCH_SIZE), "--logging-steps", "1", *extra]


def steps_per_epoch(data_files) -> int:
    """Optimizer steps per epoch of a `train_cmd` run: its train rows (the file less the validation
    split) in length-grouped batches of BATCH_SIZE, one step per batch."""
    import numpy as np

    from src.base.config import RunConfig
    from src.core.data import length_grouped_batches, load_splits

    cfg = RunConfig.from_flat({"train_data": str(data_files[0]), "test_data": str(data_files[1]),
                               "batch_size": BATCH_SIZE})
    assert cfg.train.gradient_accumulation_steps == 1
    n_train = len(load_splits(cfg.data).train)
    return len(length_grouped_batches(np.ones(n_train, dtype=np.int64), BATCH_SIZE, np.random.default_rng(0)))


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this session (tests/postgres.py); its URL without a database name."""
    from tests import postgres as pg

    if pg.bin_dir() is None:
        pytest.skip("PostgreSQL is not installed: run `make install-services` as root (Debian's postgresql "
                    "package), then the team tests run")
    with pg.cluster(free_port()) as server:
        yield server
