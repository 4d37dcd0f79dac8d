"""Metrics and figures from labels and predicted probabilities; no model, no MLflow in here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Evaluation:
    labels: np.ndarray  # true ids
    probs: np.ndarray  # (n, k) softmax
    loss: float

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def metrics(ev: Evaluation, n_classes: int) -> dict[str, float]:
    """Binary tasks report F1/precision/recall of class 1 (the seed's convention); more classes: macro."""
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


def confusion_figure(cm: np.ndarray, names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay(cm, display_labels=names)
    disp.plot(cmap="Blues", colorbar=False, values_format="d")
    disp.ax_.set_title(title)
    disp.figure_.tight_layout()
    return disp.figure_


def roc_figure(ev: Evaluation, names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if len(names) == 2 else range(len(names))
    for k in classes:
        if 0 < (ev.labels == k).sum() < len(ev.labels):
            RocCurveDisplay.from_predictions(ev.labels == k, ev.probs[:, k], name=names[k], ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def worst_errors(ev: Evaluation, texts: list[str], names: list[str], k: int = 50) -> dict[str, list]:
    """The k misclassified examples the model was most sure about, as columns for `log_table`."""
    wrong = np.flatnonzero(ev.preds != ev.labels)
    confidence = ev.probs[wrong, ev.preds[wrong]]
    top = wrong[np.argsort(-confidence, kind="stable")[:k]]
    return {
        "text": [texts[i][:1000] for i in top],
        "true_label": [names[ev.labels[i]] for i in top],
        "predicted_label": [names[ev.preds[i]] for i in top],
        "confidence": [round(float(ev.probs[i, ev.preds[i]]), 4) for i in top],
    }
