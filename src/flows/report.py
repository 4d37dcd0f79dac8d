"""The results table and charts of tracked runs (`python -m src.compare`), written to a folder and
logged as a `compare` run.

Reads the finished runs of every strategy (tuning trials included, study and compare runs left out)
and writes results.md, results.csv, accuracy_f1.png, trainable_params.png and metric_vs_params.png.
The MLflow calls that search runs and log the report's own run are here; the champion is looked up
through gate.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..base.config import CompareConfig, ConfigError
from ..base.names import PEAK_MEMORY_MB, RUNTIME_S, SAMPLES_PER_S, STRATEGY, TRIAL
from ..base.names import metric as metric_key
from ..base.strategies import STRATEGIES
from ..core.evaluate import new_figure
from ..mlflow_io.gate import current_champion
from ..mlflow_io.tracking import live_experiment, redact

METRICS = ("accuracy", "f1", "precision", "recall")
FILES = ("results.md", "results.csv", "accuracy_f1.png", "trainable_params.png", "metric_vs_params.png")

# Markdown column -> (table column, format). The CSV keeps every column unformatted.
SHOWN = {
    "strategy": ("strategy", "{}"),
    "run": ("run", "{}"),
    "front": ("marks", "{}"),
    **{f"val {m}": (f"val_{m}", "{:.4f}") for m in METRICS},
    **{f"test {m}": (f"test_{m}", "{:.4f}") for m in METRICS},
    "trainable params": ("trainable_params", "{:,.0f}"),
    "% of total": ("trainable_pct", "{:.2f}"),
    "reduction vs full %": ("reduction_vs_full_pct", "{:.2f}"),
    "train s": ("train_seconds", "{:.1f}"),
    "samples/s": ("samples_per_s", "{:.1f}"),
    "peak MB": ("peak_memory_mb", "{:,.0f}"),
}


def select_runs(cc: CompareConfig):
    """Finished full/LoRA runs of the selection as MLflow's search DataFrame, plus the experiment
    the report is logged to."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_ids, selection, described = _by_ids(client, cc.ids()) if cc.ids() else _by_experiments(client, cc)
    query = f"{selection} and {cc.filter_string}" if cc.filter_string else selection
    try:
        runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, max_results=50_000)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"--filter-string {cc.filter_string!r} is not a valid MLflow filter "
                          f"({str(exc).splitlines()[0]})") from None
    column = f"tags.{STRATEGY}"
    runs = runs[runs[column].isin(list(STRATEGIES))] if len(runs) and column in runs else runs.iloc[:0]
    if runs.empty:
        extra = f" matching {cc.filter_string!r}" if cc.filter_string else ""
        raise ConfigError(f"no finished training runs in {described}{extra}; train some first "
                          f"(make lora) or widen the selection")
    return runs.reset_index(drop=True), experiment_ids[0]


def _by_ids(client, ids: list[str]) -> tuple[list[str], str, str]:
    """(experiment ids, search filter, description) of exactly these runs, each of which must be finished."""
    import mlflow

    experiment_ids = []
    for run_id in ids:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(f"run {run_id} does not exist on {redact(mlflow.get_tracking_uri())}") from None
        if run.info.status != "FINISHED":
            raise ConfigError(f"run {run_id} is {run.info.status}; compare finished runs")
        experiment_ids.append(run.info.experiment_id)
    selection = "attributes.run_id IN ({})".format(", ".join(f"'{i}'" for i in ids))
    return list(dict.fromkeys(experiment_ids)), selection, f"runs {', '.join(ids)}"


def _by_experiments(client, cc: CompareConfig) -> tuple[list[str], str, str]:
    """(experiment ids, search filter, description) of the finished runs of the named experiments."""
    import mlflow

    experiment_ids = []
    for name in cc.experiments():
        experiment = live_experiment(client, name)
        if experiment is None:
            raise ConfigError(f"experiment {name!r} does not exist on {redact(mlflow.get_tracking_uri())}; list "
                              f"them with `mlflow experiments search`")
        experiment_ids.append(experiment.experiment_id)
    return experiment_ids, "attributes.status = 'FINISHED'", f"experiment(s) {', '.join(cc.experiments())}"


def pareto_front(quality, cost):
    """True for the non-dominated points: no other point is at least as good on both (higher
    quality, lower cost) and strictly better on one. Points with a missing value are never on it."""
    import numpy as np

    q = np.asarray(quality, dtype=float)
    c = np.asarray(cost, dtype=float)
    front = np.zeros(len(q), dtype=bool)
    for i in range(len(q)):
        if np.isnan(q[i]) or np.isnan(c[i]):
            continue
        dominated = (q >= q[i]) & (c <= c[i]) & ((q > q[i]) | (c < c[i]))
        front[i] = not dominated.any()
    return front


