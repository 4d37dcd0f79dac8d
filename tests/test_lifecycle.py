"""A run always ends with its true status: KILLED on SIGTERM/Ctrl-C, FAILED with its traceback."""

import os
import signal
import subprocess
import time
import urllib.request

import mlflow
import pytest

from src.base.config import RunConfig
from tests.conftest import (
    ROOT,
    free_port,
    history,
    only_run,
    start_mlflow_server,
    steps_per_epoch,
    stop_mlflow_server,
    train_cmd,
    wait_for_metric,
)

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig, experiment", [(signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")])
def test_signal_mid_training_ends_run_killed_with_a_checkpoint(tracking, distilbert_dir, data_files, sig,
                                                               experiment, tmp_path):
    proc = subprocess.Popen(train_cmd(distilbert_dir, data_files, experiment, tmp_path, "--epochs", "200"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for_metric(tracking, experiment, "val/accuracy")  # mid-training: an epoch is done
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert tracking.get_run(run.info.run_id).info.status == "KILLED", err[-2000:]
    assert (tmp_path / run.info.run_id / "last.pt").is_file()


@pytest.mark.parametrize("batching", [[], ["--bucket-width", "16"]], ids=["length-grouped", "bucketed"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tracking, distilbert_dir, data_files, tmp_path, batching):
    tag = "-bucketed" if batching else ""
    whole = subprocess.run(train_cmd(distilbert_dir, data_files, f"uninterrupted{tag}", tmp_path / "a", "--epochs",
                                     "3", *batching), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = only_run(tracking, f"uninterrupted{tag}")
    assert not (tmp_path / "a" / reference.info.run_id).exists()  # removed once FINISHED

    cmd = train_cmd(distilbert_dir, data_files, f"interrupted{tag}", tmp_path / "b", "--epochs", "3",
                    "--checkpoint-steps", "5", *batching)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = wait_for_metric(tracking, f"interrupted{tag}", "val/accuracy")  # epoch 1 done: killed inside epoch 2
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_id = run.info.run_id
    assert tracking.get_run(run_id).info.status == "RUNNING"  # kill -9: nobody could close it
    again = subprocess.run(cmd + ["--resume-run-id", run_id], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = tracking.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert len(tracking.search_runs([resumed.info.experiment_id])) == 1  # the same run, not a new one
    for key in ("train/loss", "train/learning_rate", "val/accuracy", "val/loss"):
        got, want = history(tracking, run_id, key), history(tracking, reference.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], key  # no step lost, none twice
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5), key
    for key in ("test/accuracy", "test/loss", "val/best_accuracy"):
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-5)


def test_exception_ends_run_failed_with_traceback(tracking, distilbert_dir, data_files):
    from src.mlflow_io import tracking as tr

    cfg = RunConfig.from_flat({"model": str(distilbert_dir), "train_data": str(data_files[0]),
                               "test_data": str(data_files[1]), "experiment_name": "failing"})
    with pytest.raises(ZeroDivisionError):
        with tr.run(cfg) as active:
            mlflow.log_metric("before", 1.0)
            1 / 0  # noqa: B018
    run = tracking.get_run(active.info.run_id)
    assert run.info.status == "FAILED"
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error/traceback.txt")
    assert "ZeroDivisionError" in text


def test_tracking_server_restart_mid_run_loses_nothing(distilbert_dir, data_files, tmp_path):
    """The server goes away for 10 s and comes back on the same port and store: training goes on,
    and every metric logged meanwhile reaches it."""
    folder = tmp_path / "server"
    folder.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(folder, port)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    epochs = 6
    proc = subprocess.Popen(train_cmd(distilbert_dir, data_files, "outage", tmp_path / "ckpt", "--epochs", str(epochs)),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = mlflow.MlflowClient(uri)
    try:
        run = wait_for_metric(client, "outage", "val/accuracy")
        stop_mlflow_server(server)
        with pytest.raises(OSError):  # really gone
            urllib.request.urlopen(f"{uri}/health", timeout=2)
        time.sleep(10)
        assert proc.poll() is None  # still training while the server is away
        server = start_mlflow_server(folder, port)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        done = client.get_run(run.info.run_id)
        assert done.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        # every step once: no gap, no duplicate
        assert sorted(steps) == list(range(1, epochs * steps_per_epoch(data_files) + 1))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == list(
            range(1, epochs + 1))
    finally:
        proc.kill()
        stop_mlflow_server(server)
