"""The Optuna search (`python -m src.tune`): LoRA rank, alpha, learning rate, dropout and targets, or
several strategies; trials as nested MLflow runs, pruned on validation; the winner through the gate.

One parent MLflow run per invocation; each trial is a nested run with the same params, metrics,
artifacts and logged model as a training run. Trials are ranked on validation only; the test split is
seen once, by the winner, after the search. MLflow calls for the study's own parent run (its settings,
summary, figures, result) and for the trial runs' Optuna tags are made here; a trial's training run
goes through finetune.py and tracking.py like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import click

from ..base import strategies
from ..base.config import ConfigError, RunConfig, TuneConfig
from ..base.names import DIRECTION, STORAGE_ID, STRATEGY, STUDY, TRIAL, TRIAL_STATE
from ..base.urls import identity, mask, scrub
from ..core.promotion import describe
from ..mlflow_io import tracking
from .finetune import finetune, judge_logged, prepare


@contextlib.contextmanager
def _experimental():
    """Heartbeats and the stale-trial sweep are marked experimental, stable in use since Optuna 2.9:
    their notice is silenced where they are called, not for the whole process."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(tc: TuneConfig):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if tc.storage.endswith(".log"):
        return JournalStorage(JournalFileBackend(tc.storage))
    try:
        return _rdb_storage(tc)
    except Exception as exc:  # noqa: BLE001 - a missing driver, a bad URL, a refused connection: one line

        reason = scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ConfigError(f"cannot open Optuna storage {mask(tc.storage)!r} ({reason})") from None


