"""Training throughput: the seed's recipe, a tuned Trainer and this project's loop, side by side in one process.

    # CPU: the same 256 reviews through each recipe
    python benchmarks/throughput.py --data ../shared/data/imdb --vocab ../shared/data/tokenizer/vocab.txt --samples 256
    # against what a user would pick instead: rows alternated and repeated, per-epoch cost, the ratios printed
    python benchmarks/throughput.py --data ../shared/data/imdb --vocab ../shared/data/tokenizer/vocab.txt \
        --samples 256 --recipes trainer,trainer-attn0,project --variants bucket_width=64 --repeats 2
    # GPU: a full epoch for the project's loop, 8,192 samples for the (slow) seed recipe, 25,000-review eval
    python benchmarks/throughput.py --data DIR --vocab FILE --samples 25000 --seed-samples 8192 --eval-samples 25000

Model: the distilbert-base-uncased architecture with random weights and its real uncased vocabulary,
so a step costs what the pretrained model's step costs, without downloading weights.
Rows (`--recipes`, per strategy, full and LoRA r8 q/k/v):
- `seed`: the seed's recipe, as the course report ran it: transformers Trainer, fp32, every review padded
  to 512, batch 16, AdamW (not fused), linear schedule.
- `trainer`: transformers' Trainer as its users configure it in transformers 5: bf16 where the hardware
  has it natively, `train_sampling_strategy="group_by_length"`, a collator padding to a multiple of 8,
  Trainer's default optimizer (fused AdamW), the project's batch (32), learning rate, warmup, decay and
  epochs; the model as it comes (attention dropout 0.1).
- `trainer-attn0`: the same Trainer with the project's model setting, attention dropout 0, so the loop's
  own share shows in project / trainer-attn0.
- `project`: `src.loop.fit` with its defaults (length-grouped dynamic padding, bf16 where native, no
  dropout on attention probabilities so attention runs fused, fused AdamW on GPU), tracking off;
  `--variants "bucket_width=64"` adds rows of project settings.
All see the same texts; samples/s counts training samples only (no evaluation inside the timing).
`--per-epoch` times each row as a 2-epoch run minus a 1-epoch run (setup and first steps cancel out);
`--repeats N` runs the whole plan N times (A B C A B C) so the noise of a shared machine shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_texts(data: Path, split: str, n: int, seed: int):
    import pandas as pd

    df = pd.read_parquet(data / f"{split}.parquet")
    if n and n < len(df):
        df = df.sample(n=n, random_state=seed)  # random: the files are sorted by label
    return df.reset_index(drop=True)


def tokenizer_from(vocab_file: Path):
    from transformers import DistilBertTokenizer

    words = vocab_file.read_text(encoding="utf-8").splitlines()
    # transformers 5 takes the vocabulary itself (`vocab_file=` is silently ignored there); 4.x takes the file.
    tok = DistilBertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    if len(tok) != len(words):
        tok = DistilBertTokenizer(vocab_file=str(vocab_file), do_lower_case=True)
    assert len(tok) == len(words), f"tokenizer has {len(tok)} tokens, vocabulary {len(words)}"
    return tok


def fresh_model(strategy: str, seed: int, attention_dropout: float | None = None):
    """`attention_dropout` None keeps DistilBERT's own 0.1, as the seed's recipe had it."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from src.base.config import LoraConfig
    from src.base.strategies import get
    from src.core.modeling import attention_dropout_override

    torch.manual_seed(seed)
    config = DistilBertConfig(num_labels=2)
    config.update(attention_dropout_override(config, attention_dropout))
    model = DistilBertForSequenceClassification(config)
    return get("lora").wrap(model, LoraConfig(lora_r=8, lora_alpha=32)) if strategy == "lora" else model


def flops(strategy: str, lengths, n_layers: int = 6, dim: int = 768, non_embedding: float = 42.5e6) -> float:
    """Useful work on real tokens only: 6*P*T for full fine-tuning (forward + input and weight
    gradients), 4*P*T for LoRA (frozen weights get no gradient), plus attention 12*L*d*len^2."""
    tokens = float(sum(lengths))
    attention = 12.0 * n_layers * dim * float(sum(int(n) ** 2 for n in lengths))
    return (6.0 if strategy == "full" else 4.0) * non_embedding * tokens + attention


def peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def pad_512(df, tokenizer) -> dict:
    enc = tokenizer(df["text"].tolist(), truncation=True, max_length=512, padding="max_length")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": df["label"].tolist()}


def timed_train(trainer, device) -> float:
    """Seconds of `trainer.train()`, the GPU's queue drained; Trainer's printer callback off (its
    end-of-training dict would break the table)."""
    import torch
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    peak_reset(device)
    t0 = time.perf_counter()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_seed(strategy: str, enc: dict, seed: int, batch_size: int, device, steps_only: int = 0,
             epochs: int = 1) -> dict:
    """The seed recipe through transformers' Trainer, on reviews padded to 512 tokens."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    labels = enc["labels"]

    class Padded(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(enc["input_ids"][i]),
                    "attention_mask": torch.tensor(enc["attention_mask"][i]), "labels": torch.tensor(labels[i])}

    model = fresh_model(strategy, seed)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=2e-5,
            optim="adamw_torch", bf16=False, fp16=False, report_to="none", save_strategy="no",
            logging_strategy="no", eval_strategy="no", disable_tqdm=True, seed=seed,
            use_cpu=device.type == "cpu", max_steps=steps_only or -1)
        seconds = timed_train(Trainer(model=model, args=args, train_dataset=Padded()), device)
    n = min(len(labels), steps_only * batch_size) if steps_only else len(labels)
    real = [sum(m) for m in enc["attention_mask"][:n]]
    return {"samples": n * epochs, "seconds": seconds, "real_tokens": sum(real) * epochs,
            "padded_tokens": n * 512 * epochs, "flops": flops(strategy, real) * epochs, "peak_gb": peak_gb(device)}


def run_project(strategy: str, train, val, pad_id: int, seed: int, device, epochs: int = 0, **overrides) -> dict:
    """`overrides`: settings of TrainConfig or ModelConfig.attention_dropout; the rest are defaults.
    `epochs` 0 or N: totals of one or N epochs."""
    import torch

    from src.base.config import ModelConfig, TrainConfig
    from src.base.strategies import DEFAULT_LEARNING_RATE
    from src.core.loop import fit

    attention_dropout = overrides.pop("attention_dropout", ModelConfig().attention_dropout)
    cfg = TrainConfig(epochs=epochs or 1, seed=seed, **overrides)
    model = fresh_model(strategy, seed, attention_dropout)
    peak_reset(device)
    result = fit(model, train, val, cfg, DEFAULT_LEARNING_RATE[strategy], 2, pad_id)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"samples": result.samples_seen, "seconds": result.train_seconds,
            "real_tokens": result.real_tokens_seen, "padded_tokens": result.padded_tokens_seen,
            "flops": flops(strategy, train.lengths.tolist()) * (epochs or 1), "peak_gb": peak_gb(device)}


def trainer_items(enc) -> list[dict]:
    """The project's tokenized reviews as Trainer takes them (padding is the collator's job)."""
    return [{"input_ids": ids.tolist(), "labels": int(y)} for ids, y in zip(enc.input_ids, enc.labels, strict=True)]


def tuned_arguments(out: str, learning_rate: float, n_train: int, epochs: int, seed: int, device, workers: int = 0,
                    **changes):
    """TrainingArguments as a user tunes them in transformers 5: bf16 where the hardware has it natively
    (the project's `precision=auto` rule), length-grouped sampling, Trainer's default optimizer (fused
    AdamW), and the project's batch, learning rate, warmup (6% of the steps), decay, clipping and epochs."""
    import math

    import torch
    from transformers import TrainingArguments

    from src.base.config import TrainConfig
    from src.core.loop import resolve_precision

    cfg, dtype = TrainConfig(), resolve_precision("auto", device)
    steps = math.ceil(n_train / cfg.batch_size) * epochs
    settings = dict(
        output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=epochs,
        learning_rate=learning_rate, weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * steps),
        lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, train_sampling_strategy="group_by_length", dataloader_num_workers=workers,
        dataloader_pin_memory=device.type == "cuda", report_to="none", save_strategy="no", logging_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=seed, use_cpu=device.type == "cpu")
    return TrainingArguments(**{**settings, **changes})


