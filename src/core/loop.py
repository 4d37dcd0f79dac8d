"""The training loop. Knows nothing of MLflow: it reports to a `logger` with one method.

A plain PyTorch loop rather than transformers' Trainer, for what Trainer does not give (the decision
and its measurements: benchmarks/README.md, "The loop against a tuned Trainer"): a resume continues
the same MLflow run from the exact optimizer step of the checkpoint, mid-epoch batch order included;
metrics the tracking server refuses fail the run, and the checkpoint then claims only the steps whose
metrics were delivered; Ctrl-C/SIGTERM save a checkpoint at the next optimizer step; checkpoints hold
tensors and numbers only, so resuming never unpickles. Each has its test in tests/test_lifecycle.py
and tests/test_resume.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base.config import ConfigError, TrainConfig
from ..base.environment import launched
from ..base.names import (
    EPOCH,
    LEARNING_RATE,
    PADDING_FRACTION,
    PEAK_MEMORY_MB,
    RUNTIME_S,
    SAMPLES_PER_S,
    TOKENS_PER_S,
    TRAIN_LOSS,
    better,
)
from ..base.names import metric as metric_key
from ..base.signals import StopOnSignal
from .checkpoint import TrainState
from .data import Encoded, bucketed_batches, collate, length_grouped_batches
from .evaluate import Evaluation, metrics
from .inference import logits, pick_device, to_device


class Logger(Protocol):
    def log_metrics(self, values: dict[str, float], step: int) -> None: ...

    def flush(self) -> None:
        """Return once every metric logged so far is stored; raise if one never will be."""


class NullLogger:
    """Tracking off: benchmarks and tests of the core run the same loop without MLflow."""

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class FitResult:
    best_epoch: int
    best_val: Evaluation
    best_val_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_seen: int = 0
    real_tokens_seen: int = 0
    padded_tokens_seen: int = 0
    peak_memory_mb: float = 0.0
    stopped_early: bool = False


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel job (`torchrun` / `accelerate launch`)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> Dist:
    """Join the process group the launcher describes in WORLD_SIZE/RANK; a plain run is world 1.
    `timeout_s` bounds every collective (NCCL's own default is 600 s)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import datetime

    import torch.distributed as tdist

    if not tdist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(tdist.get_rank(), tdist.get_world_size())


def close_distributed() -> None:
    """Leave the group once this process's last collective is done. No barrier: the other ranks
    do not wait while rank 0 uploads artifacts and gates the model, which can outlast any
    collective timeout. Leaving (not just exiting with the group alive) keeps gloo's threads from
    aborting the process ("terminate called without an active exception")."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def check_device(setting: str) -> None:
    """A --device this process can use, before anything loads."""
    if setting == "auto":
        return
    if launched():
        raise ConfigError(f"--device {setting}: under torchrun or accelerate launch each process takes the GPU of "
                          f"its LOCAL_RANK; leave --device auto")
    if setting.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(setting.partition(":")[2] or 0)
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f"{count} visible" + (f" with CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
            raise ConfigError(f"--device {setting} names a GPU this process cannot see ({shown}); "
                              f"{'pick cuda:0 to cuda:' + str(count - 1) if count else 'use --device auto or cpu'}")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: this machine has no usable Apple MPS device; use --device auto or cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    return precision_choice(precision, device)[0]


def precision_choice(precision: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and why it was chosen (logged beside the run's `compute_dtype`)."""
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision], "set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "GPU with bf16"
        return torch.float16, "GPU without bf16"
    name, reason = auto_cpu_precision(cpu_bf16_facts())
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name], reason


