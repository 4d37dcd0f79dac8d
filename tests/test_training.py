"""The loop itself, tracking off (NullLogger)."""

import math

import pytest

from src.base.config import DataConfig, LoraConfig, TrainConfig
from src.core.data import load_splits, tokenize
from src.core.loop import fit, seed_everything
from src.core.modeling import build_model, load_tokenizer


def _fit(model_dir, data_files, strategy, lr, seed=0, epochs=3):
    splits = load_splits(DataConfig(train_data=str(data_files[0]), test_data=str(data_files[1])))
    tok = load_tokenizer(str(model_dir))
    train, val = tokenize(splits.train, tok, 128), tokenize(splits.val, tok, 128)
    seed_everything(seed)
    model = build_model(str(model_dir), strategy, splits.labels, LoraConfig())
    cfg = TrainConfig(epochs=epochs, batch_size=16, learning_rate=lr, seed=seed, logging_steps=1)
    recorder = Recorder()
    return fit(model, train, val, cfg, lr, 2, tok.pad_token_id, logger=recorder), recorder.seen


class Recorder:
    def __init__(self):
        self.seen = []

    def log_metrics(self, values, step):
        self.seen.append((step, values))

    def flush(self):
        pass


def test_lora_learns_well_above_chance(distilbert_dir, data_files):
    result, seen = _fit(distilbert_dir, data_files, "lora", 5e-3)
    assert result.best_val_metrics["accuracy"] >= 0.85
    losses = [v["train/loss"] for _, v in seen if "train/loss" in v]
    assert losses[-1] < losses[0]
    assert {"val/accuracy", "val/f1", "val/loss"} <= {k for _, v in seen for k in v}


def test_full_learns_from_bert(bert_dir, data_files):
    result, _ = _fit(bert_dir, data_files, "full", 1e-3)
    assert result.best_val_metrics["accuracy"] >= 0.85


def test_deterministic_on_cpu_for_a_fixed_seed(distilbert_dir, data_files):
    a, seen_a = _fit(distilbert_dir, data_files, "lora", 5e-3, seed=3, epochs=1)
    b, seen_b = _fit(distilbert_dir, data_files, "lora", 5e-3, seed=3, epochs=1)
    c, seen_c = _fit(distilbert_dir, data_files, "lora", 5e-3, seed=4, epochs=1)
    assert seen_a == seen_b
    assert (a.best_val.probs == b.best_val.probs).all()
    assert seen_a != seen_c


def test_early_stopping_and_best_epoch(distilbert_dir, data_files):
    splits = load_splits(DataConfig(train_data=str(data_files[0]), test_data=str(data_files[1])))
    tok = load_tokenizer(str(distilbert_dir))
    train, val = tokenize(splits.train, tok, 128), tokenize(splits.val, tok, 128)
    seed_everything(0)
    model = build_model(str(distilbert_dir), "lora", splits.labels, LoraConfig())
    # a learning rate of ~0 never improves validation loss after epoch 1 -> stops after patience epochs
    cfg = TrainConfig(epochs=5, batch_size=16, learning_rate=1e-12, selection_metric="loss", early_stopping_patience=1)
    result = fit(model, train, val, cfg, 1e-12, 2, tok.pad_token_id)
    assert result.stopped_early and len(result.history) < 5
    best = min(result.history, key=lambda h: h["loss"])
    assert result.best_epoch == best["epoch"]


@pytest.mark.parametrize("metric", ["ece", "f1"])
def test_the_selection_metric_is_read_in_its_direction(distilbert_dir, data_files, metric):
    """ECE is lower-is-better, F1 higher: the epoch kept is the best in the metric's own direction
    (declared once, in names.DIRECTION, which the search's direction reads too)."""
    from src.base.names import DIRECTION

    splits = load_splits(DataConfig(train_data=str(data_files[0]), test_data=str(data_files[1])))
    tok = load_tokenizer(str(distilbert_dir))
    train, val = tokenize(splits.train, tok, 128), tokenize(splits.val, tok, 128)
    seed_everything(0)
    model = build_model(str(distilbert_dir), "lora", splits.labels, LoraConfig())
    result = fit(model, train, val, TrainConfig(epochs=3, batch_size=16, selection_metric=metric), 2e-3, 2,
                 tok.pad_token_id)
    pick = min if DIRECTION[metric] == "min" else max
    assert result.best_epoch == pick(result.history, key=lambda h: h[metric])["epoch"]
    assert len({round(h[metric], 6) for h in result.history}) > 1  # the epochs differ: the choice meant something


