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

from .config import ConfigError, RunConfig


@dataclass
class Outcome:
    run_id: str
    val: dict[str, float]
    test: dict[str, float]
    trainable_params: int
    total_params: int
    best_epoch: int
    train_seconds: float = 0.0


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
    keep_weights: bool = False  # full fine-tuning's weights as an artifact (LoRA always keeps its adapter)
    data: Prepared | None = field(default=None, repr=False)


def preflight(cfg: RunConfig):
    """Cheap checks and loads, in order of cost; returns (splits, tokenizer)."""
    from .data import load_splits
    from .loop import check_device
    from .modeling import attention_dropout_override, check_targets, check_weights, load_config, load_tokenizer
    from .tracking import check_experiment, check_reachable

    check_device(cfg.train.device)
    splits = load_splits(cfg.data)
    cfg.train.loss_weights(splits.label_counts())  # one weight per label, checked now
    check_reachable()
    check_experiment(cfg.tracking.experiment_name)
    if cfg.tracking.registered_model_name:
        from .registry import check_registration

        check_registration(cfg.tracking.registered_model_name, splits.labels)
    tokenizer = load_tokenizer(cfg.model.model)
    config = load_config(cfg.model.model)
    check_weights(cfg.model.model)
    _check_lengths(cfg, config, tokenizer)
    attention_dropout_override(config, cfg.model.attention_dropout)
    if cfg.model.strategy == "lora":
        check_targets(config, cfg.lora)
    if cfg.train.checkpoint_dir:
        from .checkpoint import check_space
        from .modeling import planned_params

        check_space(cfg.train.checkpoint_dir,
                    planned_params(config, cfg.model.strategy, cfg.lora, len(splits.labels)).trainable)
    return splits, tokenizer


def _check_lengths(cfg: RunConfig, config, tokenizer) -> None:
    from .modeling import length_limit

    limit = length_limit(config, tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError(f"--max-length {cfg.data.max_length} exceeds what {cfg.model.model!r} takes ({limit} "
                          f"tokens); pass --max-length {limit} or less")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model.model!r} has no padding token; pick an encoder model")


def prepare(cfg: RunConfig, reuse: Prepared | None = None) -> Prepared:
    """Checked, split and tokenized data; `reuse` (prepared for the same data and model) skips the
    loading and tokenizing, while the LoRA targets are still checked for this configuration."""
    key = (repr(cfg.data), cfg.model.model)
    if reuse is not None and reuse.key == key:
        if cfg.model.strategy == "lora":
            from .modeling import check_targets, load_config

            check_targets(load_config(cfg.model.model), cfg.lora)
        return reuse
    splits, tokenizer = preflight(cfg)
    from .data import tokenize

    encoded = {name: tokenize(df, tokenizer, cfg.data.max_length)
               for name, df in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    return Prepared(key, splits, tokenizer, encoded)


def finetune(cfg: RunConfig, **options: Any) -> Outcome:
    """One run (options: `Options`). A checkpoint lock taken during the run is held until it ends,
    however it ends."""
    opts = Options(**options)
    data = prepare(cfg, opts.data)
    from .loop import init_distributed

    dist = init_distributed(cfg.train.dist_timeout)
    if not dist.main:
        # Under `torchrun`/`accelerate launch` only rank 0 talks to MLflow; the others train and evaluate.
        return _train_quietly(cfg, data, dist, opts.evaluate_test)
    with contextlib.ExitStack() as held:
        return _tracked(cfg, data, dist, held, opts)


def _resume_point(cfg: RunConfig, held: contextlib.ExitStack, dist):
    """(state, checkpointer) of the run to resume, or (None, None) for a fresh run."""
    resume_id = cfg.tracking.resume_run_id
    if not resume_id:
        return None, None
    from . import checkpoint, tracking

    if dist.world > 1:
        # A checkpoint holds one process's state: the other ranks' RNG and data-order states are not
        # saved, so a resumed data-parallel job would not continue the interrupted one exactly.
        raise ConfigError("--resume-run-id works in a single process: a checkpoint holds rank 0's state only, not "
                          "the other ranks'; resume without torchrun/accelerate launch (same settings)")
    # Locked before the run reopens: a second resume of a live run is refused without touching it.
    saver = held.enter_context(checkpoint.resumable(cfg.train.checkpoint_dir, resume_id, cfg.flat()))
    tracking.check_resumable(resume_id)
    return saver.load(), saver


def _tracked(cfg: RunConfig, data: Prepared, dist, held: contextlib.ExitStack, opts: Options) -> Outcome:
    from . import checkpoint, tracking
    from .loop import fit

    state, saver = _resume_point(cfg, held, dist)
    resume_id = cfg.tracking.resume_run_id
    with tracking.run(cfg, nested=opts.nested, tags=opts.tags, killed_on=opts.killed_on,
                      resume_run_id=resume_id) as active:
        run_id = active.info.run_id
        if opts.on_start is not None:
            opts.on_start(run_id)
        if saver is None and cfg.train.checkpoint_dir:
            saver = held.enter_context(checkpoint.Checkpointer(cfg.train.checkpoint_dir, run_id, cfg.flat()))
        model, counts, contract = _build_logged(cfg, data, dist, resumed=bool(resume_id))
        logger = tracking.MlflowLogger(run_id, tracking.logged_steps(run_id) if resume_id else None,
                                       resumable=saver is not None)
        result = fit(model, data.encoded["train"], data.encoded["val"], cfg.train, cfg.learning_rate,
                     len(data.splits.labels), data.tokenizer.pad_token_id, logger=logger, on_epoch=opts.on_epoch,
                     dist=dist, checkpointer=saver, resume=state)
        tracking.log_fit(result)
        outcome, trained, held_out = _conclude(cfg, data, model, result, contract, opts, dist)
        outcome.run_id, outcome.trainable_params, outcome.total_params = run_id, counts.trainable, counts.total
        tracking.log_summary(cfg, model, outcome)  # before the gate: a refused model's run still says what it scored
        if cfg.tracking.registered_model_name:
            from .registry import publish

            publish(trained, held_out, cfg)
        if saver is not None:
            saver.remove()  # finished: the model and its metrics are in MLflow now
        return outcome


def _build_logged(cfg: RunConfig, data: Prepared, dist, resumed: bool):
    """The model to train, with the run's setup logged; returns (model, counts, data-contract tags)."""
    from . import tracking
    from .loop import pick_device, precision_choice, seed_everything
    from .modeling import build_model, count_params

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.model, cfg.model.strategy, data.splits.labels, cfg.lora,
                        cfg.model.attention_dropout)
    counts = count_params(model)
    device = pick_device(cfg.train.device)
    dtype, precision_reason = precision_choice(cfg.train.precision, device)
    contract = tracking.log_setup(cfg, data.splits, {
        "trainable_params": counts.trainable, "total_params": counts.total,
        "trainable_pct": round(counts.pct, 4), "resolved_device": str(device),
        "compute_dtype": str(dtype).split(".")[-1], "precision_reason": precision_reason, "world_size": dist.world,
        "global_batch_size": cfg.train.batch_size * dist.world,
    }, resumed=resumed, tokenizer=data.tokenizer)
    return model, counts, contract


