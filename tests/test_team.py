"""A team's setup on one machine: PostgreSQL as the MLflow store and the Optuna storage, a remote-style
`mlflow server` proxying artifacts, and three `python -m src.tune` workers on one study."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from tests.conftest import ROOT, free_port, start_mlflow_server, stop_mlflow_server
from tests.postgres import create_database

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

WORKERS, PER_WORKER = 3, 2


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("team-server")
    port = free_port()
    proc = start_mlflow_server(folder, port, store=create_database(postgres, "mlflow"))
    yield f"http://127.0.0.1:{port}", folder / "artifacts"
    stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def team_study(team_server, postgres, distilbert_dir, data_files, tmp_path_factory):
    """Three workers started together on an empty storage: they race to create the study, share its
    trials and finish together. Each works in its own folder, as on its own machine."""
    uri, _ = team_server
    storage = create_database(postgres, "optuna")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OPTUNA_STORAGE": storage, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "src.tune", "--model", str(distilbert_dir), "--train-data", str(data_files[0]),
           "--test-data", str(data_files[1]), "--epochs", "1", "--batch-size", "16", "--study-name", "team",
           "--n-trials", str(WORKERS * PER_WORKER), "--experiment-name", "tune-team",
           "--registered-model-name", "team-tiny", "--pruner", "none", "--learning-rate-range", "2e-3,8e-3"]
    homes = [tmp_path_factory.mktemp(f"worker{i}") for i in range(WORKERS)]
    workers = [subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for home in homes]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0] * WORKERS, [err[-3000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    return results, storage, homes


def test_workers_share_one_study_without_repeating_trials(team_server, team_study):
    results, storage, _ = team_study
    trials = optuna.load_study(study_name="team", storage=storage).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and len(trials) >= WORKERS * PER_WORKER
    first = sorted(trials, key=lambda t: t.number)[:WORKERS * PER_WORKER]
    # Same seed in every worker would repeat the random start-up trials exactly, once per worker.
    params = [tuple(sorted(t.params.items())) for t in first]
    assert len(set(params)) == len(params), params
    client = mlflow.MlflowClient(team_server[0])
    exp = client.get_experiment_by_name("tune-team")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert len(parents) == WORKERS and len({r.data.tags["tune.pid"] for r in parents}) == WORKERS
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs if "optuna.trial" in r.data.tags) == sorted(numbers)


def test_one_worker_registers_the_study_winner(team_server, team_study, tmp_path):
    results, storage, _ = team_study
    client = mlflow.MlflowClient(team_server[0])
    versions = client.search_model_versions("name = 'team-tiny'")
    assert [v.version for v in versions] == ["1"], [(v.version, v.tags) for v in versions]
    registering = [r for r in results if "version" in r]
    assert len(registering) == 1 and registering[0]["version"] == "1"
    assert sum(r.get("registered_by") == "another worker" for r in results) == WORKERS - 1
    best = optuna.load_study(study_name="team", storage=storage).best_trial
    # the winner of every worker's trials: its own logged model is the version
    assert versions[0].run_id == best.user_attrs["mlflow_run_id"]
    # the registering worker finished last: its parent run's summary lists every trial of the study
    parent = registering_parent(client)
    table = Path(client.download_artifacts(parent.info.run_id, "study/trials.md", str(tmp_path))).read_text()
    assert {int(line.split("|")[1]) for line in table.splitlines()[2:]} == {
        t.number for t in optuna.load_study(study_name="team", storage=storage).trials}


def registering_parent(client):
    """The study run of the worker that registered: its description ends with the gate's decision."""
    exp = client.get_experiment_by_name("tune-team")
    parents = client.search_runs([exp.experiment_id], "tags.strategy = 'search'")
    [parent] = [r for r in parents if "team-tiny: version 1 is" in r.data.tags.get("mlflow.note.content", "")]
    return parent


def test_artifacts_live_on_the_server_not_on_the_workers(team_server, team_study):
    uri, destination = team_server
    _, _, homes = team_study
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-team")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    run = registering_parent(client)
    stored = Path(destination, exp.experiment_id, run.info.run_id, "artifacts", "study", "trials.md")
    assert stored.is_file()
    version = client.get_model_version("team-tiny", "1")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert Path(destination, model.artifact_location.removeprefix("mlflow-artifacts:/"), "MLmodel").is_file()
    assert [p for home in homes for p in home.rglob("*") if p.is_file()] == []  # no mlruns, no mlflow.db


def test_registered_model_pins_only_what_an_index_serves(team_server, team_study):
    """`mlflow models serve` and `build-docker` pip-install these; a local label (+cpu) is on no index.
    Every trial logged its model, and the server holds them all."""
    found = list(Path(team_server[1]).rglob("requirements.txt"))
    assert found
    for file in found:
        pins = [line for line in file.read_text().splitlines() if "==" in line]
        assert {pin.split("==")[0] for pin in pins} >= {"mlflow", "torch", "transformers", "peft"}
        assert not [pin for pin in pins if "+" in pin], pins


def test_registration_is_claimed_once_per_finished_study(tmp_path):
    """The claim a worker takes before registering: none while a trial runs, one per number of finished
    trials, and given back when the registration fails."""
    from src.flows.search import claim_registration, registration_claim

    storage = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="claims", storage=storage)
    running = study.ask()
    study.add_trial(optuna.create_trial(value=0.5))
    assert claim_registration(study, storage) == ""  # another worker still trains: it registers later
    study.tell(running, 0.7)
    assert claim_registration(study, storage) == "claims:registered@2"
    assert claim_registration(study, storage) == ""  # a worker finishing at the same moment
    study.add_trial(optuna.create_trial(value=0.9))  # the study extended later: its new winner once more
    with pytest.raises(RuntimeError), registration_claim(study, storage) as mine:
        assert mine
        raise RuntimeError("registry down")
    with registration_claim(study, storage) as again:
        assert again  # the failed registration gave its claim back


def test_workers_opening_one_experiment_at_once_all_go_on(team_server):
    """Each run tags its experiment (model training, the results view) once. Workers that start
    together all find the tags missing and set them at the same moment, and MLflow's SQL store inserts
    a tag after looking for it, so on PostgreSQL all but one can be refused. Eight processes open each
    of 20 new experiments at the same instant; every one must go on, and every experiment ends tagged."""
    import time

    from src.base.names import EXPERIMENT_KIND, MODEL_TRAINING

    uri, _ = team_server
    client = mlflow.MlflowClient(uri)
    ids = [client.create_experiment(f"opened-together-{i}") for i in range(20)]
    start = time.time() + 8  # after every interpreter has imported MLflow
    code = ("import sys, time, mlflow; from src.mlflow_io.tracking import mark_model_training\n"
            f"mlflow.set_tracking_uri({uri!r})\n"
            f"for i, experiment_id in enumerate({ids!r}):\n"
            f"    time.sleep(max(0.0, {start} + 0.5 * i - time.time()))\n"
            "    mark_model_training(experiment_id)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e.strip().splitlines()[-1] for e in errors if e.strip()]
    for experiment_id in ids:
        tags = client.get_experiment(experiment_id).tags
        assert tags[EXPERIMENT_KIND] == MODEL_TRAINING and "mlflow.sharedViewState.results" in tags
