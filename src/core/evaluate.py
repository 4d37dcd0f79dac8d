"""Metrics and figures from labels and predicted probabilities; no model, no MLflow in here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .inference import apply_temperature


@dataclass
class Evaluation:
    labels: np.ndarray  # true ids
    probs: np.ndarray  # (n, k) softmax
    loss: float

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def metrics(ev: Evaluation, n_classes: int) -> dict[str, float]:
    """Binary tasks report F1/precision/recall of class 1 (the course report's convention); more classes: macro."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    average = "binary" if n_classes == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        ev.labels, ev.preds, average=average, zero_division=0, labels=None if average == "binary" else
        list(range(n_classes)))
    out = {
        "accuracy": float(accuracy_score(ev.labels, ev.preds)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "loss": float(ev.loss),
        "ece": expected_calibration_error(ev.probs, ev.labels),
        "brier": brier_score(ev.probs, ev.labels),
    }
    present = np.unique(ev.labels)
    if len(present) == n_classes:
        if n_classes == 2:
            out["roc_auc"] = float(roc_auc_score(ev.labels, ev.probs[:, 1]))
        else:
            out["roc_auc"] = float(roc_auc_score(ev.labels, ev.probs, multi_class="ovr", labels=list(range(n_classes))))
    else:
        out["roc_auc"] = math.nan  # undefined when a class is absent from this split
    return out


def confusion(ev: Evaluation, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(ev.labels, ev.preds, labels=list(range(n_classes)))


def report(ev: Evaluation, names: list[str]) -> dict:
    from sklearn.metrics import classification_report

    return classification_report(ev.labels, ev.preds, labels=list(range(len(names))), target_names=names,
                                 output_dict=True, zero_division=0)


def new_figure(width: float, height: float):
    """(figure, axes) made without pyplot: no process-wide backend to choose (a notebook keeps its
    inline one) and no figure registry to close; the caller saves or logs the figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def confusion_figure(cm: np.ndarray, names: list[str], title: str):
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = new_figure(5, 5)
    ConfusionMatrixDisplay(cm, display_labels=names).plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_figure(ev: Evaluation, names: list[str], title: str):
    from sklearn.metrics import RocCurveDisplay

    fig, ax = new_figure(5, 5)
    classes = [1] if len(names) == 2 else range(len(names))
    for k in classes:
        if 0 < (ev.labels == k).sum() < len(ev.labels):
            RocCurveDisplay.from_predictions(ev.labels == k, ev.probs[:, k], name=names[k], ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def worst_errors(ev: Evaluation, texts: list[str], names: list[str], k: int = 50,
                 slices: list[str] | None = None) -> dict[str, list]:
    """The k misclassified examples the model was most sure about, as columns for `log_table`."""
    wrong = np.flatnonzero(ev.preds != ev.labels)
    confidence = ev.probs[wrong, ev.preds[wrong]]
    top = wrong[np.argsort(-confidence, kind="stable")[:k]]
    return {
        "text": [texts[i][:1000] for i in top],
        "true_label": [names[ev.labels[i]] for i in top],
        "predicted_label": [names[ev.preds[i]] for i in top],
        "confidence": [round(float(ev.probs[i, ev.preds[i]]), 4) for i in top],
        **({"length_slice": [slices[i] for i in top]} if slices is not None else {}),
    }


# --- calibration -----------------------------------------------------------------------------------

# Top-label calibration for any number of classes; sklearn's calibration_curve and brier_score_loss
# take the probability of one positive class only.

def confidence_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15):
    """Per non-empty equal-width confidence bin: mean confidence, accuracy and count."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    present = np.unique(bins)
    return ([float(confidence[bins == b].mean()) for b in present], [float(correct[bins == b].mean()) for b in present],
            [int((bins == b).sum()) for b in present])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the gap between how sure the model is and how often it is right, weighted by
    how many predictions fall in each bin."""
    conf, acc, counts = confidence_bins(probs, labels, n_bins)
    return float(sum(n * abs(a - c) for c, a, n in zip(conf, acc, counts, strict=True)) / len(labels))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance between the probability vector and the one-hot truth (0 = perfect)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def calibrated(ev: Evaluation, temperature: float) -> Evaluation:

    probs = apply_temperature(ev.probs, temperature)
    loss = float(-np.log(np.clip(probs[np.arange(len(ev.labels)), ev.labels], 1e-12, 1.0)).mean())
    return Evaluation(labels=ev.labels, probs=probs, loss=loss)


def fit_temperature(ev: Evaluation) -> float:
    """The T minimising validation NLL (Guo et al., 2017): one scalar, so accuracy never changes."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return calibrated(ev, float(np.exp(log_t))).loss

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


def reliability_figure(ev: Evaluation, title: str, n_bins: int = 15):

    centers, accuracy, counts = confidence_bins(ev.probs, ev.labels, n_bins)
    fig, ax = new_figure(5, 5)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    ax.plot(centers, accuracy, "o-", label="model")
    for x, y, n in zip(centers, accuracy, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ece = expected_calibration_error(ev.probs, ev.labels, n_bins)
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# --- per class and per slice -----------------------------------------------------------------------

def per_class(ev: Evaluation, names: list[str]) -> dict[str, float]:
    """precision/recall/F1 of every class, as flat metric names (`recall_<label>`)."""
    import re

    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(ev.labels, ev.preds, labels=list(range(len(names))),
                                                 zero_division=0)
    out = {}
    for k, name in enumerate(names):
        key = re.sub(r"[^\w\-. /]", "_", str(name))
        out.update({f"precision_{key}": float(p[k]), f"recall_{key}": float(r[k]), f"f1_{key}": float(f[k])})
    return out


def length_slices(lengths: np.ndarray, max_length: int) -> list[str]:
    """Token-length buckets at quarters of `max_length`; inputs cut at `max_length` form their own."""
    highs = [max_length // 4, max_length // 2, 3 * max_length // 4, max_length - 1]
    names = [f"{lo}-{hi}" for lo, hi in zip([1] + [h + 1 for h in highs[:-1]], highs, strict=True)]
    bucket = np.searchsorted(highs, lengths)  # the first bucket whose upper end is >= the length
    return [f"{max_length} (truncated)" if n >= max_length else names[b] for n, b in zip(lengths, bucket, strict=True)]


def slice_table(ev: Evaluation, slices: list[str], names: list[str]) -> dict[str, list]:
    """Rows per length slice, then per true class: examples, accuracy, macro F1, error count."""
    from sklearn.metrics import f1_score

    slices_arr = np.asarray(slices)
    groups = [("length", s, slices_arr == s) for s in sorted(set(slices), key=_slice_order)]
    groups += [("class", names[k], ev.labels == k) for k in range(len(names))]
    rows: dict[str, list] = {"kind": [], "slice": [], "n": [], "accuracy": [], "macro_f1": [], "errors": []}
    for kind, name, members in groups:
        if not members.any():
            continue
        y, p = ev.labels[members], ev.preds[members]
        rows["kind"].append(kind)
        rows["slice"].append(name)
        rows["n"].append(int(members.sum()))
        rows["accuracy"].append(round(float((y == p).mean()), 4))
        rows["macro_f1"].append(round(float(f1_score(y, p, average="macro", zero_division=0)), 4))
        rows["errors"].append(int((y != p).sum()))
    return rows


def _slice_order(name: str) -> int:
    return int(name.split("-")[0].split(" ")[0])


def slice_figure(table: dict[str, list], title: str):

    fig, ax = new_figure(7, 4)
    labels = [f"{k}: {s}" for k, s in zip(table["kind"], table["slice"], strict=True)]
    colors = ["#4c72b0" if k == "length" else "#dd8452" for k in table["kind"]]
    bars = ax.bar(range(len(labels)), table["accuracy"], color=colors, edgecolor="black")
    ax.bar_label(bars, labels=[f"{a:.3f}\nn={n}" for a, n in zip(table["accuracy"], table["n"], strict=True)],
                 fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title(title + " (blue: token length, orange: true class)")
    fig.tight_layout()
    return fig