def _attention_ops(model_dir, attention_dropout) -> set[str]:
    """The attention kernels one training step of the default setup dispatches to."""
    import torch
    from torch.profiler import profile

    from src.base.config import ModelConfig

    value = ModelConfig().attention_dropout if attention_dropout == "default" else attention_dropout
    model = build_model(str(model_dir), "lora", ["0", "1"], LoraConfig(), value).train()
    ids = torch.randint(5, 100, (4, 24))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # padded, as every length-grouped batch is
    with profile() as prof:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_default_training_step_uses_fused_attention(distilbert_dir, bert_dir):
    """With attention dropout the math fallback materialises and masks every attention matrix:
    the larger half of a CPU step (benchmarks/README.md). The default must keep the fused kernel."""
    for model_dir in (distilbert_dir, bert_dir):
        fused = _attention_ops(model_dir, "default")
        assert any("flash_attention" in op for op in fused), fused
        assert not any("math" in op for op in fused), fused
        assert any("math" in op for op in _attention_ops(model_dir, 0.1))  # the check can fail


@pytest.mark.parametrize("facts, chosen, why", [
    ({"avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, "bf16", "avx512_bf16"),
    ({"avx512_f": True, "avx512_bf16": True, "amx_bf16": True}, "bf16", "amx_bf16"),
    ({"avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, "fp32", "emulated"),
    ({"avx512_f": False, "avx512_bf16": False, "amx_bf16": False}, "fp32", "without bf16"),
])
def test_auto_precision_on_cpu_is_bf16_only_where_native(facts, chosen, why):
    from src.core.loop import auto_cpu_precision

    name, reason = auto_cpu_precision(facts)
    assert name == chosen and why in reason


def test_auto_precision_on_this_cpu_follows_its_flags():
    import torch

    from src.core.loop import cpu_bf16_facts, precision_choice

    facts = cpu_bf16_facts()
    dtype, reason = precision_choice("auto", torch.device("cpu"))
    assert (dtype == torch.bfloat16) == (facts["avx512_bf16"] or facts["amx_bf16"]), (facts, reason)
    assert precision_choice("fp32", torch.device("cpu")) == (torch.float32, "set")


def _bucketed_fit(model_dir, data_files, bucket_width: int):
    """Three optimizer steps of full fine-tuning in fp32, recording the training loss of each."""
    splits = load_splits(DataConfig(train_data=str(data_files[0]), test_data=str(data_files[1]),
                                    max_train_samples=48, max_val_samples=16))
    tok = load_tokenizer(str(model_dir))
    train, val = tokenize(splits.train, tok, 128), tokenize(splits.val, tok, 128)
    seed_everything(0)
    model = build_model(str(model_dir), "full", splits.labels, LoraConfig())
    cfg = TrainConfig(epochs=1, batch_size=16, logging_steps=1, precision="fp32", bucket_width=bucket_width)
    recorder = Recorder()
    result = fit(model, train, val, cfg, 1e-3, 2, tok.pad_token_id, logger=recorder)
    return result, [v["train/loss"] for _, v in recorder.seen if "train/loss" in v]


def test_bucketed_training_sees_every_text_once_at_rounded_widths(distilbert_dir, data_files):
    plain, plain_losses = _bucketed_fit(distilbert_dir, data_files, 0)
    bucketed, losses = _bucketed_fit(distilbert_dir, data_files, 64)
    assert len(plain_losses) == len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert plain.samples_seen == bucketed.samples_seen == 48
    assert plain.real_tokens_seen == bucketed.real_tokens_seen
    assert bucketed.padded_tokens_seen >= plain.padded_tokens_seen  # widths rounded up, never past the longest
    assert bucketed.padded_tokens_seen <= 48 * 128


def test_training_loss_is_logged_every_epoch_whatever_logging_steps(distilbert_dir, data_files):
    """logging_steps larger than an epoch still leaves one train/loss point per epoch."""
    splits = load_splits(DataConfig(train_data=str(data_files[0]), test_data=str(data_files[1]),
                                    max_train_samples=64))
    tok = load_tokenizer(str(distilbert_dir))
    train, val = tokenize(splits.train, tok, 64), tokenize(splits.val, tok, 64)
    model = build_model(str(distilbert_dir), "lora", splits.labels, LoraConfig())
    cfg = TrainConfig(epochs=2, batch_size=16, logging_steps=1000)
    recorder = Recorder()
    fit(model, train, val, cfg, 1e-3, 2, tok.pad_token_id, logger=recorder)
    epochs = [v["train/epoch"] for _, v in recorder.seen if "train/loss" in v]
    assert epochs == [1.0, 2.0]


def test_a_resume_may_change_where_it_runs_not_what_it_learns():
    from src.base.config import ConfigError, RunConfig
    from src.core.checkpoint import check_settings

    saved = RunConfig().flat()
    check_settings(saved, {**saved, "device": "cuda:1", "system_metrics": False, "dist_timeout": 60}, "r1")
    with pytest.raises(ConfigError, match=r"run r1 was started with other settings \(lora_r: 8 -> 16\)"):
        check_settings(saved, {**saved, "lora_r": 16}, "r1")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_without_an_index_is_the_current_gpu():
    import torch

    from src.core.loop import pick_device

    assert pick_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert pick_device("cuda:0") == torch.device("cuda", 0)
