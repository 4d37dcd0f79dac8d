"""Tiny encoders, a tokenizer trained on the spot, and synthetic sentiment data with a learnable signal."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

POSITIVE = ["great", "excellent", "wonderful", "loved", "brilliant", "superb", "moving", "delightful"]
NEGATIVE = ["awful", "terrible", "boring", "hated", "dreadful", "poor", "tedious", "clumsy"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "was", "and", "a", "story", "music",
           "ending", "director", "script", "cast", "it", "this", "with", "of", "camera", "dialogue"]


def sentiment_frame(n: int, seed: int = 0, string_labels: bool = False) -> pd.DataFrame:
    """Each text mixes filler with 2-4 words of its class and at most one of the other: a bag-of-words
    model separates them, but only after it learns which words carry the sentiment."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        own, other = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 30))]
        words += [rng.choice(own) for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.5:
            words.append(rng.choice(other))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + ".", "label": ("pos" if label else "neg") if string_labels else label})
    return pd.DataFrame(rows)


def write_data(folder: Path, n_train: int = 400, n_test: int = 120, fmt: str = "parquet",
               string_labels: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        df = sentiment_frame(n, seed, string_labels)
        path = folder / f"{name}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(path)
        elif fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_json(path, orient="records", lines=True)
        paths.append(path)
    return paths[0], paths[1]


def write_tokenizer(folder: Path, kind: str = "distilbert") -> None:
    """A WordPiece vocabulary trained on the synthetic corpus, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer, DistilBertTokenizer

    corpus = sentiment_frame(400, seed=7)["text"].tolist()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    cls = DistilBertTokenizer if kind == "distilbert" else BertTokenizer
    # transformers 5 takes the vocabulary itself (`vocab=`); the old `vocab_file=` is silently ignored.
    cls(vocab=dict(vocab), do_lower_case=True, model_max_length=512).save_pretrained(folder)


def write_model(folder: Path, kind: str = "distilbert", seed: int = 0, pretrain: bool = True) -> Path:
    """A 2-layer encoder (no head) saved like a pretrained checkpoint.

    A randomly initialised encoder gives nearly the same [CLS] vector for every input, so frozen
    weights + LoRA cannot learn from it; `pretrain` first trains every weight for a few epochs on
    separate synthetic data, as real pretraining would, and then keeps only the encoder.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    write_tokenizer(folder, kind)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=512))
    else:
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=512))
    if pretrain:
        df = sentiment_frame(320, seed=11)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(4):
            for start in range(0, len(df), 32):
                part = df.iloc[start:start + 32]
                batch = tokenizer(part["text"].tolist(), padding=True, return_tensors="pt")
                loss = model(**batch, labels=torch.tensor(part["label"].to_numpy())).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    model.base_model.save_pretrained(folder)
    return folder


def lookup_classifier(encoder: Path, answers: dict[str, int], seed: int = 0):
    """A real sequence classifier (the tiny encoder plus a head, trained here) that labels each text of
    the gate's known world, and each of its words alone, by its first word, as `answers` says: a model
    whose predictions a test knows exactly. Returns (model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    from src.base.config import LoraConfig
    from src.core.modeling import build_model

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = build_model(str(encoder), "full", ["0", "1"], LoraConfig())
    texts = GATE_TEXTS + GATE_WORDS  # the bare words too: a served model is asked `great` and `awful`
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    target = torch.tensor([answers[t.split()[0]] for t in texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(400):
        model.train()
        model(**batch, labels=target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            if torch.equal(model(**batch).logits.argmax(-1), target):
                return model, tokenizer
    raise AssertionError("the lookup classifier did not learn its answers")


# --- the promotion gate's known world --------------------------------------------------------------
# 8 words, 50 distinct held-out texts each (the word, then two filler words); a word's texts mostly
# carry its label GATE_Y (48 of 50, the last word 27 of 50). A lookup classifier answers per word, so
# every model's accuracy, and every paired comparison, is known exactly: flipping word 0 costs 46
# texts, word 7 only 4.
GATE_WORDS = ["great", "awful", "movie", "plot", "actor", "scene", "music", "story"]
GATE_Y = [1, 0, 1, 0, 1, 0, 1, 0]
GATE_RIGHT = [48] * 7 + [27]
_FILLER = ["the", "film", "was", "and", "a", "ending", "director", "script", "cast", "it"]
GATE_FILL = [f"{a} {b}" for a in _FILLER for b in _FILLER if a != b][:50]
GATE_TEXTS = [f"{w} {fill}" for w in GATE_WORDS for fill in GATE_FILL]


def gate_truth():
    import numpy as np

    return np.array([GATE_Y[g] if k < GATE_RIGHT[g] else 1 - GATE_Y[g] for g in range(8) for k in range(50)])


def answers_for(flipped: tuple[int, ...] = ()) -> dict[str, int]:
    """The lookup: each word's label, or the other one for the words in `flipped`."""
    return {w: 1 - GATE_Y[g] if g in flipped else GATE_Y[g] for g, w in enumerate(GATE_WORDS)}


def submit_logged(model, tokenizer, answers: dict[str, int], train_words: tuple[str, ...] = (),
                  max_batch_size: int = 0, texts: list[str] | None = None, truth=None):
    """Log a lookup classifier in the active run; the gate's Candidate for it on the known world (or on
    `texts` with their `truth`). `train_words`: the words whose texts it counts as trained on."""
    import numpy as np

    from src.mlflow_io import serving, tracking
    from src.mlflow_io.gate import Candidate

    hashes = serving.text_hashes([t for t in GATE_TEXTS if t.split()[0] in train_words])
    info = tracking.log_model(model, tokenizer, {"strategy": "full", "max_length": 16, "temperature": 1.0,
                                                 "max_batch_size": max_batch_size}, hashes)
    texts = list(GATE_TEXTS) if texts is None else texts
    stored = serving.resolve(info.model_uri)
    return Candidate(model_uri=info.model_uri, labels=["0", "1"], split="test", texts=texts,
                     truth=gate_truth() if truth is None else np.asarray(truth),
                     preds=np.array([answers[t.split()[0]] for t in texts]), train_hashes=hashes, majority=0,
                     files_digest=serving.manifest_digest(stored.files))