def champion_runs(name: str) -> set[str]:
    """The run behind the `champion` alias of a registered model (the run, or tuning trial, that logged
    it). Empty when there is no such model."""
    import mlflow

    version = current_champion(mlflow.MlflowClient(), name) if name else None
    if version is None:
        return set()
    return {version.run_id} if version.run_id else set()


def results_table(runs, champions: set[str] = frozenset()):
    """One row per run: the numbers as MLflow holds them, plus the derived shares.

    `reduction_vs_full_pct` compares a run's trainable parameters with those of full fine-tuning
    of the same model in the selection; without such a run, with the model's total parameters."""
    import numpy as np
    import pandas as pd

    def column(name: str, numeric: bool = False):
        values = runs[name] if name in runs else pd.Series([np.nan] * len(runs), index=runs.index)
        return pd.to_numeric(values, errors="coerce") if numeric else values

    table = pd.DataFrame({
        "strategy": column(f"tags.{STRATEGY}"),
        "run": column("tags.mlflow.runName"),
        "run_id": runs["run_id"],
        "experiment_id": runs["experiment_id"],
        "trial": column(f"tags.{TRIAL}", numeric=True),
        "model": column("params.model"),
        "lora_r": column("params.lora_r", numeric=True),
        "lora_alpha": column("params.lora_alpha", numeric=True),
        "learning_rate": column("params.learning_rate", numeric=True),
        **{f"val_{m}": column(f"metrics.{metric_key('val', m, best=True)}") for m in METRICS},
        **{f"test_{m}": column(f"metrics.{metric_key('test', m)}") for m in METRICS},
        "trainable_params": column("params.trainable_params", numeric=True),
        "total_params": column("params.total_params", numeric=True),
        "train_seconds": column(f"metrics.{RUNTIME_S}"),
        "samples_per_s": column(f"metrics.{SAMPLES_PER_S}"),
        "peak_memory_mb": column(f"metrics.{PEAK_MEMORY_MB}"),
    })
    table["trainable_pct"] = 100 * table["trainable_params"] / table["total_params"]
    full = table[table["strategy"] == "full"].groupby("model")["trainable_params"].max()
    reference = table["model"].map(full).fillna(table["total_params"])
    table["reduction_vs_full_pct"] = 100 * (1 - table["trainable_params"] / reference)
    table["pareto"] = pareto_front(table["val_accuracy"], table["trainable_params"])
    table["champion"] = table["run_id"].isin(champions)
    # Runs before tuning trials, strategies in their registry's order; best validation first within each.
    order = {name: i for i, name in enumerate(STRATEGIES)}
    table["_order"] = table["strategy"].map(order) + len(order) * table["trial"].notna()
    table = table.sort_values(["_order", "val_accuracy"], ascending=[True, False], na_position="last")
    return table.drop(columns="_order").reset_index(drop=True)


LEGEND = ("`front`: P = on the Pareto front of validation accuracy against trainable parameters (no other run "
          "is at least as accurate with fewer); C = the registered model's champion.")


def markdown(table) -> str:
    """A GitHub table; pandas' to_markdown would need `tabulate` for this alone. `front`: on the
    accuracy/trainable-parameters Pareto front (P), the registered champion (C)."""
    import pandas as pd

    table = table.assign(marks=["".join(m for m, on in (("P", p), ("C", c)) if on)
                                for p, c in zip(table["pareto"], table["champion"], strict=True)])
    def cell(value, fmt: str) -> str:
        return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else fmt.format(value)

    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(row[col], fmt) for col, fmt in SHOWN.values()) + " |")
    lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


def _runs_for_bars(table):
    """The bar charts show the runs, not every tuning trial: with none but trials, the ten best."""
    runs = table[table["trial"].isna()]
    return runs if len(runs) else table.nlargest(10, "val_accuracy")


COLORS = {name: s.color for name, s in STRATEGIES.items()}


def _labels(rows) -> list[str]:
    """Run names, with a short run id where two runs share a name."""
    counts = rows["run"].value_counts()
    return [f"{name} ({run_id[:6]})" if counts[name] > 1 else name
            for name, run_id in zip(rows["run"], rows["run_id"], strict=True)]