def _rdb_storage(tc: TuneConfig):
    import time

    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError

    for attempt in range(3):
        try:
            # Heartbeats let a restarted worker mark trials of a killed one as FAIL instead of RUNNING
            # forever. No stale-trial callback: a killed trial is not retried (trials are not resumable).
            with _experimental():
                return RDBStorage(tc.storage, heartbeat_interval=tc.heartbeat_interval,
                                  grace_period=2 * tc.heartbeat_interval)
        except IntegrityError:
            # Workers started together on an empty PostgreSQL race to create Optuna's tables; the
            # losers find them made a moment later.
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def open_study(tc: TuneConfig, storage, directions: list[str], pruner):
    """Create the study, or join it. The worker that creates it samples with --sampler-seed (one
    worker reproduces a search); a joining worker, and a resumed search, with a seed derived from it
    and this process, so workers do not repeat each other's random start-up trials. The constant
    liar makes TPE treat other workers' running trials as bad results instead of sampling next to them."""
    import hashlib

    import optuna

    def sampler(seed: int):
        # TPE handles several objectives itself (MOTPE).
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    kwargs = {"study_name": tc.study_name, "storage": storage, "directions": directions, "pruner": pruner}
    try:
        try:
            return optuna.create_study(sampler=sampler(tc.sampler_seed), **kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            worker = f"{socket.gethostname()}:{os.getpid()}".encode()
            seed = (tc.sampler_seed + int(hashlib.sha256(worker).hexdigest()[:8], 16)) % 2**32
            return optuna.create_study(sampler=sampler(seed), load_if_exists=True, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"study {tc.study_name!r}: {exc}") from exc


@contextlib.contextmanager
def registration_claim(study, storage):
    """Yields whether this worker registers the study's winner; a failed registration gives the
    claim back, so the same command can register again."""
    import optuna

    marker = claim_registration(study, storage)
    try:
        yield bool(marker)
    except BaseException:
        if marker:
            optuna.delete_study(study_name=marker, storage=storage)
        raise


def claim_registration(study, storage) -> str:
    """One registration per study, however many workers: a worker registers only when its study is
    over (no trial running, so every worker's trials count) and it is the first to create the marker
    study `<study>:registered@<finished trials>` in the shared storage (creating a study is atomic on
    every Optuna storage: names are unique). Workers finishing together see the same trials, so the
    same marker; extending the study later (a larger --n-trials) registers its new winner once."""
    import optuna
    from optuna.trial import TrialState

    with _experimental():
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        click.echo("trials of other workers are running: the last worker to finish registers the winner", err=True)
        return ""
    marker = f"{study.study_name}:registered@{sum(t.state.is_finished() for t in trials)}"
    try:
        optuna.create_study(study_name=marker, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        click.echo(f"the winner of this study is registered by another worker ({marker!r})", err=True)
        return ""
    return marker


def make_pruner(name: str):
    import optuna

    if name == "median":
        # Two complete trials before pruning anything; never prune on the first epoch's noise alone
        # when a trial has more than one epoch to show itself.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def sample(trial, space: dict[str, list]) -> dict[str, Any]:
    """Settings of one trial. With several strategies in the search the strategy is sampled first and
    the rest is what that strategy samples (strategies.py)."""

    choices = space["strategy"]
    strategy = trial.suggest_categorical("strategy", choices) if len(choices) > 1 else choices[0]
    return {"strategy": strategy, **strategies.get(strategy).sample(trial, space)}


def trial_config(base: RunConfig, params: dict[str, Any], number: int) -> RunConfig:
    """The run of one trial: the base settings with the sampled ones; trials never register."""
    # Trials are not resumable (a killed trial is FAIL in Optuna), so they write no checkpoints.
    cfg = RunConfig.from_flat({**base.flat(), **params, "registered_model_name": "", "checkpoint_dir": "",
                               "resume_run_id": ""})
    cfg.tracking.run_name = f"t{number:02d} " + " ".join(cfg.name_parts())  # short, and whole in the runs list
    return cfg


def close_orphans(client, experiment_id: str, study, study_tags: dict[str, str]) -> int:
    """MLflow runs of this study left RUNNING by a killed worker: trials that Optuna no longer runs,
    and parent runs whose process on this host is gone. Marked KILLED. Only runs of this study on this
    storage (`study_tags`): a study of the same name elsewhere has trial numbers of its own."""
    import optuna

    running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    closed = 0
    runs = client.search_runs([experiment_id], _tag_filter(study_tags) + " and attributes.status = 'RUNNING'")
    parents = {r.info.run_id for r in runs if TRIAL not in r.data.tags}
    for r in runs:
        tags = r.data.tags
        orphan = False
        if TRIAL in tags:
            orphan = int(tags[TRIAL]) not in running or (
                tags.get("mlflow.parentRunId") not in parents)  # its worker's parent run is over
        elif tags.get("tune.host") == socket.gethostname() and "tune.pid" in tags:
            orphan = not _alive(int(tags["tune.pid"]))
        if orphan:
            client.set_terminated(r.info.run_id, "KILLED")
            client.set_tag(r.info.run_id, TRIAL_STATE, "FAIL") if TRIAL in tags else None
            closed += 1
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Search:
    """An opened search: its settings, the study on its storage and the data every trial shares."""

    cfg: RunConfig  # the trials' base settings (LoRA, no checkpoints)
    tc: TuneConfig
    space: dict[str, list]
    data: Any  # finetune.Prepared, tokenized once for every trial
    storage: Any
    study: Any
    direction: str  # of the selection metric
    cost: str  # the second objective, "" for a single-objective search

    @property
    def metric(self) -> str:
        return self.cfg.train.selection_metric

    @property
    def tags(self) -> dict[str, str]:

        # Runs name their storage by hash: never the URL, masked or not.
        return {STUDY: self.tc.study_name, STORAGE_ID: identity(self.tc.storage)}


def open_search(cfg: RunConfig, tc: TuneConfig) -> Search:
    """Settings checked, data prepared, storage and study opened: all before any MLflow run."""
    import optuna

    space = tc.space()
    # Trials write no checkpoints (see trial_config), so no checkpoint folder is checked for them.
    base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, strategy="lora"),
                               train=dataclasses.replace(cfg.train, checkpoint_dir=""))
    data = prepare(base)  # data, tokenizer and model checks before any storage or run is touched
    storage = make_storage(tc)
    direction = f"{DIRECTION[cfg.train.selection_metric]}imize"
    multi = tc.multi_objective
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if multi and tc.pruner != "none":
        click.echo("multi-objective search: trials are not pruned (Optuna prunes single-objective studies only)",
                   err=True)
    wanted = [direction, "minimize"] if multi else [direction]  # the cost objective is always minimised
    study = open_study(tc, storage, wanted, make_pruner("none" if multi else tc.pruner))
    stored = [d.name.lower() for d in study.directions]
    if stored != wanted:
        # load_if_exists keeps the stored directions: every new trial would end FAIL after training.
        raise ConfigError(f"study {tc.study_name!r} on {mask(tc.storage)} optimizes {len(stored)} "
                          f"objective(s) ({', '.join(stored)}), this command {len(wanted)} "
                          f"({', '.join(wanted)}); use the same --objectives and --selection-metric or another "
                          f"--study-name")
    with _experimental():
        optuna.storages.fail_stale_trials(study)  # trials of killed workers -> FAIL (no-op without heartbeats)
    return Search(base, tc, space, data, storage, study, direction, tc.objectives.split(",")[1] if multi else "")


