"""Training throughput: the seed's recipe against this project's loop, side by side in one process.

    # CPU (a few minutes): the same 64 reviews through each recipe
    python benchmarks/throughput.py --data ../shared/data/imdb --vocab ../shared/data/tokenizer/vocab.txt --samples 64
    # GPU: a full epoch for the project's loop, 8,192 samples for the (slow) seed recipe, 25,000-review eval
    python benchmarks/throughput.py --data DIR --vocab FILE --samples 25000 --seed-samples 8192 --eval-samples 25000

Model: the distilbert-base-uncased architecture with random weights and its real uncased vocabulary,
so a step costs what the pretrained model's step costs, without downloading weights.
(a) seed recipe, as the course report ran it: transformers Trainer, fp32, every review padded to 512,
    batch 16, AdamW (not fused), linear schedule.
(b) this project: `src.loop.fit` with its defaults (length-grouped dynamic padding, bf16 where the
    device supports it, no dropout on attention probabilities so attention runs fused, fused AdamW on
    GPU), tracking off. `--variants "attention_dropout=0.1"` shows one default's share of the gain.
Both see the same texts; samples/s counts training samples only (no evaluation inside the timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

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

    from src.config import LoraConfig
    from src.modeling import attention_dropout_override, wrap_lora

    torch.manual_seed(seed)
    config = DistilBertConfig(num_labels=2)
    config.update(attention_dropout_override(config, attention_dropout))
    model = DistilBertForSequenceClassification(config)
    return wrap_lora(model, LoraConfig(lora_r=8, lora_alpha=32)) if strategy == "lora" else model


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


def run_seed(strategy: str, enc: dict, seed: int, batch_size: int, device, steps_only: int = 0) -> dict:
    """The seed recipe through transformers' Trainer, on reviews padded to 512 tokens."""
    import tempfile

    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

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
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=2e-5,
            optim="adamw_torch", bf16=False, fp16=False, report_to="none", save_strategy="no",
            logging_strategy="no", eval_strategy="no", disable_tqdm=True, seed=seed,
            use_cpu=device.type == "cpu", max_steps=steps_only or -1)
        trainer = Trainer(model=model, args=args, train_dataset=Padded())
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict would break the table
        peak_reset(device)
        t0 = time.perf_counter()
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    n = min(len(labels), steps_only * batch_size) if steps_only else len(labels)
    real = [sum(m) for m in enc["attention_mask"][:n]]
    return {"samples": n, "seconds": seconds, "real_tokens": sum(real), "padded_tokens": n * 512,
            "flops": flops(strategy, real), "peak_gb": peak_gb(device)}


def run_project(strategy: str, train, val, pad_id: int, seed: int, device, **overrides) -> dict:
    """`overrides`: settings of TrainConfig or ModelConfig.attention_dropout; the rest are defaults."""
    import torch

    from src.config import ModelConfig, TrainConfig
    from src.loop import fit

    attention_dropout = overrides.pop("attention_dropout", ModelConfig().attention_dropout)
    cfg = TrainConfig(epochs=1, seed=seed, **overrides)
    lr = 5e-4 if strategy == "lora" else 5e-5
    model = fresh_model(strategy, seed, attention_dropout)
    peak_reset(device)
    result = fit(model, train, val, cfg, lr, 2, pad_id)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Steady state: steps that compiled a new batch shape (under compile) are reported as warm-up,
    # unless every step did (too few samples for the number of shapes): then all of it counts.
    steady = result.samples_seen > result.warmup_samples
    share = 1 - result.warmup_samples / result.samples_seen if steady else 1.0
    return {"samples": result.samples_seen - result.warmup_samples if steady else result.samples_seen,
            "seconds": result.train_seconds - result.warmup_seconds if steady else result.train_seconds,
            "real_tokens": result.real_tokens_seen * share, "padded_tokens": result.padded_tokens_seen * share,
            "flops": flops(strategy, train.lengths.tolist()) * share, "peak_gb": peak_gb(device),
            "warmup_s": result.warmup_seconds}


def run_eval(df, tokenizer, device, batch_size: int) -> dict:
    import torch

    from src.data import tokenize
    from src.loop import predict, resolve_precision

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
              "| peak memory | warm-up s (compiling, not in samples/s) |\n|---|---|---|---|---|---|---|---|---|")