def cpu_bf16_facts() -> dict[str, bool]:
    """The CPU flags that decide `auto` there. `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
    answers True on any AVX-512 CPU, also where bf16 is only emulated (benchmarks/README.md, "CPU
    precision"); these do not."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = {}
    native = bool(caps.get("avx512_bf16")) or _avx512_bf16()
    return {"avx512_bf16": native, "amx_bf16": bool(caps.get("amx_bf16")), "avx512_f": bool(caps.get("avx512_f"))}


def _avx512_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_cpu_precision(facts: dict[str, bool]) -> tuple[str, str]:
    """bf16 autocast only where the CPU has bf16 dot products (AVX512-BF16 or AMX): about 1.4x
    faster than fp32 on a Zen 4 core; where bf16 is emulated (Skylake-SP's AVX-512) a MiniLM training
    step took 2.7x longer than fp32 (benchmarks/README.md, "CPU precision")."""
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if facts.get(flag)]
    if native:
        return "bf16", f"CPU with native bf16 ({', '.join(native)})"
    if facts.get("avx512_f"):
        return "fp32", "CPU bf16 only emulated (AVX-512 without AVX512-BF16/AMX)"
    return "fp32", "CPU without bf16"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases and LayerNorm weights are 1-D; decaying them hurts and is not the convention.
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what training changes: for LoRA that is a few MB, for full fine-tuning every weight."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items() if n in names}


@dataclass(frozen=True)
class Shapes:
    """How batches are padded: widths rounded up to `bucket_width` (else to 8 on GPU, for tensor cores)."""

    device: torch.device
    bucket_width: int = 0

    @property
    def multiple(self) -> int:
        return self.bucket_width or (8 if self.device.type == "cuda" else 1)

    @property
    def eval_multiple(self) -> int:
        """Evaluation on a GPU rounds widths to 64 even without buckets: few shapes there made the
        25,000-review evaluation 1.5-1.7x faster on one H200 (benchmarks/README.md). A CPU is
        compute-bound: padding there only costs."""
        return self.bucket_width or (64 if self.device.type == "cuda" else 1)

    def cap(self, lengths: np.ndarray) -> int:
        """Rounding never pads past the longest text (nor past the model's positions)."""
        return int(lengths.max()) if len(lengths) else 0


def predict(model, enc: Encoded, batch_size: int, pad_id: int, device: torch.device,
            dtype: torch.dtype, progress: str | None = None, dist: Dist = Dist(),
            shapes: Shapes | None = None) -> Evaluation:
    """Each process scores its share; every process gets the whole result. `shapes` as in
    training (the same buckets); None = widths as the device prefers."""
    shapes = shapes or Shapes(device)
    if dist.world == 1:
        return _predict(model, enc, batch_size, pad_id, device, dtype, progress, shapes)
    import torch.distributed as tdist

    mine = np.arange(dist.rank, len(enc), dist.world)
    part = _predict(model, Encoded([enc.input_ids[i] for i in mine], enc.labels[mine]), batch_size, pad_id,
                    device, dtype, progress if dist.main else None, shapes)
    gathered: list = [None] * dist.world
    tdist.all_gather_object(gathered, (mine, part.probs, part.loss * len(mine)))
    probs = np.zeros((len(enc), part.probs.shape[1]), dtype=part.probs.dtype)
    for idx, p, _ in gathered:
        probs[idx] = p
    loss = sum(g[2] for g in gathered) / len(enc)
    return Evaluation(labels=enc.labels, probs=probs, loss=loss)


def _predict(model, enc: Encoded, batch_size: int, pad_id: int, device: torch.device,
             dtype: torch.dtype, progress: str | None, shapes: Shapes) -> Evaluation:
    """The served model's scoring (inference.logits), with widths rounded as `shapes` says."""
    with tqdm(total=len(enc), desc=progress, disable=progress is None, mininterval=2.0) as bar:
        scores = logits(model, enc.input_ids, batch_size, pad_id, device, dtype, shapes.eval_multiple,
                        on_batch=bar.update, cap=shapes.cap(enc.lengths))
    labels = torch.as_tensor(np.array(enc.labels), device=device)
    loss = F.cross_entropy(scores, labels).item()
    probs = torch.softmax(scores, dim=-1).cpu().numpy()
    return Evaluation(labels=enc.labels, probs=probs, loss=loss)


def _shard(batches: list[np.ndarray], dist: Dist) -> list[np.ndarray]:
    """Every process walks the same global batches and takes every world-th example of each:
    lengths stay balanced across processes and the global batch equals a one-process run's."""
    if dist.world == 1:
        return batches
    return [b[dist.rank::dist.world] for b in batches if len(b) >= dist.world]


def _epoch_batches(training: TrainConfig, lengths: np.ndarray, dist: Dist, rng: np.random.Generator):
    if training.bucket_width:
        return _shard(bucketed_batches(lengths, training.bucket_width, training.batch_size * dist.world, rng), dist)
    return _shard(length_grouped_batches(lengths, training.batch_size * dist.world, rng), dist)


@dataclass
class Counts:
    """What training has processed; checkpointed, so throughput spans a resumed run."""

    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    def add(self, samples: int, real_tokens: int, padded_tokens: int) -> None:
        self.samples += samples
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens

    def state_dict(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def load_state_dict(self, values: list) -> None:
        for f, value in zip(fields(self), values, strict=True):
            setattr(self, f.name, value)


class _Trainable:
    """The model as a checkpoint holds it: only what training changes."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _trainable_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)


class _BatchOrder:
    """The seeded generator of every epoch's batch order. A checkpoint keeps its state as of the
    epoch's start: a resume draws that epoch's batches again and skips the ones done."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.start = self.rng.bit_generator.state

    def draw(self, training: TrainConfig, lengths: np.ndarray, dist: Dist) -> list[np.ndarray]:
        self.start = self.rng.bit_generator.state
        return _epoch_batches(training, lengths, dist, self.rng)

    def next_epoch(self) -> None:
        self.start = self.rng.bit_generator.state

    def state_dict(self) -> dict:
        return self.start

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
        self.start = state


@dataclass
class _Setup:
    """What stays fixed while one model trains: data, device, precision, shapes and listeners.
    What changes, and is checkpointed, is the `checkpoint.TrainState`."""

    training: TrainConfig
    model: Any  # the weights trained, selected and saved
    trained: Any  # the model, or its DDP wrapper, that runs the steps
    train: Encoded
    val: Encoded
    n_classes: int
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    shapes: Shapes
    cap: int
    class_weight: torch.Tensor | None
    steps_per_epoch: int
    dist: Dist
    logger: Logger
    checkpointer: Any
    stop: StopOnSignal

    @property
    def saved(self) -> str:
        return "; checkpoint saved" if self.checkpointer is not None else ""


def fit(model, train: Encoded, val: Encoded, training: TrainConfig, learning_rate: float, n_classes: int,
        pad_id: int, logger: Logger | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None, dist: Dist = Dist(),
        checkpointer=None, resume: dict | None = None) -> FitResult:
    """Train, evaluate on validation after each epoch, and leave the best epoch's weights in `model`.

    `on_epoch(epoch, val_metrics)` may raise to stop (e.g. an Optuna pruner). Under a launcher
    (`dist.world` > 1) `training.batch_size` is per process and gradients are averaged by DDP.
    With a `checkpointer`, state is saved after every epoch (and every `training.checkpoint_steps`
    optimizer steps), and Ctrl-C/SIGTERM save one at the next optimizer step before stopping;
    `resume` (a checkpoint's state, `Checkpointer.load()`) continues exactly where it was saved.
    """
    setup = _setup(model, train, val, training, n_classes, pad_id, logger or NullLogger(), dist, checkpointer)
    state = _initial_state(setup, learning_rate)
    if resume is not None:
        state.load_state_dict(resume)
    stopped_early = False
    with setup.stop:
        while state.epoch <= training.epochs and not stopped_early:
            _train_epoch(setup, state)
            stopped_early = _end_epoch(setup, state, on_epoch)
    return _result(setup, state, stopped_early)


def _setup(model, train: Encoded, val: Encoded, training: TrainConfig, n_classes: int, pad_id: int, logger: Logger,
           dist: Dist, checkpointer) -> _Setup:
    device = pick_device(training.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    trained = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = training.loss_weights(np.bincount(train.labels, minlength=n_classes).tolist())
    shapes = Shapes(device, training.bucket_width)
    n_batches = len(_epoch_batches(training, train.lengths, dist, np.random.default_rng(0)))
    return _Setup(
        training=training, model=model, trained=trained, train=train, val=val, n_classes=n_classes, pad_id=pad_id,
        device=device, dtype=resolve_precision(training.precision, device), shapes=shapes,
        cap=shapes.cap(train.lengths),
        class_weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        steps_per_epoch=math.ceil(n_batches / training.gradient_accumulation_steps), dist=dist, logger=logger,
        checkpointer=checkpointer, stop=StopOnSignal())


def _initial_state(setup: _Setup, learning_rate: float) -> TrainState:
    """The state at the first step: optimizer, schedule and scaler fresh, generators seeded."""
    from transformers import get_scheduler

    training = setup.training
    total_steps = setup.steps_per_epoch * training.epochs
    optimizer = torch.optim.AdamW(_param_groups(setup.model, training.weight_decay), lr=learning_rate,
                                  fused=setup.device.type == "cuda")
    scheduler = get_scheduler(training.lr_scheduler, optimizer,
                              num_warmup_steps=int(training.warmup_ratio * total_steps), num_training_steps=total_steps)
    return TrainState(model=_Trainable(setup.model), optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler(setup.device.type, enabled=setup.dtype == torch.float16),
                      rng_epoch=_BatchOrder(training.seed), counts=Counts(),
                      running=torch.zeros((), device=setup.device))


def _train_epoch(setup: _Setup, state: TrainState) -> None:
    """The batches of `state.epoch` from `state.batch_index` on: all of them unless resumed mid-epoch."""
    training = setup.training
    setup.trained.train()
    t0 = time.perf_counter()
    batches = state.rng_epoch.draw(training, setup.train.lengths, setup.dist)
    start = state.batch_index
    bar = tqdm(range(start, len(batches)), desc=f"train epoch {state.epoch}/{training.epochs}", mininterval=2.0,
               disable=not setup.dist.main, initial=start, total=len(batches))
    for i in bar:
        last = i + 1 == len(batches)
        stepping = (i + 1) % training.gradient_accumulation_steps == 0 or last
        _forward_backward(setup, state, batches[i], stepping)
        if stepping:
            _optimizer_step(setup, state)
            state.batch_index = i + 1
            _after_step(setup, state, bar, last)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    state.counts.seconds += time.perf_counter() - t0


def _forward_backward(setup: _Setup, state: TrainState, idx: np.ndarray, stepping: bool) -> None:
    """One micro-batch: its loss, and gradients added to those of the micro-batches before it."""
    training, lengths, device = setup.training, setup.train.lengths, setup.device
    ids, mask, y = collate(setup.train, idx, setup.pad_id, setup.shapes.multiple, setup.cap)
    # DDP all-reduces gradients only on the micro-step that updates the weights.
    sync = contextlib.nullcontext() if stepping or setup.dist.world == 1 else setup.trained.no_sync()
    with sync:
        with torch.autocast(device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
            logits = setup.trained(input_ids=to_device(ids, device), attention_mask=to_device(mask, device)).logits
        loss = F.cross_entropy(logits.float(), to_device(y, device), weight=setup.class_weight)
        state.scaler.scale(loss / training.gradient_accumulation_steps).backward()
    state.running += loss.detach()  # stays on the device: no host sync per step
    state.running_n += 1
    state.counts.add(len(idx), int(lengths[idx].sum()), ids.numel())


def _optimizer_step(setup: _Setup, state: TrainState) -> None:
    if setup.training.max_grad_norm > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), setup.training.max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _after_step(setup: _Setup, state: TrainState, bar, last_of_epoch: bool) -> None:
    """The training loss every `logging_steps`, and at an epoch's last step so every epoch has a
    training-loss point whatever `logging_steps`; a checkpoint every `checkpoint_steps`, and before
    stopping when a signal asked for it."""
    training = setup.training
    if state.step % training.logging_steps == 0 or last_of_epoch:
        bar.set_postfix(loss=f"{_log_loss(setup, state):.4f}")
    if setup.stop.requested or (training.checkpoint_steps and state.step % training.checkpoint_steps == 0):
        _save(setup, state)
        setup.stop.stop_if_requested(setup.saved)


def _log_loss(setup: _Setup, state: TrainState) -> float:
    """The mean training loss since the last one logged (over every process), logged; the sum restarts."""
    if setup.dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(state.running)
        state.running /= setup.dist.world
    mean_loss = (state.running / state.running_n).item()
    state.running.zero_()
    state.running_n = 0
    setup.logger.log_metrics({TRAIN_LOSS: mean_loss, LEARNING_RATE: state.scheduler.get_last_lr()[0],
                              EPOCH: state.step / setup.steps_per_epoch}, step=state.step)
    return mean_loss


def _save(setup: _Setup, state: TrainState) -> None:
    """Everything the next step depends on, to the checkpoint (by the main process, if there is one)."""
    if setup.checkpointer is None or not setup.dist.main:
        return
    # Metrics up to here must be on the server before the checkpoint says they are done: a resume
    # re-logs only the steps the server lacks, so nothing is lost or doubled. flush() raises if any was refused.
    setup.logger.flush()
    setup.checkpointer.save(state)


def _end_epoch(setup: _Setup, state: TrainState, on_epoch: Callable[[int, dict[str, float]], None] | None) -> bool:
    """Validate, keep the best epoch so far, checkpoint the start of the next epoch; True when early
    stopping ends training here."""
    training, epoch = setup.training, state.epoch
    val_ev = predict(setup.model, setup.val, training.eval_batch_size, setup.pad_id, setup.device, setup.dtype,
                     progress=f"validate epoch {epoch}", dist=setup.dist, shapes=setup.shapes)
    val_metrics = metrics(val_ev, setup.n_classes)
    setup.logger.log_metrics({metric_key("val", k): v for k, v in val_metrics.items() if not math.isnan(v)}, step=epoch)
    state.history.append({"epoch": epoch, **val_metrics})
    _select(state, training.selection_metric, val_ev, val_metrics, setup.model)
    if on_epoch is not None:
        on_epoch(epoch, val_metrics)
    state.epoch, state.batch_index = epoch + 1, 0
    state.rng_epoch.next_epoch()
    _save(setup, state)
    setup.stop.stop_if_requested(setup.saved)
    patience = training.early_stopping_patience
    return bool(patience) and state.bad_epochs >= patience and epoch < training.epochs


def _select(state: TrainState, metric: str, ev: Evaluation, val_metrics: dict[str, float], model) -> None:
    """Keep the epoch if it is the best on validation so far; else count it towards early stopping."""
    score = val_metrics[metric]
    if better(metric, score, state.best_score):
        state.best_score, state.best_epoch, state.best_val, state.best_metrics = score, state.epoch, ev, val_metrics
        state.best_state = _trainable_state(model)
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1


def _result(setup: _Setup, state: TrainState, stopped_early: bool) -> FitResult:
    """The best epoch's weights back in the model, and the figures of the whole job."""
    setup.logger.flush()  # every metric is on the server now, or the run fails here: never FINISHED with gaps
    if state.best_state is not None and state.best_epoch != state.epoch - 1:  # the last epoch run was not the best
        setup.model.load_state_dict(state.best_state, strict=False)
    peak = peak_memory_mb(setup.device)
    counts = _job_counts(state.counts, setup.dist, setup.device)
    return FitResult(best_epoch=state.best_epoch, best_val=state.best_val, best_val_metrics=state.best_metrics,
                     history=state.history, train_seconds=counts.seconds, samples_seen=counts.samples,
                     real_tokens_seen=counts.real_tokens, padded_tokens_seen=counts.padded_tokens,
                     peak_memory_mb=peak, stopped_early=stopped_early)


def _job_counts(counts: Counts, dist: Dist, device: torch.device) -> Counts:
    """Throughput of the whole job: samples and tokens of every process over the slowest one's time."""
    if dist.world == 1:
        return counts
    import torch.distributed as tdist

    totals = torch.tensor([counts.samples, counts.real_tokens, counts.padded_tokens], dtype=torch.float64,
                          device=device)
    tdist.all_reduce(totals)
    seconds = torch.tensor([counts.seconds], dtype=torch.float64, device=device)
    tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)
    return Counts(*(int(v) for v in totals.tolist()), float(seconds.item()))


def throughput(result: FitResult) -> dict[str, float]:
    seconds = max(result.train_seconds, 1e-9)
    return {
        RUNTIME_S: result.train_seconds,
        SAMPLES_PER_S: result.samples_seen / seconds,
        TOKENS_PER_S: result.real_tokens_seen / seconds,
        PADDING_FRACTION: 1 - result.real_tokens_seen / max(result.padded_tokens_seen, 1),
        PEAK_MEMORY_MB: result.peak_memory_mb,
    }
