"""Resuming is safe: checkpoints never unpickle, one process per run, a full disk or a tracking
server that refuses metrics ends the run FAILED with one line and a checkpoint that claims only
what was delivered."""

import errno
import http.client
import os
import shlex
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pytest
import torch

from src.base.config import ConfigError
from src.core.checkpoint import Checkpointer
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


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class Planted:
    """Unpickling it runs a shell command that creates `marker`: what an attacker would plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_planted_checkpoint_is_refused_on_resume_and_never_runs(tracking, distilbert_dir, data_files, tmp_path):
    run_id = tracking.create_run(tracking.create_experiment("planted")).info.run_id  # an interrupted run
    marker = tmp_path / "planted-code-ran"
    folder = tmp_path / "ckpt" / run_id
    folder.mkdir(parents=True)
    torch.save({"format": 2, "run_id": run_id, "config": {}, "state": Planted(marker)}, folder / "last.pt")

    out = subprocess.run(train_cmd(distilbert_dir, data_files, "planted", tmp_path / "ckpt", "--resume-run-id",
                                   run_id), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and "holds pickled Python objects, which are never loaded" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not marker.exists()
    assert tracking.get_run(run_id).info.status == "RUNNING"  # refused before the run was reopened
    torch.load(folder / "last.pt", weights_only=False)  # the plant is live: an unsafe load runs it
    assert marker.exists()


def test_checkpoint_of_earlier_releases_is_refused_not_unpickled(tmp_path):
    """Earlier releases pickled an Evaluation (numpy arrays) and numpy RNG state into last.pt."""
    from src.core.evaluate import Evaluation

    run_id = "0" * 32
    (tmp_path / run_id).mkdir()
    torch.save({"epoch": 2, "torch_rng": torch.get_rng_state(), "config": {},
                "best_val": Evaluation(labels=np.array([0, 1]), probs=np.full((2, 2), 0.5), loss=0.69)},
               tmp_path / run_id / "last.pt")
    with pytest.raises(ConfigError, match="holds pickled Python objects") as refused:
        Checkpointer(tmp_path, run_id, {}).load()
    assert "\n" not in str(refused.value)


def test_two_concurrent_resumes_of_one_run_one_is_refused(tracking, distilbert_dir, data_files, tmp_path):
    epochs = 4
    cmd = train_cmd(distilbert_dir, data_files, "concurrent-resume", tmp_path, "--epochs", str(epochs),
                    "--checkpoint-steps", "5")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = wait_for_metric(tracking, "concurrent-resume", "val/accuracy")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_id = run.info.run_id
    assert (tmp_path / run_id / "lock").is_file()  # left by the killed process; the kernel freed its lock

    both = [subprocess.Popen(cmd + ["--resume-run-id", run_id], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=400)[1] for p in both]
    assert sorted(p.returncode for p in both) == [0, 2], [e[-2000:] for e in errs]
    refused = errs[[p.returncode for p in both].index(2)]
    errors = error_lines(refused)
    assert len(errors) == 1 and f"run {run_id} is being trained or resumed by another process" in errors[0], refused
    assert "Traceback" not in refused and "train epoch" not in refused  # refused before any training
    assert tracking.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in tracking.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, epochs * steps_per_epoch(data_files) + 1))  # none twice, none lost
    assert sorted(m.step for m in tracking.get_metric_history(run_id, "val/accuracy")) == list(range(1, epochs + 1))
    assert not (tmp_path / run_id).exists()


def test_disk_full_during_a_save_fails_the_run_with_one_line(tracking, distilbert_dir, data_files, tmp_path,
                                                              monkeypatch, capsys):
    """ENOSPC injected into the checkpoint's write (no small filesystem to fill here): the second
    save writes part of the file, then the disk is full."""
    from src import cli

    real_save, saves = torch.save, []

    def disk_fills(obj, f, *args, **kwargs):
        saves.append(obj["state"]["step"])
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_fills)
    cmd = train_cmd(distilbert_dir, data_files, "disk-full", tmp_path, "--epochs", "1", "--checkpoint-steps", "5")
    monkeypatch.setattr(sys, "argv", ["src.train", *cmd[3:]])
    with pytest.raises(SystemExit) as exited:
        cli.train_main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    run = only_run(tracking, "disk-full")
    errors = error_lines(err)
    assert len(errors) == 1 and "No space left on device" in errors[0] and run.info.run_id in errors[0], err
    assert "Traceback" not in err
    assert run.info.status == "FAILED"
    folder = tmp_path / run.info.run_id
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "lock"]  # no temp file left
    assert saves == [5, 10]
    assert torch.load(folder / "last.pt", weights_only=True)["state"]["step"] == 5  # the previous one, whole


class RefusingProxy:
    """Forwards every request to an MLflow server, but answers 500 to each metric batch that holds a
    train/loss step in `refuse`, and to every retry of it: longer than any retry budget."""

    def __init__(self, upstream: int, refuse) -> None:
        self.upstream, self.refuse, self.refusals = upstream, set(refuse), 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                proxy.forward(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refused(self, path: str, body: bytes) -> bool:
        if not path.endswith("/runs/log-batch"):
            return False
        import json

        metrics = json.loads(body or b"{}").get("metrics", [])
        return any(m["key"] == "train/loss" and int(m["step"]) in self.refuse for m in metrics)

    @staticmethod
    def body(request: BaseHTTPRequestHandler) -> bytes:
        """requests sends an empty file (an artifact upload) chunked: read it to its end."""
        if request.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return request.rfile.read(int(request.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(request.rfile.readline().split(b";")[0], 16):
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
        request.rfile.readline()  # the empty line after the last chunk
        return b"".join(chunks)

    def forward(self, request: BaseHTTPRequestHandler) -> None:
        body = self.body(request)
        if self.refused(request.path, body):
            self.refusals += 1
            request.send_response(500)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=120)
        hop = ("host", "connection", "transfer-encoding", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        conn.request(request.command, request.path, body, headers)
        response = conn.getresponse()
        data = response.read()
        request.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                request.send_header(k, v)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
        conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_metrics_refused_past_the_retry_budget_fail_the_run_and_a_resume_logs_them(distilbert_dir, data_files,
                                                                                    tmp_path):
    """The design chosen: the run fails (never FINISHED with gaps), its checkpoint stops before the
    refused steps, and a resume once the server takes metrics again trains and logs them."""
    folder = tmp_path / "server"
    folder.mkdir()
    port = free_port()
    server = start_mlflow_server(folder, port)
    proxy = RefusingProxy(port, refuse=range(6, 10))
    retries = 2
    env = {**os.environ, "MLFLOW_TRACKING_URI": proxy.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    cmd = train_cmd(distilbert_dir, data_files, "refused", tmp_path / "ckpt", "--epochs", "2",
                    "--checkpoint-steps", "5")
    client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")  # past the proxy
    try:
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        run_id = only_run(client, "refused").info.run_id
        assert first.returncode == 2, first.stderr[-3000:]
        errors = error_lines(first.stderr)
        assert len(errors) == 1, first.stderr[-3000:]
        assert "tracking server refused the metrics of step 6" in errors[0] and run_id in errors[0], errors
        assert "Traceback" not in first.stderr
        assert proxy.refusals >= 1 + retries  # the first try and every retry of one batch
        assert client.get_run(run_id).info.status == "FAILED"
        assert not {s for s, _ in history(client, run_id, "train/loss")} & proxy.refuse  # really missing
        saved = torch.load(tmp_path / "ckpt" / run_id / "last.pt", weights_only=True)
        assert saved["state"]["step"] == 5  # the checkpoint does not claim the refused steps

        proxy.refuse.clear()  # the server takes metrics again
        again = subprocess.run(cmd + ["--resume-run-id", run_id], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = [s for s, _ in history(client, run_id, "train/loss")]
        assert steps == list(range(1, 2 * steps_per_epoch(data_files) + 1))  # every step once
        assert [s for s, _ in history(client, run_id, "val/accuracy")] == [1, 2]
    finally:
        proxy.close()
        stop_mlflow_server(server)
