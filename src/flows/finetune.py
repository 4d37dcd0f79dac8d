"""One training run, start to end: data -> model -> loop -> evaluation -> MLflow -> registry.

Everything that can be wrong with the inputs is checked before the MLflow run opens or a weight
loads, so a typo costs seconds and leaves nothing behind. An orchestration module: it calls the
stages (data, modeling, loop, evaluate) and the MLflow modules (tracking, registry), never MLflow
itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..base import hub, strategies
from ..base.config import ConfigError, RunConfig
from ..base.names import metric
from ..core import checkpoint
from ..core.checkpoint import check_space
from ..core.data import fingerprint, load_splits, tokenize
from ..core.evaluate import Evaluation, fit_temperature, metrics
from ..core.loop import (
    NullLogger,
    Shapes,
    check_device,
    fit,
    init_distributed,
    pick_device,
    precision_choice,
    predict,
    resolve_precision,
    seed_everything,
)
from ..core.modeling import (
    attention_dropout_override,
    build_model,
    check_weights,
    count_params,
    length_limit,
    load_config,
    load_tokenizer,
    planned_params,
)
from ..core.promotion import describe
from ..mlflow_io import serving, tracking
from ..mlflow_io.gate import Candidate, check_registration, register_gated
from ..mlflow_io.tracking import check_experiment, check_reachable


@dataclass
class Outcome:
    run_id: str
    val: dict[str, float]
    test: dict[str, float]
    trainable_params: int
    total_params: int
    best_epoch: int
    train_seconds: float = 0.0
    model_uri: str = ""  # the run's logged model
    experiment_id: str = ""
    decision: dict[str, Any] | None = None  # the gate's, when the run asked for a registration


@dataclass
class Prepared:
    """Checked, split and tokenized data for one data setting and model. A search prepares it once
    and hands it to every trial (`finetune(..., data=prepared)`)."""

    key: tuple
    splits: Any
    tokenizer: Any
    encoded: dict[str, Any]


@dataclass
class Options:
    """How a caller runs the training: the `train` command with the defaults, an Optuna trial with
    all of them (a nested run, its tags, the pruning callback, the prune exception, no test)."""

    nested: bool = False
    tags: dict[str, str] | None = None
    on_start: Callable[[str], None] | None = None
    on_epoch: Callable[[int, dict[str, float]], None] | None = None
    killed_on: tuple[type[BaseException], ...] = ()
    evaluate_test: bool = True
    data: Prepared | None = field(default=None, repr=False)


def preflight(cfg: RunConfig):
    """Cheap checks and loads, in order of cost; returns (splits, tokenizer)."""

    check_device(cfg.train.device)
    hub.check([cfg.model.model] + ([] if cfg.data.train_data else [cfg.data.dataset]))
    splits = load_splits(cfg.data)
    cfg.train.loss_weights(splits.label_counts())  # one weight per label, checked now
    check_reachable()
    check_experiment(cfg.tracking.experiment_name)
    if cfg.tracking.registered_model_name:

        check_registration(cfg.tracking.registered_model_name, splits.labels)
    tokenizer = load_tokenizer(cfg.model.model)
    config = load_config(cfg.model.model)
    check_weights(cfg.model.model)
    _check_lengths(cfg, config, tokenizer)
    attention_dropout_override(config, cfg.model.attention_dropout)
    strategies.get(cfg.model.strategy).check(config, cfg.lora)
    if cfg.train.checkpoint_dir:

        check_space(cfg.train.checkpoint_dir,
                    planned_params(config, cfg.model.strategy, cfg.lora, len(splits.labels)).trainable)
    return splits, tokenizer


def _check_lengths(cfg: RunConfig, config, tokenizer) -> None:

    limit = length_limit(config, tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError(f"--max-length {cfg.data.max_length} exceeds what {cfg.model.model!r} takes ({limit} "
                          f"tokens); pass --max-length {limit} or less")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model.model!r} has no padding token; pick an encoder model")


def prepare(cfg: RunConfig, reuse: Prepared | None = None) -> Prepared:
    """Checked, split and tokenized data; `reuse` (prepared for the same data and model) skips the
    loading and tokenizing, while the strategy's settings (LoRA targets) are still checked."""
    key = (repr(cfg.data), cfg.model.model)
    if reuse is not None and reuse.key == key:

        strategies.get(cfg.model.strategy).check(load_config(cfg.model.model), cfg.lora)
        return reuse
    splits, tokenizer = preflight(cfg)

    encoded = {name: tokenize(df, tokenizer, cfg.data.max_length)
               for name, df in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    return Prepared(key, splits, tokenizer, encoded)


def finetune(cfg: RunConfig, **options: Any) -> Outcome:
    """One run (options: `Options`). A checkpoint lock taken during the run is held until it ends,
    however it ends. Under `torchrun`/`accelerate launch` every rank runs this same path; only rank 0
    talks to MLflow, the others hold a `NullTracker`."""

    opts = Options(**options)
    data = prepare(cfg, opts.data)
    dist = init_distributed(cfg.train.dist_timeout)
    tracker = tracking.Tracker() if dist.main else NullTracker()
    with contextlib.ExitStack() as held:
        return _run(cfg, data, dist, held, opts, tracker)


class NullTracker:
    """A non-zero rank of a data-parallel job: the calls of `tracking.Tracker`, logging nothing (rank 0
    logs for the job). Evaluations still return their metrics, which the rank's outcome holds."""

    active = False

    @contextlib.contextmanager
    def run(self, *_args, **_kwargs):
        from types import SimpleNamespace

        yield SimpleNamespace(info=SimpleNamespace(run_id="", experiment_id=""))

    def logger(self, *_args, **_kwargs):

        return NullLogger()

    def evaluation(self, _split, ev, names, *_args, **_kwargs) -> dict[str, float]:

        return metrics(ev, len(names))

    def setup(self, *_args, **_kwargs) -> dict[str, str]:
        return {}

    def model(self, *_args, **_kwargs):
        return None

    def fit(self, *_args, **_kwargs) -> None:
        pass

    calibration = link = summary = fit


def _resume_point(cfg: RunConfig, held: contextlib.ExitStack, dist):
    """(state, checkpointer) of the run to resume, or (None, None) for a fresh run."""
    resume_id = cfg.tracking.resume_run_id
    if not resume_id:
        return None, None

    if dist.world > 1:
        # A checkpoint holds one process's state: the other ranks' RNG and data-order states are not
        # saved, so a resumed data-parallel job would not continue the interrupted one exactly.
        raise ConfigError("--resume-run-id works in a single process: a checkpoint holds rank 0's state only, not "
                          "the other ranks'; resume without torchrun/accelerate launch (same settings)")
    # Locked before the run reopens: a second resume of a live run is refused without touching it.
    checkpointer = held.enter_context(checkpoint.resumable(cfg.train.checkpoint_dir, resume_id, cfg.flat()))
    tracking.check_resumable(resume_id)
    return checkpointer.load(), checkpointer


def _run(cfg: RunConfig, data: Prepared, dist, held: contextlib.ExitStack, opts: Options, tracker) -> Outcome:

    state, checkpointer = _resume_point(cfg, held, dist)
    resume_id = cfg.tracking.resume_run_id
    with tracker.run(cfg, nested=opts.nested, tags=opts.tags, killed_on=opts.killed_on,
                     resume_run_id=resume_id) as active:
        run_id = active.info.run_id
        if opts.on_start is not None:
            opts.on_start(run_id)
        if checkpointer is None and cfg.train.checkpoint_dir and tracker.active:
            checkpointer = held.enter_context(checkpoint.Checkpointer(cfg.train.checkpoint_dir, run_id, cfg.flat()))
        model, counts, contract = _build_logged(cfg, data, dist, bool(resume_id), tracker)
        logger = tracker.logger(run_id, resumed=bool(resume_id), resumable=checkpointer is not None)
        result = fit(model, data.encoded["train"], data.encoded["val"], cfg.train, cfg.learning_rate,
                     len(data.splits.labels), data.tokenizer.pad_token_id, logger=logger, on_epoch=opts.on_epoch,
                     dist=dist, checkpointer=checkpointer, resume=state)
        tracker.fit(result)
        outcome, info, held_out = _conclude(cfg, data, model, result, opts, dist, tracker)
        outcome.run_id, outcome.trainable_params, outcome.total_params = run_id, counts.trainable, counts.total
        outcome.experiment_id = active.info.experiment_id
        tracker.summary(cfg, model, outcome)  # before the gate: a refused model's run still says what it scored
        if info is not None:
            outcome.model_uri = info.model_uri
            if cfg.tracking.registered_model_name:
                outcome.decision = judge(candidate(info.model_uri, data.splits, held_out, contract), cfg)
        if checkpointer is not None:
            checkpointer.remove()  # finished: the model and its metrics are in MLflow now
        return outcome


def _build_logged(cfg: RunConfig, data: Prepared, dist, resumed: bool, tracker):
    """The model to train, with the run's setup logged; returns (model, counts, data-contract tags)."""

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.model, cfg.model.strategy, data.splits.labels, cfg.lora,
                        cfg.model.attention_dropout)
    counts = count_params(model)
    device = pick_device(cfg.train.device)
    dtype, precision_reason = precision_choice(cfg.train.precision, device)
    contract = tracker.setup(
        cfg, data.splits,
        {"trainable_params": counts.trainable, "total_params": counts.total, "trainable_pct": round(counts.pct, 4)},
        {"device": str(device), "compute_dtype": str(dtype).split(".")[-1], "precision_reason": precision_reason,
         "world_size": dist.world, "global_batch_size": cfg.train.batch_size * dist.world},
        resumed=resumed, tokenizer=data.tokenizer)
    return model, counts, contract


