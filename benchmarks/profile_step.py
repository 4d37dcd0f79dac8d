"""Where one training step spends its time, per attention-dropout value: the kernels behind the default.

    python benchmarks/profile_step.py --data ../shared/data/imdb --vocab ../shared/data/tokenizer/vocab.txt

One batch of real IMDB reviews padded to --length, the DistilBERT-base architecture with random weights
(as in throughput.py), the project's compute precision, one warm-up step, one timed step, one step under
torch.profiler. Prints the step time, which attention kernel ran, and the shares of the step spent in
attention (forward and backward kernels with what they call), dropout masks and matrix multiplies.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from throughput import fresh_model, load_texts, tokenizer_from

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The scaled-dot-product attention implementations PyTorch may dispatch to; "math" is the unfused
# fallback, the others fused kernels (CPU flash, CUDA flash and memory-efficient), with their backwards.
ATTENTION = ("aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_efficient_attention_backward")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet")
    p.add_argument("--vocab", type=Path, required=True, help="uncased WordPiece vocab.txt")
    p.add_argument("--strategy", default="full", choices=("full", "lora"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=512, help="every review padded (or cut) to this many tokens")
    p.add_argument("--attention-dropout", default="0.1,0", help="values to profile, comma-separated")
    a = p.parse_args()
    values = [float(v) for v in a.attention_dropout.split(",")]
    for path in (a.data / "train.parquet", a.vocab):
        if not path.exists():
            sys.exit(f"error: {path} not found")

    import torch
    import transformers
    from torch.profiler import profile

    from src.core.loop import pick_device, resolve_precision

    transformers.logging.set_verbosity_error()
    device = pick_device()
    dtype = resolve_precision("auto", device)
    tok = tokenizer_from(a.vocab)
    df = load_texts(a.data, "train", a.batch_size, 0)
    enc = tok(df["text"].tolist(), truncation=True, max_length=a.length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    labels = torch.tensor(df["label"].tolist(), device=device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {device.type}, {str(dtype).split('.')[-1]}, {a.strategy}, "
          f"{a.batch_size} reviews x {a.length} tokens ({int(mask.sum())} real)")
    print(f"# command: python {shlex.join(sys.argv)}\n")
    print("| attention_dropout | attention kernel | step s | attention ops (with what they call) | dropout masks "
          "| matrix multiplies (own time) |")
    print("|---|---|---|---|---|---|")
    for value in values:
        model = fresh_model(a.strategy, 0, value).to(device).train()
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

        def step(model=model, optimizer=optimizer):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=ids, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        step()  # warm-up
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        with profile() as prof:
            step()
        rows = prof.key_averages()
        total = sum(r.self_cpu_time_total for r in rows)  # own times add up to the whole step
        kernels = [r.key.removeprefix("aten::_scaled_dot_product_") for r in rows if r.key in ATTENTION]
        attention = sum(r.cpu_time_total for r in rows if r.key in ATTENTION) / total
        masks = sum(r.self_cpu_time_total for r in rows if r.key == "aten::bernoulli_") / total
        matmul = sum(r.self_cpu_time_total for r in rows if r.key in MATMUL) / total
        print(f"| {value:g} | {', '.join(sorted(kernels))} | {seconds:.1f} | {attention:.0%} | {masks:.0%} "
              f"| {matmul:.0%} |", flush=True)


if __name__ == "__main__":
    main()
