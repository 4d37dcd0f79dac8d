"""Optuna search with real storage and a real MLflow server: nested runs, pruning, registry, resume."""

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from src.base.config import RunConfig, TuneConfig
from src.flows.search import run_study
from tests.conftest import ROOT

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def base_cfg(model_dir, data_files, experiment, **over):
    values = {"model": str(model_dir), "train_data": str(data_files[0]), "test_data": str(data_files[1]),
              "epochs": 2, "batch_size": 16, "strategy": "lora", "experiment_name": experiment,
              "registered_model_name": "tuned-tiny", **over}
    return RunConfig.from_flat(values)


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500)


@pytest.fixture(scope="module")
def first_study(tracking, distilbert_dir, data_files, tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna')}/optuna.db"
    tc = TuneConfig(n_trials=3, study_name="first", storage=storage, pruner="none",
                    learning_rate_range="2e-3,8e-3", target_module_choices="auto")
    return run_study(base_cfg(distilbert_dir, data_files, "tune-first"), tc), storage


def test_study_makes_one_parent_and_a_child_per_trial(tracking, first_study):
    result, storage = first_study
    runs = runs_of(tracking, "tune-first")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-first"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2]
    assert all(c.data.tags["optuna.state"] == "COMPLETE" and c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name.split()[0] for c in children) == ["t00", "t01", "t02"]
    assert all(c.info.run_name.split()[1:3] == ["lora", f"r{c.data.params['lora_r']}"] for c in children)
    # a trial run carries what a `lora` run carries, its logged model included
    winner = next(c for c in children if c.info.run_id == result["best_run_id"])
    for child in children:
        assert {"val/accuracy", "val/best_accuracy", "train/loss", "train/samples_per_s"} <= set(child.data.metrics)
        assert "lora_r" in child.data.params and "trainable_params" in child.data.params
        assert len(child.outputs.model_outputs) == 1
        # the search never sees test: only its winner is scored on it, once, after the search
        assert any(k.startswith("test/") for k in child.data.metrics) == (child is winner)
    assert winner.data.metrics["test/accuracy"] == pytest.approx(result["test"]["accuracy"])
    # the parent: study settings, best params and value, figures; its description tells the story
    best = optuna.load_study(study_name="first", storage=storage).best_trial
    assert parent.data.params["best_lora_r"] == str(best.params["lora_r"])
    assert parent.data.metrics["best/val_accuracy"] == pytest.approx(best.value)
    assert parent.data.params["n_trials"] == "3" and parent.data.params["pruner"] == "none"
    assert not any(k.startswith("test/") for k in parent.data.metrics)
    # the study's row names the model it chose: an external model standing for its winner's
    (stands_for,) = tracking.search_logged_models([parent.info.experiment_id],
                                                  filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert stands_for.name == "winner" and stands_for.tags["winner.run_id"] == winner.info.run_id
    assert stands_for.tags["winner.model_id"] == winner.outputs.model_outputs[0].model_id
    assert stands_for.params["lora_r"] == winner.data.params["lora_r"]
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"Study first: best {winner.info.run_name}: val accuracy {best.value:.4f}, test accuracy "
                           f"{result['test']['accuracy']:.4f}"), note
    assert "trials 3 complete, 0 pruned, 0 failed. tuned-tiny: version 1 is champion" in note
    files = {a.path for a in tracking.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/rank_vs_alpha.png", "study/trials.md"} <= files
    assert result["best_run_id"] in {c.info.run_id for c in children}


def test_winner_is_registered_as_champion_and_predicts_offline(tracking, first_study, data_files):
    result, _ = first_study
    version = tracking.get_model_version_by_alias("tuned-tiny", "champion")
    assert version.version == result["version"] == "1"
    assert version.run_id == result["best_run_id"]  # the winning trial's own logged model, not a copy
    assert version.tags["decision"] == "champion" and len(version.tags) <= 8
    assert version.description.startswith("tuned-tiny: version 1 is champion: test accuracy")
    assert result["decision"]["note"] == "first champion of this model"
    assert result["decision"]["submitted"] == {"optuna.study": "first", "optuna.trial": result["best_trial"]}
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/tuned-tiny@champion")
    test = pd.read_parquet(data_files[1])
    out = model.predict(test[["text"]])
    assert (out["label"].astype(int) == test["label"]).mean() == pytest.approx(result["test"]["accuracy"])


def test_study_no_better_than_champion_becomes_challenger(tracking, first_study, distilbert_dir, data_files,
                                                         tmp_path):
    """A learning rate of 1e-7 leaves the pretrained tiny model as it was: at best as good as the champion."""
    tc = TuneConfig(n_trials=1, study_name="worse", storage=f"sqlite:///{tmp_path}/o.db", pruner="none",
                    learning_rate_range="1e-7,1e-7", lora_r_choices="2", target_module_choices="auto",
                    evaluate_test=False)
    result = run_study(base_cfg(distilbert_dir, data_files, "tune-worse", epochs=1), tc)
    assert result["alias"] == "challenger" and result["version"] == "2"
    assert tracking.get_model_version_by_alias("tuned-tiny", "champion").version == "1"
    assert tracking.get_model_version_by_alias("tuned-tiny", "challenger").version == "2"
    decision = result["decision"]  # judged on validation (evaluate_test off), champion and candidate alike
    assert decision["split"] == "val" and not decision["significant"]
    assert decision["champion_accuracy"] >= decision["candidate_accuracy"]
    version = tracking.get_model_version("tuned-tiny", "2")
    assert version.tags["decision"] == "challenger" and "evidence.p_value" in version.tags
    # test not scored: the winner's logged model carries its validation metrics, tied to the validation set
    parent = next(r for r in runs_of(tracking, "tune-worse") if "optuna.trial" not in r.data.tags)
    (output,) = tracking.get_run(result["best_run_id"]).outputs.model_outputs
    linked = {m.key: m for m in tracking.get_logged_model(output.model_id).metrics if m.dataset_name}
    assert linked["val/best_accuracy"].value == pytest.approx(parent.data.metrics["best/val_accuracy"])
    assert linked["val/best_accuracy"].dataset_name == "train-validation"


def test_pruning_prunes_a_bad_region(tracking, distilbert_dir, data_files, tmp_path):
    tc = TuneConfig(n_trials=6, study_name="prune", storage=f"sqlite:///{tmp_path}/o.db", pruner="median",
                    learning_rate_range="1e-9,1e-2", target_module_choices="auto", evaluate_test=False)
    cfg = base_cfg(distilbert_dir, data_files, "tune-prune", epochs=3, selection_metric="loss",
                   registered_model_name="")
    run_study(cfg, tc)
    study = optuna.load_study(study_name="prune", storage=tc.storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [(t.state, t.params) for t in study.trials]
    assert all(t.last_step < 3 for t in pruned)  # a trial that trained every epoch is never pruned
    # what was pruned is the bad region: slower learning rates than every complete trial's best
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert min(t.params["learning_rate"] for t in pruned) < min(t.params["learning_rate"] for t in complete)
    runs = {r.data.tags.get("optuna.trial"): r for r in runs_of(tracking, "tune-prune")}
    for t in pruned:
        run = runs[str(t.number)]
        assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
        assert len(tracking.get_metric_history(run.info.run_id, "val/loss")) < 3


def test_orphan_sweep_spares_a_live_trial_of_the_same_study_name_on_another_storage(tracking, tmp_path):
    """Two teams, one study name, two storages: trial numbers mean different trials, so a sweep
    closes only runs of its own storage."""
    from src.base.urls import identity
    from src.flows.search import close_orphans

    mine, theirs = f"sqlite:///{tmp_path}/mine.db", f"sqlite:///{tmp_path}/theirs.db"
    live = optuna.create_study(study_name="same", storage=theirs)
    trial = live.ask()  # RUNNING in their storage, not in mine
    experiment = tracking.create_experiment("tune-two-storages")
    tags = {"optuna.study": "same", "optuna.storage_id": identity(theirs)}
    parent = tracking.create_run(experiment, tags={**tags, "tune.host": socket.gethostname(),
                                                   "tune.pid": str(os.getpid())})
    child = tracking.create_run(experiment, tags={**tags, "optuna.trial": str(trial.number),
                                                  "mlflow.parentRunId": parent.info.run_id}).info.run_id
    sweep = optuna.create_study(study_name="same", storage=mine)
    assert close_orphans(tracking, experiment, sweep, {**tags, "optuna.storage_id": identity(mine)}) == 0
    assert tracking.get_run(child).info.status == "RUNNING"
    # their own sweep closes it once their storage no longer runs the trial (its worker was killed)
    live.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert close_orphans(tracking, experiment, live, tags) == 1
    assert tracking.get_run(child).info.status == "KILLED"
    assert tracking.get_run(parent.info.run_id).info.status == "RUNNING"  # its process (this one) lives


def tune_cmd(model_dir, data_files, storage, study, experiment, n_trials, extra=()):
    return [sys.executable, "-m", "src.tune", "--model", str(model_dir), "--train-data", str(data_files[0]),
            "--test-data", str(data_files[1]), "--epochs", "2", "--batch-size", "16", "--storage", storage,
            "--study-name", study, "--n-trials", str(n_trials), "--experiment-name", experiment,
            "--registered-model-name", "", "--pruner", "none", "--learning-rate-range", "2e-3,8e-3",
            "--heartbeat-interval", "1", *extra]


def test_killed_worker_resumes_without_orphan_runs(tracking, distilbert_dir, data_files, tmp_path):
    storage = f"sqlite:///{tmp_path}/o.db"
    cmd = tune_cmd(distilbert_dir, data_files, storage, "resume", "tune-resume", 3)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill while the second trial trains: its MLflow run exists
        exp = tracking.get_experiment_by_name("tune-resume")
        runs = tracking.search_runs([exp.experiment_id], "tags.`optuna.trial` = '1'") if exp else []
        if runs:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the heartbeat grace period
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1, states
    assert states[1] == "FAIL"  # the killed trial; numbering continued after it
    runs = runs_of(tracking, "tune-resume")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.data.tags.get("optuna.trial") == "1"]
    assert [r.info.status for r in killed] == ["KILLED"] and killed[0].data.tags["optuna.state"] == "FAIL"


def test_interrupted_trial_fails_and_the_study_continues(tracking, distilbert_dir, data_files, tmp_path):
    storage = f"sqlite:///{tmp_path}/o.db"
    cmd = tune_cmd(distilbert_dir, data_files, storage, "interrupt", "tune-interrupt", 2)
    # A long first trial (the last --epochs wins), so the signal lands while it trains even when a
    # 2-epoch trial of the tiny model takes less than a second.
    proc = subprocess.Popen([*cmd, "--epochs", "40"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # SIGTERM while the first trial trains
            exp = tracking.get_experiment_by_name("tune-interrupt")
            if exp and tracking.search_runs([exp.experiment_id], "tags.`optuna.trial` = '0'"):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "trial 0 interrupted: FAIL" in err, err[-2000:]
    # FAIL at once, not after a heartbeat timeout; MLflow shows the same, nothing RUNNING
    assert [t.state.name for t in optuna.load_study(study_name="interrupt", storage=storage).trials] == ["FAIL"]
    runs = runs_of(tracking, "tune-interrupt")
    assert sorted((r.data.tags.get("optuna.trial", "parent"), r.info.status) for r in runs) == [
        ("0", "KILLED"), ("parent", "KILLED")]
    assert [r.data.tags["optuna.state"] for r in runs if "optuna.trial" in r.data.tags] == ["FAIL"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="interrupt", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert not [r for r in runs_of(tracking, "tune-interrupt") if r.info.status == "RUNNING"]


def test_two_workers_share_one_study(tracking, distilbert_dir, data_files, tmp_path):
    storage = f"sqlite:///{tmp_path}/o.db"
    optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    cmd = tune_cmd(distilbert_dir, data_files, storage, "shared", "tune-shared", 4)
    workers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=400) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    # both workers did trials; the shared target stops them (a worker may finish one trial in flight)
    assert 4 <= sum(t.state.name == "COMPLETE" for t in trials) <= 5
    runs = runs_of(tracking, "tune-shared")
    assert sum("optuna.trial" in r.data.tags for r in runs) == len(trials)
    assert len({r.data.tags["tune.pid"] for r in runs if "tune.pid" in r.data.tags}) == 2


@pytest.mark.parametrize("args, message", [
    (["--storage", "redis://localhost/0"], "--storage 'redis://localhost/0' is not supported"),
    (["--learning-rate-range", "1e-3,1e-4"], "--learning-rate-range must be low,high"),
    (["--lora-r-choices", ""], "--lora-r-choices must be positive integers"),
    (["--n-trials", "0"], "--n-trials must be at least 1"),
    (["--target-module-choices", "everything"], "--target-module-choices must be from"),
])
def test_bad_tune_input(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "src.tune", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # no storage, no mlflow.db


def test_tuning_under_a_launcher_is_refused(tmp_path):
    """torchrun sets LOCAL_RANK/WORLD_SIZE: every rank would run its own trials; one line says what to do."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-m", "src.tune"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith("error: python -m src.tune runs one process per worker") and "--device cuda:N" in \
        proc.stderr
    assert not list(tmp_path.iterdir())


def test_journal_file_storage(tracking, distilbert_dir, data_files, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.log"
    tc = TuneConfig(n_trials=1, study_name="journal", storage=str(journal), pruner="none",
                    learning_rate_range="5e-3,5e-3", lora_r_choices="4", target_module_choices="auto",
                    evaluate_test=False)
    run_study(base_cfg(distilbert_dir, data_files, "tune-journal", epochs=1, registered_model_name=""), tc)
    study = optuna.load_study(study_name="journal", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


def test_strategy_search_draws_a_cost_quality_front(tracking, distilbert_dir, data_files, tmp_path):
    """Full fine-tuning against LoRA, two objectives: validation accuracy and trainable parameters."""
    from src.flows.report import pareto_front

    storage = f"sqlite:///{tmp_path}/o.db"
    tc = TuneConfig(n_trials=4, study_name="frontier", storage=storage, strategy_choices="full,lora",
                    objectives="metric,trainable_params", full_learning_rate_range="1e-3,1e-3",
                    learning_rate_range="5e-3,5e-3", lora_r_choices="2,8", target_module_choices="auto",
                    sampler_seed=3)
    result = run_study(base_cfg(distilbert_dir, data_files, "tune-frontier", epochs=1,
                                registered_model_name="frontier-tiny"), tc)
    study = optuna.load_study(study_name="frontier", storage=storage)
    assert len(study.directions) == 2
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert {t.params["strategy"] for t in trials} == {"full", "lora"}, [t.params for t in trials]
    on_front = pareto_front([t.values[0] for t in trials], [t.values[1] for t in trials])
    expected = sorted(t.number for t, f in zip(trials, on_front, strict=True) if f)
    runs = runs_of(tracking, "tune-frontier")
    [parent] = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert parent.data.params["pareto_trials"] == ",".join(map(str, expected))
    assert {"study/pareto_front.png", "study/pareto_front.json"} <= {
        a.path for a in tracking.list_artifacts(parent.info.run_id, "study")}
    # every trial logged its model (full fine-tuning's whole weights, LoRA's adapter), so either can be
    # registered; the registered winner is the front's best-accuracy trial
    for r in runs:
        if "optuna.trial" in r.data.tags:
            (output,) = r.outputs.model_outputs
            assert tracking.get_logged_model(output.model_id).model_type == r.data.tags["strategy"]
    best = max((t for t, f in zip(trials, on_front, strict=True) if f), key=lambda t: t.values[0])
    assert result["best_trial"] == best.number and result["alias"] == "champion"


def test_a_study_keeps_its_objectives(tracking, distilbert_dir, data_files, tmp_path):
    from src.base.config import ConfigError

    storage = f"sqlite:///{tmp_path}/o.db"
    optuna.create_study(study_name="single", storage=storage, direction="maximize")
    tc = TuneConfig(n_trials=1, study_name="single", storage=storage, objectives="metric,trainable_params")
    with pytest.raises(ConfigError, match=r"optimizes 1 objective\(s\) \(maximize\), this command 2"):
        run_study(base_cfg(distilbert_dir, data_files, "tune-objectives", epochs=1), tc)
    assert tracking.get_experiment_by_name("tune-objectives") is None  # refused before any run
    assert optuna.load_study(study_name="single", storage=storage).trials == []


def test_full_only_search_registers_from_weights(tracking, distilbert_dir, data_files, tmp_path):
    tc = TuneConfig(n_trials=1, study_name="full-only", storage=f"sqlite:///{tmp_path}/o.db", pruner="none",
                    strategy_choices="full", full_learning_rate_range="1e-3,1e-3")
    result = run_study(base_cfg(distilbert_dir, data_files, "tune-full-only", epochs=1,
                                registered_model_name="full-only-tiny"), tc)
    assert result["alias"] == "champion" and result["best_params"] == {}
    version = tracking.get_model_version("full-only-tiny", result["version"])
    assert tracking.get_run(version.run_id).data.tags["strategy"] == "full"


def test_pareto_front_marks_only_non_dominated_points():
    from src.flows.report import pareto_front

    quality = [0.90, 0.85, 0.80, 0.92, 0.85, float("nan")]
    cost = [1e5, 1e5, 5e4, 2e7, 3e5, 10]
    # 0.85@1e5 is dominated by 0.90@1e5; 0.85@3e5 by 0.90@1e5; nan is never on the front
    assert list(pareto_front(quality, cost)) == [True, False, True, True, False, False]
