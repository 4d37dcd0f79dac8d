import pytest

from src.base.config import ConfigError, LoraConfig
from src.core.modeling import attention_dropout_override, build_model, count_params


def lora_params(r, fan_in, fan_out):
    return r * (fan_in + fan_out)  # A: r x in, B: out x r


@pytest.mark.parametrize("r", [2, 8])
def test_distilbert_lora_counts_match_formula(distilbert_dir, r):
    model = build_model(str(distilbert_dir), "lora", ["neg", "pos"], LoraConfig(lora_r=r))
    dim, layers, labels = 32, 2, 2
    adapters = layers * 3 * lora_params(r, dim, dim)  # q_lin, k_lin, v_lin
    head = (dim * dim + dim) + (dim * labels + labels)  # pre_classifier + classifier
    counts = count_params(model)
    assert counts.trainable == adapters + head
    full = count_params(build_model(str(distilbert_dir), "full", ["neg", "pos"], LoraConfig()))
    assert counts.total == full.total + adapters  # base weights + adapters, head counted once
    assert full.trainable == full.total


def test_bert_lora_counts_match_formula(bert_dir):
    model = build_model(str(bert_dir), "lora", ["a", "b", "c"], LoraConfig(lora_r=4))
    dim, layers, labels = 32, 2, 3
    adapters = layers * 3 * lora_params(4, dim, dim)  # query, key, value
    head = dim * labels + labels  # classifier (the pooler is pretrained, stays frozen)
    assert count_params(model).trainable == adapters + head


def test_all_linear_and_explicit_targets(distilbert_dir):
    explicit = build_model(str(distilbert_dir), "lora", ["0", "1"], LoraConfig(lora_r=2, lora_target_modules="q_lin"))
    dim = 32
    assert count_params(explicit).trainable == 2 * lora_params(2, dim, dim) + (dim * dim + dim) + (dim * 2 + 2)
    every = build_model(str(distilbert_dir), "lora", ["0", "1"], LoraConfig(lora_r=2, lora_target_modules="all-linear"))
    assert count_params(every).trainable > count_params(explicit).trainable


def test_unknown_target_module_is_a_config_error(distilbert_dir):
    with pytest.raises(ConfigError, match="do not match"):
        build_model(str(distilbert_dir), "lora", ["0", "1"], LoraConfig(lora_target_modules="nope"))


def _attention_dropout(model) -> float:
    """The probability the attention modules apply, read from the modules (not the config)."""
    values = {m.dropout.p for n, m in model.named_modules()
              if n.endswith(("attention", "attention.self")) and hasattr(m, "dropout")}
    values |= {m.dropout_prob for m in model.modules() if hasattr(m, "dropout_prob")}
    assert len(values) == 1, values
    return values.pop()


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_attention_dropout_reaches_the_attention_modules(arch, distilbert_dir, bert_dir):
    folder = str(distilbert_dir if arch == "distilbert" else bert_dir)
    kept = build_model(folder, "full", ["0", "1"], LoraConfig())
    assert _attention_dropout(kept) == 0.1  # what the checkpoint says, as DistilBERT and BERT ship
    for value in (0.0, 0.25):
        for strategy in ("full", "lora"):
            assert _attention_dropout(build_model(folder, strategy, ["0", "1"], LoraConfig(), value)) == value


def test_attention_dropout_on_a_model_without_it():
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="plain")
    assert attention_dropout_override(config, 0.0) == {}  # nothing to switch off
    with pytest.raises(ConfigError, match="no attention-dropout setting"):
        attention_dropout_override(config, 0.1)