def _conclude(cfg: RunConfig, data: Prepared, model, result, contract: dict[str, str], opts: Options, dist):
    """After training: calibrate, log validation (and test, scored once), keep the adapter or weights.
    Returns the outcome and what publishing needs: the trained model and its held-out predictions."""
    from . import tracking
    from .names import ADAPTER, WEIGHTS, metric
    from .registry import HeldOut, Trained

    temperature = calibrate(cfg, result.best_val)
    # val/accuracy etc. are per-epoch histories; val/best_* hold the selected epoch for comparisons.
    val = tracking.log_evaluation("val", result.best_val, data.splits.labels, prefix="best_",
                                  lengths=data.encoded["val"].lengths, max_length=cfg.data.max_length,
                                  temperature=temperature, headline=not opts.evaluate_test)
    test_ev = score_test(cfg, data, model, temperature, dist) if opts.evaluate_test else None
    test = {} if test_ev is None else test_ev[1]
    if cfg.model.strategy == "lora" or opts.keep_weights:
        tracking.log_trained(model, data.tokenizer, ADAPTER if cfg.model.strategy == "lora" else WEIGHTS)
    # The promotion gate compares with the champion on held-out examples: test when scored.
    held_out = (HeldOut("test", test_ev[0], {metric("test", k): v for k, v in test.items()}) if test_ev else
                HeldOut("val", result.best_val, {metric("val", k, best=True): v for k, v in val.items()}))
    trained = Trained(model, data.tokenizer, data.splits, temperature, contract)
    return Outcome("", val, test, 0, 0, result.best_epoch, result.train_seconds), trained, held_out


def calibrate(cfg: RunConfig, val_ev) -> float:
    """The softmax temperature fitted on validation (test stays unseen), logged; 1.0 when
    --temperature-scaling is off."""
    if not cfg.train.temperature_scaling:
        return 1.0
    from . import tracking
    from .evaluate import fit_temperature

    temperature = fit_temperature(val_ev)
    tracking.log_calibration(temperature)
    return temperature


def score_test(cfg: RunConfig, data: Prepared, model, temperature: float, dist=None, headline: bool = True):
    """The test split, touched once after model selection on validation: (evaluation, logged metrics).
    `headline` also puts its confusion matrix and ROC curve at the run's top level."""
    from . import tracking
    from .loop import Dist, Shapes, pick_device, predict, resolve_precision

    device = pick_device(cfg.train.device)
    ev = predict(model.to(device), data.encoded["test"], cfg.train.eval_batch_size, data.tokenizer.pad_token_id,
                 device, resolve_precision(cfg.train.precision, device), progress="test", dist=dist or Dist(),
                 shapes=Shapes(device, cfg.train.bucket_width, cfg.train.compile))
    metrics = tracking.log_evaluation("test", ev, data.splits.labels, data.splits.test["text"].tolist(),
                                      lengths=data.encoded["test"].lengths, max_length=cfg.data.max_length,
                                      temperature=temperature, headline=headline)
    return ev, metrics


def _train_quietly(cfg: RunConfig, data: Prepared, dist, evaluate_test: bool) -> Outcome:
    """A non-zero rank: the same collective steps as rank 0 (training, validation, test), no tracking."""
    from .loop import Shapes, fit, pick_device, predict, resolve_precision, seed_everything
    from .modeling import build_model

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.model, cfg.model.strategy, data.splits.labels, cfg.lora,
                        cfg.model.attention_dropout)
    pad_id = data.tokenizer.pad_token_id
    result = fit(model, data.encoded["train"], data.encoded["val"], cfg.train, cfg.learning_rate,
                 len(data.splits.labels), pad_id, dist=dist)
    if evaluate_test:
        device = pick_device(cfg.train.device)
        predict(model, data.encoded["test"], cfg.train.eval_batch_size, pad_id, device,
                resolve_precision(cfg.train.precision, device), dist=dist,
                shapes=Shapes(device, cfg.train.bucket_width, cfg.train.compile))
    return Outcome("", result.best_val_metrics, {}, 0, 0, result.best_epoch)