@dataclass
class HeldOut:
    """A model's predictions on held-out examples: the evidence the promotion gate weighs."""

    split: str  # "test" when the test split was scored, else "val"
    ev: Any  # evaluate.Evaluation on that split
    metrics: dict[str, float] = field(default_factory=dict)  # as logged to the run, e.g. test/accuracy


def _conclude(cfg: RunConfig, data: Prepared, model, result, opts: Options, dist, tracker):
    """After training: calibrate, log validation (and test, scored once), log the model with its
    held-out metrics linked to it. Returns (outcome, the logged model's info, the held-out evidence);
    info is None where nothing is logged (a non-zero rank)."""

    temperature = calibrate(cfg, result.best_val, tracker)
    # val/accuracy etc. are per-epoch histories; val/best_* hold the selected epoch for comparisons.
    val = tracker.evaluation("val", result.best_val, data.splits.labels, prefix="best_",
                                  lengths=data.encoded["val"].lengths, max_length=cfg.data.max_length,
                                  temperature=temperature, headline=not opts.evaluate_test)
    test_ev = score_test(cfg, data, model, temperature, dist, tracker) if opts.evaluate_test else None
    test = {} if test_ev is None else test_ev[1]
    settings = {"strategy": cfg.model.strategy, "max_length": cfg.data.max_length, "temperature": temperature,
                "max_batch_size": cfg.tracking.max_batch_size}
    info = tracker.model(model, data.tokenizer, settings, serving.text_hashes(data.splits.train["text"]),
                         base=cfg.model.model)
    val_metrics = {metric("val", k, best=True): v for k, v in val.items()}
    test_metrics = {metric("test", k): v for k, v in test.items()}
    if info is not None:
        tracker.link(info.model_id, val_metrics, cfg, data.splits, "val")
        if test_ev:
            tracker.link(info.model_id, test_metrics, cfg, data.splits, "test")
    # The promotion gate compares with the champion on held-out examples: test when scored.
    held_out = HeldOut("test", test_ev[0], test_metrics) if test_ev else HeldOut("val", result.best_val, val_metrics)
    return Outcome("", val, test, 0, 0, result.best_epoch, result.train_seconds), info, held_out