def full_scale_grouping(trainer_class):
    """`trainer_class` grouping lengths as it does on the whole IMDB train split. Its LengthGroupedSampler
    sorts mega-batches of min(reviews // (4 * batch), 50) batches: 50 on 25,000 reviews, but one or two
    on a benchmark's few hundred, where it would pad several times more than a user's run does."""
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class FullScale(LengthGroupedSampler):
        def __iter__(self):
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=50,
                                                   generator=self.generator))

    class Trainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if not isinstance(sampler, LengthGroupedSampler):
                return sampler
            return FullScale(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)

    return Trainer


def run_trainer(strategy: str, train, tokenizer, seed: int, device, epochs: int = 1,
                attention_dropout: float | None = None, workers: int = 0) -> dict:
    """The tuned Trainer (`tuned_arguments`), batches padded to a multiple of 8 by its collator.
    `attention_dropout` None keeps the checkpoint's 0.1, as a user's model has it."""
    import tempfile

    from transformers import DataCollatorWithPadding, Trainer

    from src.base.strategies import DEFAULT_LEARNING_RATE

    model = fresh_model(strategy, seed, attention_dropout)
    padded = []  # tokens each step computed, padding included, counted where the batch enters the model
    model.register_forward_pre_hook(lambda _m, _a, kw: padded.append(kw["input_ids"].numel()), with_kwargs=True)
    with tempfile.TemporaryDirectory() as out:
        args = tuned_arguments(out, DEFAULT_LEARNING_RATE[strategy], len(train), epochs, seed, device, workers)
        seconds = timed_train(full_scale_grouping(Trainer)(
            model=model, args=args, train_dataset=trainer_items(train), processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)), device)
    return {"samples": len(train) * epochs, "seconds": seconds, "real_tokens": int(train.lengths.sum()) * epochs,
            "padded_tokens": sum(padded), "flops": flops(strategy, train.lengths.tolist()) * epochs,
            "peak_gb": peak_gb(device), "optimizer": getattr(args.optim, "value", args.optim)}


def run_eval(df, tokenizer, device, batch_size: int) -> dict:
    import torch

    from src.core.data import tokenize
    from src.core.loop import predict, resolve_precision

    enc = tokenize(df, tokenizer, 512)
    model = fresh_model("full", 0).to(device)
    dtype = resolve_precision("auto", device)
    predict(model, tokenize(df.head(batch_size), tokenizer, 512), batch_size, tokenizer.pad_token_id, device, dtype)
    t0 = time.perf_counter()
    ev = predict(model, enc, batch_size, tokenizer.pad_token_id, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"samples": len(ev.labels), "seconds": seconds}


def cpu_model() -> str:
    """/proc/cpuinfo's model name (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device) -> str:
    import torch

    cpu = f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.get_device_name()} with {cpu}" if device.type == "cuda" else cpu


TABLE_HEAD = ("\n| recipe | samples | seconds | samples/s | real tokens/s | padding | model TFLOP/s on real tokens "
              "| peak memory |\n|---|---|---|---|---|---|---|---|")


def describe(name: str, r: dict) -> str:
    sps = r["samples"] / r["seconds"]
    pad = 1 - r["real_tokens"] / r["padded_tokens"]
    tflops = r["flops"] / r["seconds"] / 1e12
    peak = f"{r['peak_gb']:.1f} GB" if r.get("peak_gb") is not None else "n/a"
    return (f"| {name} | {r['samples']} | {r['seconds']:.1f} | {sps:,.1f} | {r['real_tokens'] / r['seconds']:,.0f} "
            f"| {pad:.1%} | {tflops:.2f} | {peak} |")


def data_arguments(description: str) -> argparse.ArgumentParser:
    """--data and --vocab, as every benchmark on the DistilBERT architecture takes them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet and test.parquet")
    p.add_argument("--vocab", type=Path, required=True, help="uncased WordPiece vocab.txt (DistilBERT's)")
    return p


