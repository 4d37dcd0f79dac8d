"""One tracked run, start to end: data -> model -> loop -> evaluation -> MLflow.

Everything that can be wrong with the inputs is checked before the MLflow run opens or a weight
loads, so a typo costs seconds and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    splits: Any
    tokenizer: Any
    encoded: dict[str, Any]


_PREPARED: dict[tuple, Prepared] = {}


def preflight(cfg: RunConfig):
    """Cheap checks and loads, in order of cost; returns (splits, tokenizer)."""
    from .data import load_splits
    from .modeling import (
        attention_dropout_override,
        check_targets,
        check_weights,
        length_limit,
        load_config,
        load_tokenizer,
        planned_params,
    )
    from .tracking import check_experiment, check_reachable

    splits = load_splits(cfg.data)
    cfg.train.loss_weights(splits.train["label"].value_counts().reindex(range(len(splits.labels)), fill_value=0)
                           .tolist())  # one weight per label, checked now
    check_reachable()
    check_experiment(cfg.tracking.experiment_name)
    if cfg.tracking.registered_model_name:
        from .registry import check_registration

        check_registration(cfg.tracking.registered_model_name, splits.labels)
    tokenizer = load_tokenizer(cfg.model.model)
    config = load_config(cfg.model.model)
    check_weights(cfg.model.model)
    limit = length_limit(config, tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError(f"--max-length {cfg.data.max_length} exceeds what {cfg.model.model!r} takes ({limit} "
                          f"tokens); pass --max-length {limit} or less")
    attention_dropout_override(config, cfg.model.attention_dropout)
    if cfg.model.strategy == "lora":
        check_targets(config, cfg.lora)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model.model!r} has no padding token; pick an encoder model")
    if cfg.train.checkpoint_dir:
        from .checkpoint import check_space

        check_space(cfg.train.checkpoint_dir,
                    planned_params(config, cfg.model.strategy, cfg.lora, len(splits.labels)).trainable)
    return splits, tokenizer


def prepare(cfg: RunConfig) -> Prepared:
    """Checked, split and tokenized data; kept per process, so Optuna trials on the same data
    tokenize once (the LoRA targets are still checked for every trial)."""
    key = (repr(cfg.data), cfg.model.model)
    if key in _PREPARED:
        if cfg.model.strategy == "lora":
            from .modeling import check_targets, load_config

            check_targets(load_config(cfg.model.model), cfg.lora)
        return _PREPARED[key]
    splits, tokenizer = preflight(cfg)
    from .data import tokenize

    encoded = {name: tokenize(df, tokenizer, cfg.data.max_length)
               for name, df in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    _PREPARED.clear()  # one dataset at a time: a long-lived process must not hoard memory
    _PREPARED[key] = Prepared(splits, tokenizer, encoded)
    return _PREPARED[key]


def finetune(cfg: RunConfig, **options: Any) -> Outcome:
    """One run (see `_finetune` for the options). A checkpoint lock taken during the run is
    held until it ends, however it ends."""
    import contextlib

    with contextlib.ExitStack() as held:
        return _finetune(cfg, held, **options)


def _finetune(cfg: RunConfig, held, *, nested: bool = False, tags: dict[str, str] | None = None,
                   on_start: Callable[[str], None] | None = None,
                   on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                   killed_on: tuple[type[BaseException], ...] = (),
                   evaluate_test: bool = True, keep_weights: bool = False) -> Outcome:
    prepared = prepare(cfg)
    splits, tokenizer, encoded = prepared.splits, prepared.tokenizer, prepared.encoded

    from .loop import init_distributed

    dist = init_distributed()
    if not dist.main:
        # Under `torchrun`/`accelerate launch` only rank 0 talks to MLflow; the others train and evaluate.
        return _train_quietly(cfg, prepared, dist, evaluate_test)

    import mlflow

    from . import checkpoint, tracking
    from .loop import Shapes, fit, pick_device, precision_choice, predict, seed_everything, throughput
    from .modeling import build_model, count_params

    resume_id = cfg.tracking.resume_run_id
    state, saver = None, None
    if resume_id:
        if dist.world > 1:
            raise ConfigError("--resume-run-id works in a single process for now; resume without the launcher")
        # Locked before the run reopens: a second resume of a live run is refused without touching it.
        saver = held.enter_context(checkpoint.resumable(cfg.train.checkpoint_dir, resume_id, cfg.flat()))
        tracking.check_resumable(resume_id)
        state = saver.load()
    with tracking.run(cfg, nested=nested, tags=tags, killed_on=killed_on, resume_run_id=resume_id) as active:
        run_id = active.info.run_id
        if on_start is not None:
            on_start(run_id)
        if saver is None and cfg.train.checkpoint_dir:
            saver = held.enter_context(checkpoint.Checkpointer(cfg.train.checkpoint_dir, run_id, cfg.flat()))
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model.model, cfg.model.strategy, splits.labels, cfg.lora,
                            cfg.model.attention_dropout)
        counts = count_params(model)
        device = pick_device()
        dtype, precision_reason = precision_choice(cfg.train.precision, device)
        contract = tracking.log_setup(cfg, splits, {
            "trainable_params": counts.trainable, "total_params": counts.total,
            "trainable_pct": round(counts.pct, 4), "device": device.type, "compute_dtype": str(dtype).split(".")[-1],
            "precision_reason": precision_reason, "world_size": dist.world,
            "global_batch_size": cfg.train.batch_size * dist.world,
        }, resumed=bool(resume_id), tokenizer=tokenizer)
        pad_id = tokenizer.pad_token_id
        logger = tracking.MlflowLogger(run_id, tracking.logged_steps(run_id) if resume_id else None,
                                       resumable=saver is not None)
        result = fit(model, encoded["train"], encoded["val"], cfg.train, cfg.learning_rate, len(splits.labels),
                     pad_id, logger=logger, on_epoch=on_epoch, dist=dist, checkpointer=saver, resume=state)
        mlflow.log_metrics({**throughput(result), "best_epoch": result.best_epoch})
        temperature = 1.0
        if cfg.train.temperature_scaling:
            from .evaluate import fit_temperature

            temperature = fit_temperature(result.best_val)  # validation only; test stays unseen
            mlflow.log_metric("calibration/temperature", temperature)
        # val/accuracy etc. are per-epoch histories; val/best_* hold the selected epoch for comparisons.
        val = tracking.log_evaluation("val", result.best_val, splits.labels, prefix="best_",
                                      lengths=encoded["val"].lengths, max_length=cfg.data.max_length,
                                      temperature=temperature, headline=not evaluate_test)
        test: dict[str, float] = {}
        if evaluate_test:
            # The test split is touched once, after model selection on validation.
            test_ev = predict(model, encoded["test"], cfg.train.eval_batch_size, pad_id, device, dtype,
                              progress="test", dist=dist, shapes=Shapes(device, cfg.train.bucket_width,
                                                                        cfg.train.compile))
            test = tracking.log_evaluation("test", test_ev, splits.labels, splits.test["text"].tolist(),
                                           lengths=encoded["test"].lengths, max_length=cfg.data.max_length,
                                           temperature=temperature, headline=True)
        outcome = Outcome(run_id, val, test, counts.trainable, counts.total, result.best_epoch, result.train_seconds)
        tracking.log_summary(cfg, model, outcome)
        if cfg.model.strategy == "lora" or keep_weights:
            tracking.log_trained(model, tokenizer, "adapter" if cfg.model.strategy == "lora" else "weights")
        if cfg.tracking.registered_model_name:
            from .registry import publish

            # The promotion gate compares with the champion on held-out examples: test when scored.
            gate_split, gate_ev = ("test", test_ev) if evaluate_test else ("val", result.best_val)
            publish(model, tokenizer, splits, gate_ev, gate_split, cfg, temperature, contract)
        if saver is not None:
            saver.remove()  # finished: the model and its metrics are in MLflow now
        return outcome


def _train_quietly(cfg: RunConfig, prepared: Prepared, dist, evaluate_test: bool) -> Outcome:
    """A non-zero rank: the same collective steps as rank 0 (training, validation, test), no tracking."""
    from .loop import Shapes, fit, pick_device, predict, resolve_precision, seed_everything
    from .modeling import build_model

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.model, cfg.model.strategy, prepared.splits.labels, cfg.lora,
                        cfg.model.attention_dropout)
    pad_id = prepared.tokenizer.pad_token_id
    result = fit(model, prepared.encoded["train"], prepared.encoded["val"], cfg.train, cfg.learning_rate,
                 len(prepared.splits.labels), pad_id, dist=dist)
    if evaluate_test:
        device = pick_device()
        predict(model, prepared.encoded["test"], cfg.train.eval_batch_size, pad_id, device,
                resolve_precision(cfg.train.precision, device), dist=dist,
                shapes=Shapes(device, cfg.train.bucket_width, cfg.train.compile))
    return Outcome("", result.best_val_metrics, {}, 0, 0, result.best_epoch)
