"""The training loop. Knows nothing of MLflow: it reports to a `logger` with one method.

A plain PyTorch loop rather than transformers' Trainer: on one H200 the same recipe ran 1,396
samples/s here against 1,024 through Trainer (STACK_NOTES), the loop is short enough to read
top to bottom, and it gives exact control over batching, precision and host syncs.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import Encoded, bucketed_batches, collate, length_grouped_batches, sorted_batches
from .evaluate import Evaluation, metrics


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


def init_distributed() -> Dist:
    """Join the process group the launcher describes in WORLD_SIZE/RANK; a plain run is world 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def close_distributed() -> None:
    """Wait for every process (rank 0 may still be logging), then leave the group. Exiting with
    the group alive lets gloo's threads abort the process ("terminate called without an active
    exception") and the launcher then kills the whole job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def pick_device() -> torch.device:
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
    answers True on any AVX-512 CPU, also where bf16 is only emulated (STACK_NOTES); these do not."""
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
    faster than fp32 on a Zen 4 core; where bf16 is emulated (Skylake-SP's AVX-512) a DistilBERT-size
    step took 2.7x longer than fp32 (STACK_NOTES)."""
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

    def __init__(self, result: FitResult, shapes: Shapes):
        self.result, self.on, self.seen = result, shapes.compile != "off", set()

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
        self.result.warmup_seconds += time.perf_counter() - t0
        self.result.warmup_samples += n


def fit(model, train: Encoded, val: Encoded, cfg: TrainConfig, learning_rate: float, n_classes: int,
        pad_id: int, logger: Logger | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None, dist: Dist = Dist(),
        checkpointer=None, resume=None) -> FitResult:
    """Train, evaluate on validation after each epoch, and leave the best epoch's weights in `model`.

    `on_epoch(epoch, val_metrics)` may raise to stop (e.g. an Optuna pruner). Under a launcher
    (`dist.world` > 1) `cfg.batch_size` is per process and gradients are averaged by DDP.
    With a `checkpointer`, state is saved after every epoch (and every `cfg.checkpoint_steps`
    optimizer steps), and Ctrl-C/SIGTERM save one at the next optimizer step before stopping;
    `resume` (a loaded checkpoint.TrainState) continues exactly where it was saved.
    """
    from transformers import get_scheduler

    from .checkpoint import TrainState, global_rng_state, set_global_rng_state
    from .signals import StopOnSignal

    logger = logger or NullLogger()
    device = pick_device()
    dtype = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    trained = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    rng = np.random.default_rng(cfg.seed)
    lengths = train.lengths
    weights = cfg.loss_weights(np.bincount(train.labels, minlength=n_classes).tolist())
    class_weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    shapes = Shapes(device, cfg.bucket_width, cfg.compile)
    n_batches = len(_epoch_batches(cfg, lengths, dist, np.random.default_rng(0)))
    steps_per_epoch = math.ceil(n_batches / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=learning_rate,
                                  fused=device.type == "cuda")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    cap = shapes.cap(lengths)

    best_state, best_val, best_metrics, best_epoch, best_score = None, None, None, 0, None
    result = FitResult(best_epoch=0, best_val=None, best_val_metrics={})  # type: ignore[arg-type]
    clock = _WarmupClock(result, shapes)
    bad_epochs, step = 0, 0
    running = torch.zeros((), device=device)
    running_n = 0
    first_epoch, skip = 1, 0
    if resume is not None:
        model.load_state_dict(resume.model, strict=False)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        scaler.load_state_dict(resume.scaler)
        rng.bit_generator.state = resume.rng_epoch
        set_global_rng_state(resume.rng)
        first_epoch, skip, step = resume.epoch, resume.batch_index, resume.step
        best_state, best_score, best_epoch = resume.best_state, resume.best_score, resume.best_epoch
        best_metrics, best_val, bad_epochs = resume.best_metrics, resume.best_val, resume.bad_epochs
        result.history = resume.history
        running += resume.running
        running_n = resume.running_n
        (result.samples_seen, result.real_tokens_seen, result.padded_tokens_seen,
         result.train_seconds) = resume.counts

    def snapshot(epoch: int, batch_index: int, rng_epoch: dict) -> None:
        """Everything the next step depends on: `batch_index` batches of `epoch` are done, and
        `rng_epoch` regenerates that epoch's batch order."""
        if checkpointer is None or not dist.main:
            return
        # Metrics up to here must be on the server before the checkpoint says they are done: a resume
        # re-logs only the steps the server lacks, so nothing is lost or doubled. flush() raises if any was refused.
        logger.flush()
        checkpointer.save(TrainState(
            epoch=epoch, batch_index=batch_index, step=step, rng_epoch=rng_epoch, rng=global_rng_state(),
            model=_trainable_state(model), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), best_state=best_state, best_score=best_score, best_epoch=best_epoch,
            best_metrics=best_metrics, best_val=best_val, bad_epochs=bad_epochs, history=result.history,
            running=float(running), running_n=running_n,
            counts=[result.samples_seen, result.real_tokens_seen, result.padded_tokens_seen, result.train_seconds],
        ))

    stop = StopOnSignal()
    saved = "; checkpoint saved" if checkpointer is not None else ""
    epoch = first_epoch - 1
    with stop, shapes.compiled(model):
        for epoch in range(first_epoch, cfg.epochs + 1):
            trained.train()
            t0 = time.perf_counter()
            rng_epoch = rng.bit_generator.state
            batches = _epoch_batches(cfg, lengths, dist, rng)
            start, skip = skip, 0
            bar = tqdm(range(start, len(batches)), desc=f"train epoch {epoch}/{cfg.epochs}", mininterval=2.0,
                       disable=not dist.main, initial=start, total=len(batches))
            for i in bar:
                idx = batches[i]
                rows = shapes.rows(int(lengths[idx].max()), cap, cfg.batch_size, cfg.batch_tokens, dist.world)
                ids, mask, y = collate(train, idx, pad_id, shapes.multiple, cap, rows)
                stepping = (i + 1) % cfg.gradient_accumulation_steps == 0 or i + 1 == len(batches)
                # DDP all-reduces gradients only on the micro-step that updates the weights.
                sync = contextlib.nullcontext() if stepping or dist.world == 1 else trained.no_sync()
                shapes.step_begin()
                with clock.step(tuple(ids.shape), len(idx), device), sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        logits = trained(input_ids=to_device(ids, device),
                                         attention_mask=to_device(mask, device)).logits
                    loss = F.cross_entropy(logits.float(), to_device(y, device), weight=class_weight)
                    scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                running += loss.detach()  # stays on the device: no host sync per step
                running_n += 1
                result.samples_seen += len(idx)
                result.real_tokens_seen += int(lengths[idx].sum())
                result.padded_tokens_seen += ids.numel()
                if not stepping:
                    continue
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # and at an epoch's last step, so every epoch has a training-loss point whatever logging_steps
                if step % cfg.logging_steps == 0 or i + 1 == len(batches):
                    if dist.world > 1:
                        import torch.distributed as tdist

                        tdist.all_reduce(running)
                        running /= dist.world
                    mean_loss = (running / running_n).item()
                    running.zero_()
                    running_n = 0
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    logger.log_metrics({"train/loss": mean_loss, "train/learning_rate": scheduler.get_last_lr()[0],
                                        "train/epoch": step / steps_per_epoch}, step=step)
                if stop.requested or (cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0):
                    snapshot(epoch, i + 1, rng_epoch)
                    if stop.requested:
                        raise KeyboardInterrupt(f"stopped by a signal{saved}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.train_seconds += time.perf_counter() - t0

            val_ev = predict(model, val, cfg.eval_batch_size, pad_id, device, dtype,
                             progress=f"validate epoch {epoch}", dist=dist, shapes=shapes)
            val_metrics = metrics(val_ev, n_classes)
            logger.log_metrics({f"val/{k}": v for k, v in val_metrics.items() if not math.isnan(v)}, step=epoch)
            result.history.append({"epoch": epoch, **val_metrics})
            score = val_metrics[cfg.selection_metric]
            if _better(cfg.selection_metric, score, best_score):
                best_score, best_epoch, best_val, best_metrics = score, epoch, val_ev, val_metrics
                best_state = _trainable_state(model)
                bad_epochs = 0
            else:
                bad_epochs += 1
            if on_epoch is not None:
                on_epoch(epoch, val_metrics)
            snapshot(epoch + 1, 0, rng.bit_generator.state)
            if stop.requested:
                raise KeyboardInterrupt(f"stopped by a signal{saved}")
            if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience and epoch < cfg.epochs:
                result.stopped_early = True
                break

    logger.flush()  # every metric is on the server now, or the run fails here: never FINISHED with gaps
    if best_state is not None and best_epoch != epoch:
        model.load_state_dict(best_state, strict=False)
    result.best_epoch, result.best_val, result.best_val_metrics = best_epoch, best_val, best_metrics
    result.peak_memory_mb = peak_memory_mb(device)
    if dist.world > 1:
        import torch.distributed as tdist

        # Throughput of the whole job: samples and tokens of every process over the slowest one's time.
        totals = torch.tensor([result.samples_seen, result.real_tokens_seen, result.padded_tokens_seen],
                              dtype=torch.float64, device=device)
        tdist.all_reduce(totals)
        seconds = torch.tensor([result.train_seconds], dtype=torch.float64, device=device)
        tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)
        result.samples_seen, result.real_tokens_seen, result.padded_tokens_seen = (int(v) for v in totals.tolist())
        result.train_seconds = float(seconds.item())
    return result


def throughput(result: FitResult) -> dict[str, float]:
    """samples/s is steady state: steps that compiled a new shape count in warmup_s alone."""
    seconds = max(result.train_seconds, 1e-9)
    samples, steady = result.samples_seen, seconds
    if result.samples_seen > result.warmup_samples:
        samples, steady = result.samples_seen - result.warmup_samples, max(seconds - result.warmup_seconds, 1e-9)
    return {
        "train/runtime_s": result.train_seconds,
        "train/warmup_s": result.warmup_seconds,
        "train/samples_per_s": samples / steady,
        "train/tokens_per_s": result.real_tokens_seen / seconds,
        "train/padding_fraction": 1 - result.real_tokens_seen / max(result.padded_tokens_seen, 1),
        "train/peak_memory_mb": result.peak_memory_mb,
    }
