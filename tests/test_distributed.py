"""Data-parallel training under torchrun: two CPU processes (gloo), one MLflow run, same result."""

import subprocess
import sys

import pytest

from tests.conftest import COMMON_METRICS, ROOT, only_run, run_cli

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def train_args(model_dir, data_files, batch_size, experiment):
    return ["--strategy", "lora", "--model", str(model_dir), "--train-data", str(data_files[0]),
            "--test-data", str(data_files[1]), "--epochs", "2", "--batch-size", str(batch_size),
            "--learning-rate", "5e-3", "--experiment-name", experiment, "--logging-steps", "1"]


def test_two_processes_train_as_one_run(tracking, distilbert_dir, data_files):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "src.train", *train_args(distilbert_dir, data_files, 8, "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = only_run(tracking, "ddp")  # rank 1 created nothing
    assert ddp.info.status == "FINISHED"
    assert ddp.data.tags["runtime.world_size"] == "2" and ddp.data.tags["runtime.global_batch_size"] == "16"
    assert COMMON_METRICS <= set(ddp.data.metrics)

    single = run_cli(train_args(distilbert_dir, data_files, 16, "ddp-single"))
    assert single.returncode == 0, single.stderr[-3000:]
    one = only_run(tracking, "ddp-single")
    # same global batches, so the same number of optimizer steps; the result within noise
    steps = [[m.step for m in tracking.get_metric_history(r.info.run_id, "train/loss")] for r in (ddp, one)]
    assert steps[0] == steps[1] and len(steps[0]) == 2 * 23, steps
    assert ddp.data.metrics["val/best_accuracy"] >= 0.85, ddp.data.metrics
    assert ddp.data.metrics["val/best_accuracy"] == pytest.approx(one.data.metrics["val/best_accuracy"], abs=0.1)
    assert ddp.data.metrics["test/accuracy"] == pytest.approx(one.data.metrics["test/accuracy"], abs=0.1)
    assert int(ddp.data.params["train_size"]) == 360
