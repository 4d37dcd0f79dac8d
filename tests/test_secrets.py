"""A canary password in storage and tracking URLs never reaches the MLflow store or the console.

Each test runs real commands against a server of its own, then greps every byte of that server's
folder (sqlite database, artifacts, server log) and the captured stdout+stderr for the canary, in its
decoded and percent-encoded forms (both contain TOKEN)."""

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from src.base.urls import identity, mask, scrub
from tests.conftest import BIN, ROOT, free_port, start_mlflow_server, stop_mlflow_server

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

TOKEN = uuid.uuid4().hex[:12]
CANARY = f"s3cr3t-{TOKEN}/@x"  # '/' and '@' are where a regex mask used to stop
ENCODED = quote(CANARY, safe="")
TINY = ["--epochs", "1", "--batch-size", "16", "--max-train-samples", "80", "--max-test-samples", "40"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secret-store")
    port = free_port()
    proc = start_mlflow_server(folder, port)
    yield folder, f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


def leaks(folder: Path, *outputs: str) -> list[str]:
    """Where TOKEN occurs: files under the store folder, and console outputs by position."""
    found = [str(p) for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    return found + [f"output {i}" for i, text in enumerate(outputs) if TOKEN in text]


def run(args, url, cwd, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    environ.update({"MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT), **env})
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=environ, timeout=400)
    return proc, proc.stdout + proc.stderr


def tune_settings(model_dir, data_files):
    """One tiny trial, nothing registered."""
    return {"model": model_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 1,
            "batch_size": 16, "max_train_samples": 80, "max_test_samples": 40, "n_trials": 1, "pruner": "none",
            "learning_rate_range": "5e-3,5e-3", "lora_r_choices": 4, "target_module_choices": "auto",
            "registered_model_name": "", "evaluate_test": "false"}


def tune_args(model_dir, data_files, experiment):
    settings = {**tune_settings(model_dir, data_files), "experiment_name": experiment}
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def client_of(url):
    import mlflow

    return mlflow.MlflowClient(url)


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://u:{ENCODED}@db:5432/optuna", "postgresql://u:***@db:5432/optuna"),
    (f"postgresql://u:{CANARY}@db/optuna", "postgresql://u:***@db/optuna"),  # not percent-encoded
    (f"sqlite:////tmp/o.db?password={ENCODED}&timeout=5", "sqlite:////tmp/o.db?password=***&timeout=5"),
    (f"http://u:{ENCODED}@[::1]:5000/", "http://u:***@[::1]:5000/"),
    (f"http://u:{CANARY}@[::1]:5000/", "http://***@[::1]:5000/"),  # unreadable to SQLAlchemy: all user info
    (f"http://tok-{TOKEN}@127.0.0.1:1", "http://***@127.0.0.1:1"),  # a token as the user: a secret in http(s)
    (f"https://tok-{TOKEN}@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
    (f"http://tok@{TOKEN}@127.0.0.1:1", "http://***@127.0.0.1:1"),  # a raw "@" in the token
    ("postgresql://alice@db/optuna", "postgresql://alice@db/optuna"),  # a database user is a name, not a secret
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ("study.log", "study.log"),
])
def test_mask_hides_the_password_and_scrub_removes_it_from_text(url, shown):
    assert mask(url) == shown
    assert TOKEN not in scrub(f"could not connect to {url}: {CANARY} {ENCODED}")


def test_storage_identity_ignores_password_and_directory_but_not_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert identity("postgresql://u:a1b2c3@db/optuna") == identity(f"postgresql://u:{ENCODED}@db/optuna")
    assert identity("postgresql://u@db/optuna") != identity("postgresql://u@db/other")
    assert identity("sqlite:///o.db") == identity(f"sqlite:///{tmp_path}/o.db")
    assert identity("sqlite:///o.db") != identity("sqlite:///p.db")


def test_storage_flag_with_a_password_runs_a_study_without_storing_it(server, distilbert_dir, data_files, tmp_path):
    folder, url = server
    storage = f"sqlite:///{tmp_path}/o.db?password={ENCODED}"
    proc, out = run([sys.executable, "-m", "src.tune", "--storage", storage,
                     *tune_args(distilbert_dir, data_files, "secret-flag")], url, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_of(url)
    runs = client.search_runs([client.get_experiment_by_name("secret-flag").experiment_id])
    [parent] = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert parent.data.params["storage"] == f"sqlite:///{tmp_path}/o.db?password=***"
    assert {r.data.tags["optuna.storage_id"] for r in runs} == {identity(storage)} and len(runs) == 2
    assert leaks(folder, out) == []


def test_environment_storage_under_mlflow_run_is_no_parameter_and_not_stored(server, distilbert_dir, data_files,
                                                                            tmp_path):
    folder, url = server
    args = [str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "--env-manager", "local",
            "--experiment-name", "secret-env"]
    for k, v in tune_settings(distilbert_dir, data_files).items():
        args += ["-P", f"{k}={v}"]
    proc, out = run(args, url, tmp_path, OPTUNA_STORAGE=f"sqlite:///{tmp_path}/o.db?password={ENCODED}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_of(url)
    runs = client.search_runs([client.get_experiment_by_name("secret-env").experiment_id])
    [parent] = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.params["storage"].endswith("?password=***")
    assert leaks(folder, out) == []


REFUSED = {
    "unsupported scheme": lambda: f"redis://u:{ENCODED}@127.0.0.1/0",
    # a closed port (without a PostgreSQL driver installed, the missing driver is the reason)
    "unreachable server": lambda: f"postgresql://u:{ENCODED}@127.0.0.1:{free_port()}/optuna",
    # a driver would read "x@127.0.0.1" as the host and print it
    "unencoded password": lambda: f"postgresql://u:{CANARY}@127.0.0.1:{free_port()}/optuna",
}


@pytest.mark.parametrize("how", [f"{given}, {case}" for case in REFUSED for given in ("flag", "environment")])
def test_refused_storage_shows_only_the_masked_url(how, server, distilbert_dir, data_files, tmp_path):
    folder, url = server
    storage = REFUSED[how.split(", ")[1]]()
    given = {"argv": ["--storage", storage]} if how.startswith("flag") else {"env": {"OPTUNA_STORAGE": storage}}
    proc, out = run([sys.executable, "-m", "src.tune", *given.get("argv", []),
                     *tune_args(distilbert_dir, data_files, "secret-refused")], url, tmp_path, **given.get("env", {}))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "u:***@127.0.0.1" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert leaks(folder, out) == []
    assert not list(tmp_path.iterdir())  # no storage, no mlflow.db


def test_refused_storage_under_mlflow_run_fails_the_run_with_the_masked_reason(server, distilbert_dir, data_files,
                                                                               tmp_path):
    folder, url = server
    storage = f"postgresql://u:{ENCODED}@127.0.0.1:{free_port()}/optuna"
    args = [str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "--env-manager", "local",
            "--experiment-name", "secret-project-refused", "-P", f"model={distilbert_dir}",
            "-P", f"train_data={data_files[0]}", "-P", f"test_data={data_files[1]}"]
    proc, out = run(args, url, tmp_path, OPTUNA_STORAGE=storage)
    assert proc.returncode != 0
    client = client_of(url)
    [project_run] = client.search_runs([client.get_experiment_by_name("secret-project-refused").experiment_id])
    note = project_run.data.tags["mlflow.note.content"]
    assert project_run.info.status == "FAILED" and note.startswith("error: cannot open Optuna storage")
    assert "u:***@127.0.0.1" in note and project_run.data.tags["error"] == note.removeprefix("error: ")
    assert leaks(folder, out) == []


def test_tracking_uri_credentials_are_never_printed_or_stored(server, distilbert_dir, data_files, tmp_path):
    folder, url = server
    with_password = url.replace("http://", f"http://u:{ENCODED}@")
    train = [sys.executable, "-m", "src.train", "--model", str(distilbert_dir), "--train-data", str(data_files[0]),
             "--test-data", str(data_files[1]), *TINY, "--checkpoint-dir", "", "--experiment-name", "secret-uri"]
    proc, out = run(train, with_password, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the project's link names the bare server; MLflow's own "View run ... at" lines are silenced
    assert f"view in MLflow: {url}/#/experiments/" in out and "View run" not in out
    down = with_password.rsplit(":", 1)[0] + f":{free_port()}"
    refused, refused_out = run(train, down, tmp_path)
    # the credentials left the URI before anything ran: the error line names the bare server
    assert refused.returncode == 2 and "MLflow tracking server http://127.0.0.1:" in refused.stderr
    assert leaks(folder, out, refused_out) == []


@pytest.mark.parametrize("userinfo, user, password", [
    (f"u:{ENCODED}", "u", CANARY), (f"tok-{TOKEN}", f"tok-{TOKEN}", ""),
])
def test_tracking_uri_user_info_moves_to_the_variables_mlflow_never_prints(userinfo, user, password, monkeypatch):
    from src.cli import move_tracking_credentials

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{userinfo}@127.0.0.1:5000/")
    move_tracking_credentials()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000/"
    # a token alone: username with an empty password, so MLflow's client sends no basic auth, as it
    # sent none for the token in the URI (it needs both)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (user, password)


def test_tracking_uri_secret_that_cannot_move_is_refused(monkeypatch, capsys):
    from src.cli import move_tracking_credentials

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:5000/?token={TOKEN}")
    with pytest.raises(SystemExit) as exit_:
        move_tracking_credentials()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: MLFLOW_TRACKING_URI http://127.0.0.1:5000/?token=***")
    assert TOKEN not in err


def tiny_project_params(model_dir, data_files) -> list[str]:
    settings = {"model": model_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 1,
                "batch_size": 16, "max_train_samples": 80, "max_test_samples": 40, "checkpoint_dir": ""}
    return [x for k, v in settings.items() for x in ("-P", f"{k}={v}")]


def test_make_and_the_launcher_never_print_tracking_credentials(server, distilbert_dir, data_files, tmp_path):
    """`mlflow run` prints its tracking URI from a process this project's code never runs in: `make lora`
    (a password) and `python -m src.launch` (a token alone, README's safe form) move it out first."""
    folder, url = server
    params = tiny_project_params(distilbert_dir, data_files)
    venv = BIN.parent
    make = ["make", "-C", str(ROOT), "lora", f"VENV={venv}", "-o", f"{venv}/.installed", f"ARGS={shlex.join(params)}"]
    proc, out = run(make, url.replace("http://", f"http://u:{ENCODED}@"), tmp_path,
                    MLFLOW_EXPERIMENT_NAME="secret-make")
    assert proc.returncode == 0, out[-3000:]
    # the command's one link, to the bare server; MLflow's own lines (parent and child) are silenced
    assert out.count(f"view in MLflow: {url}/#/experiments/") == 1 and "View run" not in out
    launch = [sys.executable, "-m", "src.launch", str(ROOT), "-e", "lora", "--env-manager", "local",
              "--experiment-name", "secret-launch", *params]
    token, token_out = run(launch, url.replace("http://", f"http://tok-{TOKEN}@"), tmp_path)
    assert token.returncode == 0, token_out[-3000:]
    client = client_of(url)
    for experiment in ("secret-make", "secret-launch"):
        [done] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert done.info.status == "FINISHED"
    assert leaks(folder, out, token_out) == []


def test_launcher_refuses_a_credential_in_a_parameter_before_mlflow_logs_it(server, tmp_path):
    folder, url = server
    launch = [sys.executable, "-m", "src.launch", str(ROOT), "-e", "tune", "--env-manager", "local",
              "--experiment-name", "secret-param", "-P", f"storage=postgresql://u:{ENCODED}@db/optuna"]
    proc, out = run(launch, url, tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: -P storage=postgresql://u:***@db/optuna holds"), out
    assert client_of(url).get_experiment_by_name("secret-param") is None  # MLflow never started
    assert leaks(folder, out) == []


@pytest.mark.parametrize("userinfo", [f"u:{ENCODED}", f"tok-{TOKEN}"])
def test_unreachable_tracking_server_error_names_it_without_user_info(userinfo, server, distilbert_dir, data_files,
                                                                       tmp_path):
    folder, _ = server
    down = f"http://{userinfo}@127.0.0.1:{free_port()}"
    for command in ([sys.executable, "-m", "src.train", "--model", str(distilbert_dir), "--train-data",
                     str(data_files[0]), "--test-data", str(data_files[1])],
                    [sys.executable, "-m", "src.launch", str(ROOT), "-e", "lora"]):
        proc, out = run(command, down, tmp_path)
        assert proc.returncode == 2, out[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking server http://127.0.0.1:")
        assert leaks(folder, out) == []
