import numpy as np
import pandas as pd
import pytest

from src.base.config import ConfigError, DataConfig
from src.core.data import (
    Encoded,
    bucket_widths,
    bucketed_batches,
    collate,
    length_grouped_batches,
    load_splits,
)
from src.core.inference import sorted_batches
from tests.builders import write_data


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_local_formats_load_and_split_stratified(tmp_path, fmt):
    train, test = write_data(tmp_path, n_train=200, n_test=60, fmt=fmt)
    s = load_splits(DataConfig(train_data=str(train), test_data=str(test), val_fraction=0.1))
    assert (len(s.train), len(s.val), len(s.test)) == (180, 20, 60)
    assert s.val["label"].value_counts().tolist() == [10, 10]  # stratified
    assert s.labels == ["0", "1"]
    # validation rows come from train, never from test, and do not overlap the train rows
    assert not set(s.val.index.map(lambda i: s.val.text[i])) & set(s.train.text)


def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    train, test = write_data(tmp_path, n_train=100, n_test=20, string_labels=True)
    s = load_splits(DataConfig(train_data=str(train), test_data=str(test)))
    assert s.labels == ["neg", "pos"] and s.label2id == {"neg": 0, "pos": 1}
    assert set(s.train["label"]) == {0, 1} and s.train["label"].dtype == np.int64


def test_three_classes_and_custom_columns(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"review": [f"text number {i}" for i in range(90)], "stars": rng.permutation([1, 3, 5] * 30)})
    df.to_csv(tmp_path / "tr.csv", index=False)
    df.head(30).to_csv(tmp_path / "te.csv", index=False)
    s = load_splits(DataConfig(train_data=str(tmp_path / "tr.csv"), test_data=str(tmp_path / "te.csv"),
                               text_column="review", label_column="stars", val_fraction=0.2))
    assert s.labels == ["1", "3", "5"]
    assert sorted(s.val["label"].value_counts().tolist()) == [6, 6, 6]


def test_caps_are_stratified_not_head(tmp_path):
    # label-sorted files (like IMDB's) would give a single class if capped with head(n)
    df = pd.DataFrame({"text": [f"t {i}" for i in range(200)], "label": [0] * 100 + [1] * 100})
    df.to_parquet(tmp_path / "a.parquet")
    s = load_splits(DataConfig(train_data=str(tmp_path / "a.parquet"), test_data=str(tmp_path / "a.parquet"),
                               max_train_samples=20, max_val_samples=10, max_test_samples=30))
    assert (len(s.train), len(s.val), len(s.test)) == (20, 10, 30)
    assert s.train["label"].value_counts().tolist() == [10, 10]
    assert s.test["label"].value_counts().tolist() == [15, 15]


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.rename(columns={"text": "body"}), "no column 'text'"),
    (lambda df: df.assign(label=1), "single label"),
    (lambda df: df.assign(text=[""] + df.text.tolist()[1:]), "1 empty or non-text"),
])
def test_bad_train_data_is_refused(tmp_path, mutate, message):
    train, test = write_data(tmp_path, n_train=60, n_test=20)
    mutate(pd.read_parquet(train)).to_parquet(train)
    with pytest.raises(ConfigError, match=message):
        load_splits(DataConfig(train_data=str(train), test_data=str(test)))


def test_empty_texts_can_be_dropped(tmp_path):
    train, test = write_data(tmp_path, n_train=60, n_test=20)
    df = pd.read_parquet(train)
    df.assign(text=[""] * 3 + [None] * 2 + df.text.tolist()[5:]).to_parquet(train)
    s = load_splits(DataConfig(train_data=str(train), test_data=str(test), empty_texts="drop"))
    assert len(s.train) + len(s.val) == 55


def test_length_grouped_batches_cover_everything_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 512, size=3000)
    batches = length_grouped_batches(lengths, 32, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(3000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert 1 - lengths.sum() / padded < 0.05  # vs about 50% when padding every row to 512
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first: OOM shows at step one
    # same seed, same order; other seed, other order
    again = length_grouped_batches(lengths, 32, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    other = length_grouped_batches(lengths, 32, np.random.default_rng(2))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other, strict=True))


def test_bucketed_epoch_sees_every_example_once_in_few_shapes():
    lengths = np.random.default_rng(0).integers(5, 500, size=3000)
    batches = bucketed_batches(lengths, 64, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(3000))
    enc = Encoded([np.ones(n, dtype=np.int32) for n in lengths], np.zeros(3000, dtype=np.int64))
    shapes = {tuple(collate(enc, b, 0, 64, int(lengths.max()))[0].shape) for b in batches}
    widths = {w for _, w in shapes}
    assert widths == set(bucket_widths(lengths, 64).tolist()) and len(widths) == 8  # 64..448 and the longest, 499
    assert len(shapes) <= 2 * len(widths)  # per width a full batch and at most one short one
    assert all(rows <= 32 for rows, _ in shapes)
    rows, width = collate(enc, batches[0], 0, 64, int(lengths.max()))[0].shape
    assert rows * width == max(r * w for r, w in shapes)  # the biggest batch first: OOM shows at step one
    again = bucketed_batches(lengths, 64, 32, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_sorted_batches_longest_first():
    lengths = np.array([3, 9, 1, 7])
    assert [b.tolist() for b in sorted_batches(lengths, 2)] == [[1, 3], [0, 2]]


def test_tokenizer_hash_ignores_call_state(distilbert_dir):
    from src.core.data import tokenizer_hash
    from src.core.modeling import load_tokenizer

    tok = load_tokenizer(str(distilbert_dir))
    before = tokenizer_hash(tok)
    tok(["a b c d e f g"], truncation=True, max_length=4, padding="max_length")
    assert tokenizer_hash(tok) == before
    other = load_tokenizer(str(distilbert_dir))
    other.add_tokens(["zzzunseen"])
    assert tokenizer_hash(other) != before


def test_duplicate_train_texts_are_counted(tmp_path):
    from collections import Counter, defaultdict

    df = pd.DataFrame({"text": [f"review number {i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    flipped = df.head(3).assign(label=1 - df.head(3).label)  # same texts, the other label
    pd.concat([df, df.iloc[10:15], df.iloc[10:15], flipped]).to_parquet(tmp_path / "train.parquet")
    df.head(20).to_parquet(tmp_path / "test.parquet")
    s = load_splits(DataConfig(train_data=str(tmp_path / "train.parquet"), test_data=str(tmp_path / "test.parquet"),
                               val_fraction=0.1, split_seed=0))
    counts = Counter(s.train["text"])
    labels = defaultdict(set)
    for text, label in zip(s.train["text"], s.train["label"], strict=True):
        labels[text].add(label)
    assert s.duplicate_train_texts == sum(c - 1 for c in counts.values()) >= 8
    assert s.conflicting_train_texts == sum(len(v) > 1 for v in labels.values()) >= 1