def accuracy_chart(table):
    import numpy as np

    rows = _runs_for_bars(table)
    split = "test" if rows["test_accuracy"].notna().all() else "val"
    x = np.arange(len(rows))

    fig, ax = new_figure(max(6.0, 1.2 * len(rows) + 2), 4.5)
    for offset, metric, hatch in ((-0.2, "accuracy", ""), (0.2, "f1", "//")):
        values = rows[f"{split}_{metric}"].to_numpy(dtype=float)
        bars = ax.bar(x + offset, values, 0.4, label=metric if metric == "accuracy" else "F1", hatch=hatch,
                      color=[COLORS.get(s, "grey") for s in rows["strategy"]], edgecolor="black")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, _labels(rows), rotation=20, ha="right")
    low = np.nanmin(rows[[f"{split}_accuracy", f"{split}_f1"]].to_numpy(dtype=float))
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel(f"{split} score")
    ax.set_title(f"{split} accuracy and F1 by run (plain: accuracy, hatched: F1)")
    fig.tight_layout()
    return fig


def params_chart(table):

    rows = _runs_for_bars(table)

    fig, ax = new_figure(max(6.0, 1.2 * len(rows) + 2), 4.5)
    x = list(range(len(rows)))
    bars = ax.bar(x, rows["trainable_params"], color=[COLORS.get(s, "grey") for s in rows["strategy"]],
                  edgecolor="black")
    ax.set_xticks(x, _labels(rows), rotation=20, ha="right")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in rows["trainable_params"]], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("trainable parameters (log scale)")
    ax.set_title("trainable parameters by run")
    fig.tight_layout()
    return fig


def scatter_chart(table, metric: str = "accuracy"):
    """Validation metric against trainable parameters for every run and trial (validation: trials
    are never scored on test); the Pareto front joined by a line, the champion starred."""

    fig, ax = new_figure(7, 4.5)
    # Each strategy in its colour: runs with its marker, tuning trials as crosses.
    kinds = [(name, is_trial, "x" if is_trial else s.marker, s.color, f"{s.title} {'trial' if is_trial else 'run'}")
             for name, s in STRATEGIES.items() for is_trial in (False, True)]
    for strategy, is_trial, marker, color, label in kinds:
        part = table[(table["strategy"] == strategy) & (table["trial"].notna() == is_trial)]
        if len(part):
            ax.scatter(part["trainable_params"], part[f"val_{metric}"], marker=marker, color=color, label=label)
        for _, row in part.iterrows():
            if row["lora_r"] == row["lora_r"]:
                ax.annotate(f"r{row['lora_r']:.0f}", (row["trainable_params"], row[f"val_{metric}"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = table[table["pareto"]].sort_values("trainable_params")
    if len(front):
        ax.step(front["trainable_params"], front[f"val_{metric}"], where="post", color="black", linewidth=1,
                linestyle=":", label="Pareto front")
    champion = table[table["champion"]]
    if len(champion):
        ax.scatter(champion["trainable_params"], champion[f"val_{metric}"], marker="*", s=250, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="champion")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"validation {metric} (best epoch)")
    ax.set_title(f"validation {metric} against trainable parameters")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def check_output_dir(cc: CompareConfig) -> None:
    """The report goes into a folder of its own: anything else there (a `.env`, a venv, the MLflow
    store under `--output-dir .`) is refused unless --overwrite, and is never logged either way."""
    folder = Path(cc.output_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {cc.output_dir!r} is a file; name a folder")
    stray = sorted(p.name for p in folder.iterdir() if p.name not in FILES) if folder.is_dir() else []
    if stray and not cc.overwrite:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise ConfigError(f"--output-dir {cc.output_dir!r} holds other files ({shown}); name a new or empty folder, "
                          f"or pass --overwrite true to write compare's files beside them (they are never logged)")


def write_report(table, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text(markdown(table))
    table.to_csv(folder / "results.csv", index=False)
    for name, draw in (("accuracy_f1.png", accuracy_chart), ("trainable_params.png", params_chart),
                       ("metric_vs_params.png", scatter_chart)):
        draw(table).savefig(folder / name, dpi=120)
    return [folder / name for name in FILES]


def log_report(cc: CompareConfig, files: list[Path], table, experiment_id: str) -> str:
    """A `compare` run holding the report; it carries no `strategy` tag, so it is never compared itself."""
    import mlflow

    inside_project = bool(os.environ.get("MLFLOW_RUN_ID"))
    with mlflow.start_run(run_name=None if inside_project else "compare",
                          experiment_id=None if inside_project else experiment_id,
                          tags={"report": "compare"}) as run:
        existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params  # `mlflow run -P` logged some
        params = {**{f.name: getattr(cc, f.name) for f in dataclasses.fields(cc)}, "compared_runs": len(table)}
        mlflow.log_params({k: str(v) for k, v in params.items() if k not in existing})
        for path in files:  # the files it wrote, never the folder: it may hold other things
            mlflow.log_artifact(str(path), "compare")
        mlflow.log_table(table.drop(columns=["experiment_id"]), "compare/results.json")
        return run.info.run_id


