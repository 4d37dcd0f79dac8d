"""The training loop. Knows nothing of MLflow: it reports to a `logger` with one method.

A plain PyTorch loop rather than transformers' Trainer: with the same settings (DistilBERT-base
architecture, bf16, length-grouped batches of 64, fused AdamW) one H200 trained 1,396 samples/s
through this loop against 1,024 through Trainer (measured 2026-11); the loop is short enough to read
top to bottom, and it gives exact control over batching, precision and host syncs.
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

from .checkpoint import TrainState
from .cli import launched
from .config import ConfigError, TrainConfig
from .data import Encoded, bucketed_batches, collate, length_grouped_batches, sorted_batches
from .evaluate import Evaluation, metrics
from .names import (
    EPOCH,
    LEARNING_RATE,
    PADDING_FRACTION,
    PEAK_MEMORY_MB,
    RUNTIME_S,
    SAMPLES_PER_S,
    TOKENS_PER_S,
    TRAIN_LOSS,
    WARMUP_S,
)
from .names import metric as metric_key
from .signals import StopOnSignal


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
    warmup_seconds: float = 0.0  # steps of a batch shape seen for the first time under --compile
    warmup_samples: int = 0


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

    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size())


def close_distributed() -> None:
    """Leave the group once this process's last collective is done. No barrier: the other ranks
    do not wait while rank 0 uploads artifacts and gates the model, which can outlast any
    collective timeout. Leaving (not just exiting with the group alive) keeps gloo's threads from
    aborting the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def pick_device(setting: str = "auto") -> torch.device:
    """'auto': this process's GPU (the launcher's LOCAL_RANK, set by init_distributed, else the first
    visible one), else the CPU. Anything else as given (checked by check_device)."""
    if setting != "auto":
        device = torch.device(setting)
        if device.type == "cuda":  # 'cuda' alone is the current GPU; set_device wants an index
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)  # compiled graphs and current_device() then agree
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory makes the copy asynchronous, so the host never waits on the GPU here."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


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
    """How batches are padded and run: widths rounded up to `bucket_width` (else to 8 on GPU, for
    tensor cores), and with `compile` the model compiled once per batch shape."""

    device: torch.device
    bucket_width: int = 0
    compile: str = "off"

    @property
    def multiple(self) -> int:
        return self.bucket_width or (8 if self.device.type == "cuda" else 1)

    @property
    def eval_multiple(self) -> int:
        """Evaluation on a GPU rounds widths to 64 even without buckets: few shapes there made the
        25,000-review evaluation 1.5-1.7x faster on one H200 (benchmarks/README.md). A CPU is
        compute-bound: padding there only costs."""
        return self.bucket_width or (64 if self.device.type == "cuda" else 1)

    @property
    def graphs(self) -> bool:
        return self.compile == "reduce-overhead" and self.device.type == "cuda"

    def cap(self, lengths: np.ndarray) -> int:
        """Rounding never pads past the longest text (nor past the model's positions)."""
        return int(lengths.max()) if len(lengths) else 0

    def rows(self, longest: int, cap: int, batch_size: int, batch_tokens: int = 0, world: int = 1) -> int:
        """Under --compile every batch of a width gets that width's full row count (short ones are
        filled with ignored rows): one graph, one CUDA graph per width. 0 = as many as it holds."""
        if self.compile == "off":
            return 0
        width = min(-(-longest // self.multiple) * self.multiple, cap) if cap else longest
        size = max(1, batch_tokens * world // width) if batch_tokens else batch_size * world
        return -(-size // world)

    @contextlib.contextmanager
    def compiled(self, model):
        """Compile the model's repeated layers in place for the duration. The layers share one
        graph per shape, so compiling costs one layer's time, not the whole model's (regional
        compilation); the model is left as it came (nothing compiled) for saving and serving."""
        blocks = _repeated_layers(model) or [model]
        if self.compile == "off" or any(b._compiled_call_impl is not None for b in blocks):
            yield  # off, or already compiled by an outer call (evaluation inside fit)
            return
        import torch._dynamo

        # One graph per width and train/eval: IMDB at 64 has 8 widths in two modes, and a process that
        # trains several models (benchmarks, tuning trials) adds graphs per variant; dynamo's
        # default limit of 8 graphs per function would fall back to eager.
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 128))  # renamed in torch 2.6
        for block in blocks:
            block.compile(mode=None if self.compile == "default" else self.compile, dynamic=False)
        try:
            yield
        finally:
            for block in blocks:
                block._compiled_call_impl = None  # what nn.Module.compile set; undone here

    def step_begin(self) -> None:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()


def _repeated_layers(model) -> list:
    """The transformer layers: the longest ModuleList of one module class (DistilBERT's
    transformer.layer, BERT's encoder.layer, ...), found without naming architectures."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(x) for x in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def predict(model, enc: Encoded, batch_size: int, pad_id: int, device: torch.device,
            dtype: torch.dtype, progress: str | None = None, dist: Dist = Dist(),
            shapes: Shapes | None = None) -> Evaluation:
    """Each process scores its share; every process gets the whole result. `shapes` as in
    training (the same buckets and compiled forward); None = plain eager batches."""
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


@torch.inference_mode()
def _predict(model, enc: Encoded, batch_size: int, pad_id: int, device: torch.device,
             dtype: torch.dtype, progress: str | None, shapes: Shapes) -> Evaluation:
    """Sorted by length, no gradients, logits kept on the device until one copy at the end."""
    model.eval()
    batches = sorted_batches(enc.lengths, batch_size)
    cap = shapes.cap(enc.lengths)
    logits_parts, order = [], []
    with shapes.compiled(model):
        for idx in tqdm(batches, desc=progress, disable=progress is None, mininterval=2.0):
            rows = shapes.rows(int(enc.lengths[idx].max()), cap, batch_size)
            ids, mask, _ = collate(enc, idx, pad_id, shapes.eval_multiple, cap, rows)
            shapes.step_begin()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(input_ids=to_device(ids, device), attention_mask=to_device(mask, device))
            # [:n] copies when filler rows were added; a CUDA graph's outputs are overwritten by its
            # next replay, so those are copied too.
            logits = out.logits[:len(idx)].float()
            logits_parts.append(logits.clone() if shapes.graphs else logits)
            order.append(idx)
    logits = torch.cat(logits_parts)
    perm = torch.from_numpy(np.concatenate(order)).to(device)
    restored = torch.empty_like(logits)
    restored[perm] = logits
    labels = torch.as_tensor(np.array(enc.labels), device=device)
    loss = F.cross_entropy(restored, labels).item()
    probs = torch.softmax(restored, dim=-1).cpu().numpy()
    return Evaluation(labels=enc.labels, probs=probs, loss=loss)


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def _shard(batches: list[np.ndarray], dist: Dist) -> list[np.ndarray]:
    """Every process walks the same global batches and takes every world-th example of each:
    lengths stay balanced across processes and the global batch equals a one-process run's."""
    if dist.world == 1:
        return batches
    return [b[dist.rank::dist.world] for b in batches if len(b) >= dist.world]


def _epoch_batches(cfg: TrainConfig, lengths: np.ndarray, dist: Dist, rng: np.random.Generator):
    if cfg.bucket_width:
        return _shard(bucketed_batches(lengths, cfg.bucket_width, cfg.batch_size * dist.world,
                                       cfg.batch_tokens * dist.world, rng), dist)
    return _shard(length_grouped_batches(lengths, cfg.batch_size * dist.world, rng), dist)


class _WarmupClock:
    """Times the steps that meet a batch shape for the first time: under --compile those compile,
    and steady-state throughput leaves them out."""

    def __init__(self, shapes: Shapes):
        self.on, self.seen = shapes.compile != "off", set()
        self.seconds, self.samples = 0.0, 0

    @contextlib.contextmanager
    def step(self, shape: tuple, n: int, device: torch.device):
        if not self.on or shape in self.seen:
            yield
            return
        self.seen.add(shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0
        self.samples += n


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

    def draw(self, cfg: TrainConfig, lengths: np.ndarray, dist: Dist) -> list[np.ndarray]:
        self.start = self.rng.bit_generator.state
        return _epoch_batches(cfg, lengths, dist, self.rng)

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

    cfg: TrainConfig
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
    clock: _WarmupClock
    stop: StopOnSignal

    @property
    def saved(self) -> str:
        return "; checkpoint saved" if self.checkpointer is not None else ""


def fit(model, train: Encoded, val: Encoded, cfg: TrainConfig, learning_rate: float, n_classes: int,
        pad_id: int, logger: Logger | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None, dist: Dist = Dist(),
        checkpointer=None, resume: dict | None = None) -> FitResult:
    """Train, evaluate on validation after each epoch, and leave the best epoch's weights in `model`.

    `on_epoch(epoch, val_metrics)` may raise to stop (e.g. an Optuna pruner). Under a launcher
    (`dist.world` > 1) `cfg.batch_size` is per process and gradients are averaged by DDP.
    With a `checkpointer`, state is saved after every epoch (and every `cfg.checkpoint_steps`
    optimizer steps), and Ctrl-C/SIGTERM save one at the next optimizer step before stopping;
    `resume` (a checkpoint's state, `Checkpointer.load()`) continues exactly where it was saved.
    """
    setup = _setup(model, train, val, cfg, n_classes, pad_id, logger or NullLogger(), dist, checkpointer)
    state = _initial_state(setup, learning_rate)
    if resume is not None:
        state.load_state_dict(resume)
    stopped_early = False
    with setup.stop, setup.shapes.compiled(model):
        while state.epoch <= cfg.epochs and not stopped_early:
            _train_epoch(setup, state)
            stopped_early = _end_epoch(setup, state, on_epoch)
    return _result(setup, state, stopped_early)


def _setup(model, train: Encoded, val: Encoded, cfg: TrainConfig, n_classes: int, pad_id: int, logger: Logger,
           dist: Dist, checkpointer) -> _Setup:
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    trained = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = cfg.loss_weights(np.bincount(train.labels, minlength=n_classes).tolist())
    shapes = Shapes(device, cfg.bucket_width, cfg.compile)
    n_batches = len(_epoch_batches(cfg, train.lengths, dist, np.random.default_rng(0)))
    return _Setup(
        cfg=cfg, model=model, trained=trained, train=train, val=val, n_classes=n_classes, pad_id=pad_id,
        device=device, dtype=resolve_precision(cfg.precision, device), shapes=shapes, cap=shapes.cap(train.lengths),
        class_weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        steps_per_epoch=math.ceil(n_batches / cfg.gradient_accumulation_steps), dist=dist, logger=logger,
        checkpointer=checkpointer, clock=_WarmupClock(shapes), stop=StopOnSignal())


def _initial_state(setup: _Setup, learning_rate: float) -> TrainState:
    """The state at the first step: optimizer, schedule and scaler fresh, generators seeded."""
    from transformers import get_scheduler

    cfg = setup.cfg
    total_steps = setup.steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(_param_groups(setup.model, cfg.weight_decay), lr=learning_rate,
                                  fused=setup.device.type == "cuda")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return TrainState(model=_Trainable(setup.model), optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler(setup.device.type, enabled=setup.dtype == torch.float16),
                      rng_epoch=_BatchOrder(cfg.seed), counts=Counts(), running=torch.zeros((), device=setup.device))


def _train_epoch(setup: _Setup, state: TrainState) -> None:
    """The batches of `state.epoch` from `state.batch_index` on: all of them unless resumed mid-epoch."""
    cfg = setup.cfg
    setup.trained.train()
    t0 = time.perf_counter()
    batches = state.rng_epoch.draw(cfg, setup.train.lengths, setup.dist)
    start = state.batch_index
    bar = tqdm(range(start, len(batches)), desc=f"train epoch {state.epoch}/{cfg.epochs}", mininterval=2.0,
               disable=not setup.dist.main, initial=start, total=len(batches))
    for i in bar:
        last = i + 1 == len(batches)
        stepping = (i + 1) % cfg.gradient_accumulation_steps == 0 or last
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
    cfg, lengths, device = setup.cfg, setup.train.lengths, setup.device
    rows = setup.shapes.rows(int(lengths[idx].max()), setup.cap, cfg.batch_size, cfg.batch_tokens, setup.dist.world)
    ids, mask, y = collate(setup.train, idx, setup.pad_id, setup.shapes.multiple, setup.cap, rows)
    # DDP all-reduces gradients only on the micro-step that updates the weights.
    sync = contextlib.nullcontext() if stepping or setup.dist.world == 1 else setup.trained.no_sync()
    setup.shapes.step_begin()
    with setup.clock.step(tuple(ids.shape), len(idx), device), sync:
        with torch.autocast(device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
            logits = setup.trained(input_ids=to_device(ids, device), attention_mask=to_device(mask, device)).logits
        loss = F.cross_entropy(logits.float(), to_device(y, device), weight=setup.class_weight)
        state.scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
    state.running += loss.detach()  # stays on the device: no host sync per step
    state.running_n += 1
    state.counts.add(len(idx), int(lengths[idx].sum()), ids.numel())


def _optimizer_step(setup: _Setup, state: TrainState) -> None:
    if setup.cfg.max_grad_norm > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), setup.cfg.max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _after_step(setup: _Setup, state: TrainState, bar, last_of_epoch: bool) -> None:
    """The training loss every `logging_steps`, and at an epoch's last step so every epoch has a
    training-loss point whatever `logging_steps`; a checkpoint every `checkpoint_steps`, and before
    stopping when a signal asked for it."""
    cfg = setup.cfg
    if state.step % cfg.logging_steps == 0 or last_of_epoch:
        bar.set_postfix(loss=f"{_log_loss(setup, state):.4f}")
    if setup.stop.requested or (cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0):
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
    cfg, epoch = setup.cfg, state.epoch
    val_ev = predict(setup.model, setup.val, cfg.eval_batch_size, setup.pad_id, setup.device, setup.dtype,
                     progress=f"validate epoch {epoch}", dist=setup.dist, shapes=setup.shapes)
    val_metrics = metrics(val_ev, setup.n_classes)
    setup.logger.log_metrics({metric_key("val", k): v for k, v in val_metrics.items() if not math.isnan(v)}, step=epoch)
    state.history.append({"epoch": epoch, **val_metrics})
    _select(state, cfg.selection_metric, val_ev, val_metrics, setup.model)
    if on_epoch is not None:
        on_epoch(epoch, val_metrics)
    state.epoch, state.batch_index = epoch + 1, 0
    state.rng_epoch.next_epoch()
    _save(setup, state)
    setup.stop.stop_if_requested(setup.saved)
    patience = cfg.early_stopping_patience
    return bool(patience) and state.bad_epochs >= patience and epoch < cfg.epochs


def _select(state: TrainState, metric: str, ev: Evaluation, val_metrics: dict[str, float], model) -> None:
    """Keep the epoch if it is the best on validation so far; else count it towards early stopping."""
    score = val_metrics[metric]
    if _better(metric, score, state.best_score):
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
                     peak_memory_mb=peak, stopped_early=stopped_early, warmup_seconds=setup.clock.seconds,
                     warmup_samples=setup.clock.samples)


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
    """samples/s is steady state: steps that compiled a new shape count in warmup_s alone."""
    seconds = max(result.train_seconds, 1e-9)
    samples, steady = result.samples_seen, seconds
    if result.samples_seen > result.warmup_samples:
        samples, steady = result.samples_seen - result.warmup_samples, max(seconds - result.warmup_seconds, 1e-9)
    return {
        RUNTIME_S: result.train_seconds,
        WARMUP_S: result.warmup_seconds,
        SAMPLES_PER_S: samples / steady,
        TOKENS_PER_S: result.real_tokens_seen / seconds,
        PADDING_FRACTION: 1 - result.real_tokens_seen / max(result.padded_tokens_seen, 1),
        PEAK_MEMORY_MB: result.peak_memory_mb,
    }