def describe(name: str, r: dict) -> str:
    sps = r["samples"] / r["seconds"]
    pad = 1 - r["real_tokens"] / r["padded_tokens"]
    tflops = r["flops"] / r["seconds"] / 1e12
    peak = f"{r['peak_gb']:.1f} GB" if r.get("peak_gb") is not None else "n/a"
    return (f"| {name} | {r['samples']} | {r['seconds']:.1f} | {sps:,.1f} | {r['real_tokens'] / r['seconds']:,.0f} "
            f"| {pad:.1%} | {tflops:.2f} | {peak} | {r.get('warmup_s', 0.0):.1f} |")


def data_arguments(description: str) -> argparse.ArgumentParser:
    """--data and --vocab, as every benchmark on the DistilBERT architecture takes them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet and test.parquet")
    p.add_argument("--vocab", type=Path, required=True, help="uncased WordPiece vocab.txt (DistilBERT's)")
    return p


def main() -> None:
    p = data_arguments(__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=64, help="training samples for the project's loop")
    p.add_argument("--seed-samples", type=int, default=0, help="samples for the seed recipe (0 = --samples)")
    p.add_argument("--strategies", default="full,lora")
    p.add_argument("--eval-samples", type=int, default=0, help="also time evaluation of this many test reviews")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--variants", default="", help="extra project settings to try, e.g. 'batch_size=64;batch_size=128'")
    p.add_argument("--json", type=Path, help="write all measurements here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for path in (a.data / "train.parquet", a.vocab):
        if not path.exists():
            sys.exit(f"error: {path} not found")
    from dataclasses import fields

    from src.config import ConfigError, TrainConfig, parse_settings

    try:
        variants = {v.strip(): parse_settings(v) for v in a.variants.split(";") if v.strip()}
    except ConfigError as exc:
        sys.exit(f"error: --variants: {exc}")
    allowed = {f.name for f in fields(TrainConfig)} | {"attention_dropout"}
    for variant, overrides in variants.items():
        if set(overrides) - allowed:
            sys.exit(f"error: --variants {variant!r}: only training settings and attention_dropout vary here")

    import torch
    import transformers

    from src.loop import cpu_bf16_facts, pick_device, precision_choice

    transformers.logging.set_verbosity_error()
    device = pick_device()
    hardware = describe_hardware(device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {hardware}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    dtype, reason = precision_choice("auto", device)
    print(f"# precision=auto -> {str(dtype).split('.')[-1]} ({reason}); CPU flags {cpu_bf16_facts()}")
    print(f"# command: python {' '.join(sys.argv)}")
    from src.data import tokenize

    tok = tokenizer_from(a.vocab)
    seed_n = a.seed_samples or a.samples
    df = load_texts(a.data, "train", max(a.samples, seed_n), a.seed)
    padded = pad_512(df.head(seed_n), tok)
    train = tokenize(df.head(a.samples), tok, 512)
    val = tokenize(df.head(16), tok, 512)
    pad_id = tok.pad_token_id
    if device.type == "cuda":
        # Warm-up both paths once (CUDA context, kernels, allocator): not part of either measurement.
        run_seed("full", {k: v[:32] for k, v in padded.items()}, a.seed, 16, device, steps_only=2)
        run_project("full", tokenize(df.head(256), tok, 512), val, pad_id, a.seed, device)

    results = {}
    print(TABLE_HEAD)
    for strategy in a.strategies.split(","):
        seed_r = run_seed(strategy, padded, a.seed, 16, device)
        print(describe(f"{strategy}: seed recipe (Trainer, fp32, pad 512, batch 16)", seed_r), flush=True)
        proj_r = run_project(strategy, train, val, pad_id, a.seed, device)
        print(describe(f"{strategy}: project defaults", proj_r), flush=True)
        results[strategy] = {"seed": seed_r, "project": proj_r,
                             "ratio": (proj_r["samples"] / proj_r["seconds"]) / (seed_r["samples"] / seed_r["seconds"])}
        for variant, overrides in variants.items():
            r = run_project(strategy, train, val, pad_id, a.seed, device, **overrides)
            print(describe(f"{strategy}: project, {variant}", r), flush=True)
            results[strategy][variant] = r
    print()
    for strategy, r in results.items():
        print(f"{strategy}: project / seed samples/s = {r['ratio']:.2f}x")
    if a.eval_samples:
        test = load_texts(a.data, "test", a.eval_samples, a.seed)
        ev = run_eval(test, tok, device, a.eval_batch_size)
        results["eval"] = ev
        print(f"eval: {ev['samples']} test reviews in {ev['seconds']:.2f} s ({ev['samples'] / ev['seconds']:,.0f}/s, "
              f"batch {a.eval_batch_size}, sorted by length)")
    if a.json:
        a.json.write_text(json.dumps({"hardware": hardware, "argv": sys.argv, "results": results}, indent=2))


if __name__ == "__main__":
    main()