RECIPES = {  # row kinds; any other text is a project variant (its settings)
    "seed": "seed recipe (Trainer, fp32, pad 512, batch 16)",
    "trainer": "tuned Trainer ({precision}, group_by_length, pad to 8, {optim}, batch 32)",
    "trainer-attn0": "tuned Trainer + attention dropout 0 (the project's model setting)",
    "project": "project defaults",
}
RATIOS = (("project", "trainer"), ("project", "trainer-attn0"), ("trainer-attn0", "trainer"), ("project", "seed"))


@dataclass
class Bench:
    """What the rows train on: the same reviews (cut at 512 tokens), the seed recipe a padded copy."""

    train: Any
    val: Any
    padded: dict
    tokenizer: Any
    device: Any
    seed: int = 0
    workers: int = 0  # the tuned Trainer's data-loader workers


def measure(b: Bench, strategy: str, recipe: str, epochs: int = 0) -> dict:
    """One row's run. `epochs` 0: one epoch (the project's in steady state); N: raw totals of N epochs."""
    if recipe == "seed":
        return run_seed(strategy, b.padded, b.seed, 16, b.device, epochs=epochs or 1)
    if recipe in ("trainer", "trainer-attn0"):
        return run_trainer(strategy, b.train, b.tokenizer, b.seed, b.device, epochs or 1,
                           0.0 if recipe == "trainer-attn0" else None, b.workers)
    from src.base.config import parse_settings

    settings = {} if recipe == "project" else parse_settings(recipe)
    return run_project(strategy, b.train, b.val, b.tokenizer.pad_token_id, b.seed, b.device, epochs, **settings)


def per_epoch(b: Bench, strategy: str, recipe: str) -> dict:
    """One epoch's cost as a 2-epoch run minus a 1-epoch run: setup and first steps cancel."""
    one, two = measure(b, strategy, recipe, 1), measure(b, strategy, recipe, 2)
    diff = {k: two[k] - one[k] for k in ("samples", "seconds", "real_tokens", "padded_tokens", "flops")}
    return {**diff, "peak_gb": two["peak_gb"], "optimizer": two.get("optimizer")}


def row_name(strategy: str, recipe: str, b: Bench, optim: str | None) -> str:
    from src.core.loop import resolve_precision

    precision = str(resolve_precision("auto", b.device)).split(".")[-1].replace("bfloat16", "bf16")
    label = RECIPES.get(recipe, f"project, {recipe}")
    return f"{strategy}: " + label.format(precision=precision, optim=optim or "")


def run_plan(b: Bench, plan: list[tuple[str, str]], repeats: int, epoch_cost: bool) -> list[dict]:
    """Every row of `plan` in turn, the whole plan `repeats` times (A B C A B C): noise shows as the spread."""
    rows = []
    print(TABLE_HEAD)
    for repeat in range(1, repeats + 1):
        for strategy, recipe in plan:
            r = per_epoch(b, strategy, recipe) if epoch_cost else measure(b, strategy, recipe)
            name = row_name(strategy, recipe, b, r.get("optimizer")) + (f" [repeat {repeat}]" if repeats > 1 else "")
            print(describe(name, r), flush=True)
            rows.append({**r, "strategy": strategy, "recipe": recipe, "repeat": repeat})
    return rows


def print_ratios(rows: list[dict]) -> None:
    """samples/s of one row over another of the same strategy and repeat, each repeat shown."""
    def sps(strategy, recipe, repeat):
        r = next((r for r in rows if (r["strategy"], r["recipe"], r["repeat"]) == (strategy, recipe, repeat)), None)
        return r["samples"] / r["seconds"] if r else None

    variants = dict.fromkeys(r["recipe"] for r in rows if r["recipe"] not in RECIPES)
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        for top, bottom in (*RATIOS, *((v, "project") for v in variants)):
            pairs = [(sps(strategy, top, k), sps(strategy, bottom, k)) for k in sorted({r["repeat"] for r in rows})]
            ratios = [t / u for t, u in pairs if t and u]
            if ratios:
                shown = ", ".join(f"{x:.2f}x" for x in ratios)
                print(f"{strategy}: {top} / {bottom} samples/s = {shown}"
                      + (f" (median {statistics.median(ratios):.2f}x)" if len(ratios) > 1 else ""))