def candidate(model_uri: str, splits, held_out: HeldOut, contract: dict[str, str]):
    """What the gate judges: a logged model and its predictions on the held-out split."""
    import numpy as np

    frame = splits.test if held_out.split == "test" else splits.val
    counts = splits.label_counts()
    stored = serving.resolve(model_uri)
    return Candidate(model_uri=f"models:/{stored.model_id}", labels=splits.labels, split=held_out.split,
                     texts=frame["text"].tolist(), truth=np.asarray(held_out.ev.labels),
                     preds=np.asarray(held_out.ev.preds), train_hashes=serving.text_hashes(splits.train["text"]),
                     majority=counts.index(max(counts)), contract=contract,
                     files_digest=serving.manifest_digest(stored.files))


def judge(cand, cfg: RunConfig, version_tags: dict[str, Any] | None = None, err: bool = True) -> dict[str, Any]:
    """The gate's decision on a logged model, printed as one sentence: on stderr beside a run's
    progress, on stdout (`err` False) where the decision is the command's result."""
    import click

    decision = register_gated(cand, cfg.tracking.registered_model_name, cfg.tracking.promotion_alpha, version_tags)
    click.echo(describe(decision), err=err)
    return decision


def judge_logged(run_id: str, splits, cfg: RunConfig, split: str = "test", nested: bool = False,
                 version_tags: dict[str, Any] | None = None,
                 err: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
    """A finished run's logged model, loaded as stored (its files checked against their digests),
    scores `split` once; the run gets those metrics, linked to the model, if it has none for the split
    (a tuning trial is never tested before it wins); then the gate judges the model. The run is
    reopened for it (nested under the active run when `nested`). Returns (decision, metrics)."""
    import mlflow
    import numpy as np

    model_uri = f"runs:/{run_id}/model"
    classifier = serving.load(model_uri)
    frame = splits.test if split == "test" else splits.val
    probs = classifier.probabilities(frame["text"].tolist(), batch_size=cfg.train.eval_batch_size)
    labels = frame["label"].to_numpy()
    ev = Evaluation(labels=labels, probs=probs, loss=float(-np.log(np.clip(probs[np.arange(len(labels)), labels],
                                                                           1e-12, None)).mean()))
    run = mlflow.MlflowClient().get_run(run_id)
    with mlflow.start_run(run_id=run_id, nested=nested):
        key = "test" if split == "test" else "val"
        if not any(k.startswith(f"{key}/") for k in run.data.metrics):
            values = tracking.log_evaluation(key, ev, splits.labels, frame["text"].tolist())
            tracking.link_to_model(serving.resolve(model_uri).model_id,
                                   {metric(key, k): v for k, v in values.items()}, cfg, splits, split)
        contract = {k: v for k, v in run.data.tags.items() if k.startswith(("data.", "tokenizer."))}
        cand = candidate(model_uri, splits, HeldOut(split, ev), contract)
        decision = judge(cand, cfg, version_tags, err)

    return decision, {metric(key, k): v for k, v in metrics(ev, len(splits.labels)).items()}


def register_run(run_id: str, name: str, alpha: float) -> dict[str, Any]:
    """`python -m src.registry register --run-id`: an earlier run's model through the gate, judged on
    the test split its run was configured with (refused if those data changed since)."""
    import dataclasses

    import mlflow

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"run {run_id} does not exist on {tracking.redact(mlflow.get_tracking_uri())}") from None
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} is {run.info.status}; only a finished run's model can be registered")
    cfg = RunConfig.from_flat(tracking.logged_config(run_id))
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, registered_model_name=name,
                                                                promotion_alpha=alpha))
    splits = load_splits(cfg.data)
    if fingerprint(splits.test) != run.data.tags.get("data.fingerprint.test"):
        raise ConfigError(f"the test data of run {run_id} ({cfg.data.test_data or cfg.data.dataset}) are not those it "
                          f"was tested on (their fingerprint differs); the gate needs the same held-out texts")
    return judge_logged(run_id, splits, cfg, err=False)[0]


def calibrate(cfg: RunConfig, val_ev, tracker) -> float:
    """The softmax temperature fitted on validation (test stays unseen), logged; 1.0 when
    --temperature-scaling is off."""
    if not cfg.train.temperature_scaling:
        return 1.0

    temperature = fit_temperature(val_ev)
    tracker.calibration(temperature)
    return temperature


def score_test(cfg: RunConfig, data: Prepared, model, temperature: float, dist, tracker):
    """The test split, touched once after model selection on validation: (evaluation, logged metrics);
    its confusion matrix and ROC curve also go to the run's top level."""

    device = pick_device(cfg.train.device)
    ev = predict(model.to(device), data.encoded["test"], cfg.train.eval_batch_size, data.tokenizer.pad_token_id,
                 device, resolve_precision(cfg.train.precision, device), progress="test", dist=dist,
                 shapes=Shapes(device, cfg.train.bucket_width))
    logged = tracker.evaluation("test", ev, data.splits.labels, data.splits.test["text"].tolist(),
                                 lengths=data.encoded["test"].lengths, max_length=cfg.data.max_length,
                                 temperature=temperature, headline=True)
    return ev, logged

