"""A run always ends with its true status: KILLED on SIGTERM/Ctrl-C, FAILED with its traceback."""

import signal
import subprocess
import sys
import time

import mlflow
import pytest

from src.config import RunConfig
from tests.conftest import ROOT


def wait_for_metric(client, experiment, key, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and key in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no {key} in {experiment} after {timeout}s")


@pytest.mark.parametrize("sig, experiment", [(signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")])
def test_signal_mid_training_ends_run_killed(tracking, distilbert_dir, data_files, sig, experiment):
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train", "--model", str(distilbert_dir), "--train-data", str(data_files[0]),
         "--test-data", str(data_files[1]), "--epochs", "200", "--experiment-name", experiment],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for_metric(tracking, experiment, "val/accuracy")  # mid-training: an epoch is done
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert tracking.get_run(run.info.run_id).info.status == "KILLED", err[-2000:]


def test_exception_ends_run_failed_with_traceback(tracking, distilbert_dir, data_files):
    from src import tracking as tr

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