def main() -> None:
    p = data_arguments(__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=64, help="training samples for the project's loop")
    p.add_argument("--seed-samples", type=int, default=0, help="samples for the seed recipe (0 = --samples)")
    p.add_argument("--strategies", default="full,lora")
    p.add_argument("--recipes", default="seed,project", help=f"rows per strategy, from {', '.join(RECIPES)}")
    p.add_argument("--variants", default="", help="extra project settings to try, e.g. 'batch_size=64;batch_size=128'")
    p.add_argument("--repeats", type=int, default=1, help="run the whole plan this many times, rows alternated")
    p.add_argument("--per-epoch", action="store_true", help="each row's cost as a 2-epoch run minus a 1-epoch run")
    p.add_argument("--trainer-workers", type=int, default=0, help="data-loader workers of the tuned Trainer")
    p.add_argument("--eval-samples", type=int, default=0, help="also time evaluation of this many test reviews")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--json", type=Path, help="write all measurements here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    plan = check_arguments(a)
    import torch
    import transformers

    from src.core.loop import cpu_bf16_facts, pick_device, precision_choice

    transformers.logging.set_verbosity_error()
    device = pick_device()
    hardware = describe_hardware(device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {hardware}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    dtype, reason = precision_choice("auto", device)
    print(f"# precision=auto -> {str(dtype).split('.')[-1]} ({reason}); CPU flags {cpu_bf16_facts()}")
    print(f"# command: python {shlex.join(sys.argv)}")
    b = bench(a, device)
    if device.type == "cuda":
        # Warm-up both paths once (CUDA context, kernels, allocator): not part of either measurement.
        run_seed("full", {k: v[:32] for k, v in b.padded.items()}, a.seed, 16, device, steps_only=2)
        run_project("full", b.train, b.val, b.tokenizer.pad_token_id, a.seed, device)
    print(f"# load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    rows = run_plan(b, plan, a.repeats, a.per_epoch)
    print(f"\n# load average at the end: {os.getloadavg()}; samples/s "
          + ("per epoch (2-epoch run minus 1-epoch run)" if a.per_epoch else "of one epoch"))
    print_ratios(rows)
    results: dict = {"rows": rows}
    if a.eval_samples:
        test = load_texts(a.data, "test", a.eval_samples, a.seed)
        ev = results["eval"] = run_eval(test, b.tokenizer, device, a.eval_batch_size)
        print(f"eval: {ev['samples']} test reviews in {ev['seconds']:.2f} s ({ev['samples'] / ev['seconds']:,.0f}/s, "
              f"batch {a.eval_batch_size}, sorted by length)")
    if a.json:
        a.json.write_text(json.dumps({"hardware": hardware, "argv": sys.argv, "results": results}, indent=2))


def check_arguments(a) -> list[tuple[str, str]]:
    """The plan of rows, (strategy, recipe or variant), once every name in it is known to be valid."""
    from dataclasses import fields

    from src.base.config import ConfigError, TrainConfig, parse_settings

    for path in (a.data / "train.parquet", a.vocab):
        if not path.exists():
            sys.exit(f"error: {path} not found")
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    if set(recipes) - set(RECIPES):
        sys.exit(f"error: --recipes: unknown {sorted(set(recipes) - set(RECIPES))}; from {', '.join(RECIPES)}")
    variants = [v.strip() for v in a.variants.split(";") if v.strip()]
    allowed = {f.name for f in fields(TrainConfig)} | {"attention_dropout"}
    for variant in variants:
        try:
            overrides = parse_settings(variant)
        except ConfigError as exc:
            sys.exit(f"error: --variants: {exc}")
        if set(overrides) - allowed:
            sys.exit(f"error: --variants {variant!r}: only training settings and attention_dropout vary here")
    return [(s, r) for s in a.strategies.split(",") for r in recipes + variants]


def bench(a, device) -> Bench:
    from src.core.data import tokenize

    tok = tokenizer_from(a.vocab)
    seed_n = a.seed_samples or a.samples
    df = load_texts(a.data, "train", max(a.samples, seed_n), a.seed)
    return Bench(train=tokenize(df.head(a.samples), tok, 512), val=tokenize(df.head(16), tok, 512),
                 padded=pad_512(df.head(seed_n), tok), tokenizer=tok, device=device, seed=a.seed,
                 workers=a.trainer_workers)


if __name__ == "__main__":
    main()