def run_study(cfg: RunConfig, tc: TuneConfig) -> dict[str, Any]:
    """Open the search, run this worker's trials under one parent run, then pick, log and (once per
    study, whichever worker) register the winner."""
    import mlflow

    search = open_search(cfg, tc)
    with tracking.run(search.cfg, name=f"study-{tc.study_name}",
                      tags={**search.tags, "tune.host": socket.gethostname(), "tune.pid": str(os.getpid()),
                            STRATEGY: "search"}) as parent:
        _start_parent(search, parent)
        optimize(search, parent.info.experiment_id)
        best = pick_winner(search)
        _chosen(best.user_attrs.get("mlflow_run_id"))
        result = {"study": tc.study_name, "best_trial": best.number, "best_value": best.values[0],
                  "best_params": best.params, "best_run_id": best.user_attrs.get("mlflow_run_id")}
        if search.cfg.tracking.registered_model_name:
            result.update(_register_once(search, best))
        mlflow.log_dict(result, "study/result.json")
        mlflow.set_tag("mlflow.note.content", describe_study(search, best, result))
        result["experiment_id"] = parent.info.experiment_id
    return result


def describe_study(search: Search, best, result: dict[str, Any]) -> str:
    """The study run's description: the best trial, its figures, the trials' fates, the registry's decision."""
    import mlflow
    from optuna.trial import TrialState

    run_id = best.user_attrs.get("mlflow_run_id")
    name = mlflow.MlflowClient().get_run(run_id).info.run_name if run_id else f"trial {best.number}"
    figures = f"val {search.metric} {best.values[0]:.4f}"
    test = result.get("test") or {}
    if "accuracy" in test:
        figures += f", test accuracy {test['accuracy']:.4f} F1 {test['f1']:.4f}"
    fates = ", ".join(f"{len(search.study.get_trials(deepcopy=False, states=(state,)))} {word}" for state, word in
                      ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed")))
    decision = result.get("decision")
    registry = (describe(decision) if decision else "registered by another worker" if result.get("registered_by")
                else "not registered")
    return f"Study {search.tc.study_name}: best {name}: {figures}; trials {fates}. {registry}"


def _start_parent(search: Search, parent) -> None:
    """Close the runs a killed worker left RUNNING, then log the search's settings to the parent run
    (those `mlflow run -P` already logged stay as they are)."""
    import mlflow

    client = mlflow.MlflowClient()
    closed = close_orphans(client, parent.info.experiment_id, search.study, search.tags)
    if closed:
        click.echo(f"marked {closed} MLflow run(s) of a killed worker as KILLED", err=True)
    existing = client.get_run(parent.info.run_id).data.params
    settings = {f.name: getattr(search.tc, f.name) for f in dataclasses.fields(TuneConfig)}
    settings.update(storage=mask(search.tc.storage), search_space=json.dumps(search.space),
                    selection_metric=search.metric, direction=search.direction, cost_objective=search.cost)
    mlflow.log_params({k: str(v) for k, v in settings.items() if k not in existing})


def optimize(search: Search, experiment_id: str) -> None:
    """This worker's trials, until the study has --n-trials finished ones (all workers counted)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = search.tc.n_trials - len(search.study.get_trials(deepcopy=False, states=done))
    if remaining > 0:
        # n_trials bounds this worker (failed trials count here, so a broken setup cannot loop
        # forever); MaxTrialsCallback stops it early when other workers reach the shared target.
        search.study.optimize(Objective(search, experiment_id), n_trials=remaining, catch=(Exception,),
                              gc_after_trial=True,
                              callbacks=[MaxTrialsCallback(search.tc.n_trials, states=done), _progress(search)])


class Objective:
    """One trial: sample its settings, train them as a nested run, return the objective value(s).
    The run is tagged with the trial and, when it ends, with the trial's final state."""

    def __init__(self, search: Search, experiment_id: str) -> None:
        self.search, self.experiment_id = search, experiment_id

    def __call__(self, trial) -> float | tuple[float, float]:
        search = self.search
        tcfg = trial_config(search.cfg, sample(trial, search.space), trial.number)
        out = self._run(trial, tcfg)
        if not search.cost:
            return out.val[search.metric]
        spent = out.trainable_params if search.cost == "trainable_params" else out.train_seconds
        return out.val[search.metric], float(spent)

    def _run(self, trial, tcfg: RunConfig):
        import optuna

        state = "FAIL"
        try:
            out = finetune(tcfg, data=self.search.data, nested=True,
                           tags={**self.search.tags, TRIAL: str(trial.number), TRIAL_STATE: "RUNNING"},
                           on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
                           on_epoch=self._pruning(trial, tcfg.train.epochs), killed_on=(optuna.TrialPruned,),
                           evaluate_test=False)
            state = "COMPLETE"
            return out
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except KeyboardInterrupt:
            # Optuna records the trial as FAIL and re-raises; this worker stops (its parent run
            # KILLED) and the same command continues the study with the next trial.
            click.echo(f"trial {trial.number} interrupted: FAIL in study {self.search.tc.study_name!r}; run the "
                       f"same command to continue with the next trial", err=True)
            raise
        finally:
            self._mark(trial, state)

    def _pruning(self, trial, epochs: int):
        import optuna

        def report(epoch: int, values: dict[str, float]) -> None:
            if self.search.cost:
                return  # Optuna prunes single-objective studies only
            trial.report(values[self.search.metric], epoch)
            # after the last epoch the trial has trained fully: its result counts, pruned or not
            if epoch < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")
        return report

    def _mark(self, trial, state: str) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        run_ids = [trial.user_attrs["mlflow_run_id"]] if "mlflow_run_id" in trial.user_attrs else [
            # interrupted between creating its run and reporting the id: find the run by its tags
            r.info.run_id for r in client.search_runs([self.experiment_id], _tag_filter(
                {**self.search.tags, TRIAL: str(trial.number)}))]
        for run_id in run_ids:
            client.set_tag(run_id, TRIAL_STATE, state)


def _tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def _progress(search: Search):
    """One line per finished trial: state, objective value(s), sampled settings."""
    from optuna.trial import TrialState

    def show(_study, trial) -> None:
        value = "" if trial.values is None else f"{search.metric}={trial.values[0]:.4f}"
        if search.cost and trial.values is not None:
            value += f" {search.cost}={_fmt(trial.values[1])}"
        if trial.state == TrialState.PRUNED:
            value = f"pruned at epoch {trial.last_step}"
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        click.echo(f"trial {trial.number:>3} {trial.state.name:<8} {value:<24} {shown}")
    return show


def pick_winner(search: Search):
    """The best trial, with the study's summary, counts and figures logged to the parent run. With two
    objectives the Pareto front is the answer to "what does quality cost"; the registry gets its
    best-metric member (on a front, the best metric is the best of the whole study)."""
    import mlflow
    from optuna.trial import TrialState

    study, metric = search.study, search.metric
    summary = _summary(study)
    click.echo(summary)
    mlflow.log_text(summary, "study/trials.md")
    counts = {state: len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if not counts[TrialState.COMPLETE]:
        raise ConfigError(f"study {search.tc.study_name!r} has no complete trial; nothing to register")
    if not search.cost:
        best = study.best_trial
    else:
        front = study.best_trials
        best = (min if search.direction == "minimize" else max)(front, key=lambda t: t.values[0])
        mlflow.log_dict({"objectives": [metric, search.cost],
                         "trials": [{"number": t.number, "values": t.values, "params": t.params,
                                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]},
                        "study/pareto_front.json")
        mlflow.log_param("pareto_trials", ",".join(str(t.number) for t in sorted(front, key=lambda t: t.number)))
    mlflow.log_params({f"best_{k}": str(v) for k, v in best.params.items()})
    mlflow.log_metrics({f"best/val_{metric}": best.values[0], "best/trial": best.number,
                        "trials/complete": counts[TrialState.COMPLETE], "trials/pruned": counts[TrialState.PRUNED],
                        "trials/failed": counts[TrialState.FAIL]})
    _log_figures(study, metric, search.cost)
    return best


def _register_once(search: Search, best) -> dict[str, Any]:
    """Register the winner if this worker holds the study's registration claim."""
    with registration_claim(search.study, search.storage) as mine:
        if not mine:
            return {"registered_by": "another worker"}
        return register_best(search, best)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _summary(study) -> str:
    keys = sorted({k for t in study.trials for k in t.params})
    rows = ["| trial | state | value | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for t in study.trials:
        value = "" if t.values is None else " / ".join(_fmt(v) if i else f"{v:.4f}" for i, v in enumerate(t.values))
        rows.append(f"| {t.number} | {t.state.name} | {value} | "
                    + " | ".join(_fmt(t.params.get(k, "")) for k in keys) + " |")
    return "\n".join(rows)


def _log_figures(study, metric: str, cost: str = "") -> None:
    """Optimization history, parameter importances, rank-vs-alpha and, for two objectives, the
    Pareto front; each where Optuna can draw it."""
    import matplotlib.pyplot as plt  # Optuna draws with pyplot: closed below
    import mlflow
    from optuna.visualization import matplotlib as ovm

    # With two objectives the single-objective plots show the quality objective.
    target = {"target_name": f"val {metric}"}  # not Optuna's "Objective Value"
    if cost:
        target["target"] = lambda t: t.values[0]
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, **target),
        "param_importances.png": lambda: ovm.plot_param_importances(study, **target),
        "rank_vs_alpha.png": lambda: ovm.plot_contour(study, params=["lora_r", "lora_alpha"], **target),
        "slices.png": lambda: ovm.plot_slice(study, **target),
    }
    if cost:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=[metric, cost])
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
        except Exception as exc:  # noqa: BLE001 - e.g. importances need two complete trials
            mlflow.log_text(f"not drawn: {exc}", f"study/{name}.txt")
            continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        if name == "optimization_history.png":
            from matplotlib.ticker import MaxNLocator

            first.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
        fig = first.figure
        fig.set_size_inches(8, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # contour plots carry a colorbar axis tight_layout cannot place
            fig.tight_layout()
        mlflow.log_figure(fig, f"study/{name}")
        plt.close(fig)


def register_best(search: Search, best) -> dict[str, Any]:
    """The winning trial's logged model, as stored, scored once on test (or judged on validation with
    --evaluate-test false), then through the gate: no retraining, nothing rebuilt."""
    import dataclasses

    run_id = best.user_attrs.get("mlflow_run_id")
    lora = dataclasses.replace(search.cfg.lora, **{k: v for k, v in best.params.items() if k.startswith("lora_")})
    cfg = dataclasses.replace(search.cfg, lora=lora)
    split = "test" if search.tc.evaluate_test else "val"
    tags = {STUDY: search.tc.study_name, TRIAL: best.number}
    decision, metrics = judge_logged(run_id, search.data.splits, cfg, split, nested=True, version_tags=tags)
    test = {k.split("/", 1)[1]: v for k, v in metrics.items()} if split == "test" else None
    return {**({"test": test} if test else {}), "registered_model": cfg.tracking.registered_model_name,
            "version": decision["candidate_version"], "alias": decision["decision"], "decision": decision}


def _chosen(trial_run_id: str) -> None:
    """The study's row in MLflow's runs table names the model it chose. That table lists a run's models
    by their source run, so the study run gets a logged model of its own: `winner`, an external model
    (no files: MLflow's record of a model kept elsewhere) holding the winning trial's params, tagged
    with the logged model it stands for. Loading it is refused; load `winner.model_id`."""
    import mlflow

    client = mlflow.MlflowClient()
    (output,) = client.get_run(trial_run_id).outputs.model_outputs
    winner = client.get_logged_model(output.model_id)
    mlflow.create_external_model(name="winner", source_run_id=mlflow.active_run().info.run_id,
                                 tags={"winner.model_id": output.model_id, "winner.run_id": trial_run_id},
                                 params=dict(winner.params), model_type=winner.model_type)


