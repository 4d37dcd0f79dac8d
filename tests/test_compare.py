"""The compare report and the notebook, from runs tracked on a real `mlflow server`."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from src.base.config import RunConfig
from src.flows.finetune import finetune
from src.flows.report import pareto_front
from tests.conftest import ROOT, artifact_paths, mlflow_run

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

CHARTS = ("accuracy_f1.png", "trainable_params.png", "metric_vs_params.png")
EXPERIMENT = "compare-src"


@pytest.fixture(scope="module")
def three_runs(tracking, distilbert_dir, data_files):
    """A full run, two LoRA runs of different rank and a linear probe, as the report's input."""
    ids = {}
    for key, over in (("full", {"strategy": "full", "learning_rate": 1e-3}), ("r4", {"lora_r": 4}),
                      ("r8", {"lora_r": 8}), ("head", {"strategy": "head"})):
        cfg = RunConfig.from_flat({"model": str(distilbert_dir), "train_data": str(data_files[0]),
                                   "test_data": str(data_files[1]), "epochs": 1, "batch_size": 16,
                                   "learning_rate": 5e-3, "checkpoint_dir": "", "experiment_name": EXPERIMENT,
                                   **over})
        ids[key] = finetune(cfg).run_id
    return ids


def compare_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "src.compare", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def compare_runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.report = 'compare'")


def test_compare_table_holds_the_tracked_numbers(tracking, three_runs, tmp_path):
    out = tmp_path / "report"
    proc = compare_cli("--experiment-name", EXPERIMENT, "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["run_id"]) == sorted(three_runs.values())
    assert list(table["strategy"]) == ["full", "lora", "lora", "head"]
    full_trainable = int(tracking.get_run(three_runs["full"]).data.params["trainable_params"])
    for row in table.itertuples():
        run = tracking.get_run(row.run_id)
        m, p = run.data.metrics, run.data.params
        for metric in ("accuracy", "f1", "precision", "recall"):
            assert getattr(row, f"val_{metric}") == pytest.approx(m[f"val/best_{metric}"])
            assert getattr(row, f"test_{metric}") == pytest.approx(m[f"test/{metric}"])
        assert row.trainable_params == int(p["trainable_params"]) and row.total_params == int(p["total_params"])
        assert row.trainable_pct == pytest.approx(100 * int(p["trainable_params"]) / int(p["total_params"]))
        assert row.reduction_vs_full_pct == pytest.approx(100 * (1 - int(p["trainable_params"]) / full_trainable))
        assert row.samples_per_s == pytest.approx(m["train/samples_per_s"])
        assert row.train_seconds == pytest.approx(m["train/runtime_s"])
        assert row.run == run.info.run_name
    lora = table[table["strategy"] == "lora"]
    # a tiny model: its adapters weigh more than a real model's
    assert sorted(lora["lora_r"]) == [4, 8] and (lora["reduction_vs_full_pct"] > 80).all()
    assert table.loc[0, "reduction_vs_full_pct"] == 0

    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| strategy | run | front | val accuracy") and len([ln for ln in md if ln[:1] == "|"]) == 6
    head = table[table["strategy"] == "head"].iloc[0]
    assert head["pareto"] and head["trainable_params"] == table["trainable_params"].min()  # nothing is smaller
    assert md[-1].startswith("`front`: P = on the Pareto front")
    # the smallest of the most accurate runs is on it; a run that another matches in accuracy with
    # fewer parameters is not (the rule itself: test_pareto_front_known_answer)
    best = table[table["val_accuracy"] == table["val_accuracy"].max()]
    assert table.loc[best["trainable_params"].idxmin(), "pareto"]
    assert not best.drop(index=best["trainable_params"].idxmin())["pareto"].any()
    assert not table["champion"].any()  # no registered imdb-sentiment on this server
    for row in table.itertuples():
        line = next(ln for ln in md if f"| {row.run} |" in ln)
        assert f"{row.test_accuracy:.4f}" in line and f"{row.trainable_params:,}" in line
    for chart in CHARTS:
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart

    # logged as a `compare` run holding the same files; never compared itself
    [report] = compare_runs(tracking, EXPERIMENT)
    assert report.info.status == "FINISHED" and report.info.run_name == "compare"
    assert report.data.params["compared_runs"] == "4" and "strategy" not in report.data.tags
    files = set(artifact_paths(tracking, report.info.run_id, "compare"))
    assert {f"compare/{f}" for f in ("results.md", "results.csv", "results.json", *CHARTS)} <= files
    again = compare_cli("--experiment-name", EXPERIMENT, "--output-dir", str(tmp_path / "again"))
    assert again.returncode == 0 and len(pd.read_csv(tmp_path / "again" / "results.csv")) == 4


def test_selection_by_run_ids_and_by_filter(tracking, three_runs, tmp_path):
    picked = compare_cli("--run-ids", f"{three_runs['full']},{three_runs['r8']}", "--output-dir", str(tmp_path / "a"))
    assert picked.returncode == 0, picked.stderr[-2000:]
    assert sorted(pd.read_csv(tmp_path / "a" / "results.csv")["run_id"]) == sorted(
        [three_runs["full"], three_runs["r8"]])
    filtered = compare_cli("--experiment-name", EXPERIMENT, "--filter-string", "params.lora_r = '4'",
                           "--output-dir", str(tmp_path / "b"))
    assert filtered.returncode == 0, filtered.stderr[-2000:]
    assert list(pd.read_csv(tmp_path / "b" / "results.csv")["run_id"]) == [three_runs["r4"]]


@pytest.mark.parametrize("args, message", [
    (["--experiment-name", "no-such-experiment"], "experiment 'no-such-experiment' does not exist"),
    (["--experiment-name", EXPERIMENT, "--filter-string", "params.lora_r = '99'"], "no finished training runs"),
    (["--experiment-name", EXPERIMENT, "--filter-string", "params.lora_r ~~ 4"], "is not a valid MLflow filter"),
    (["--run-ids", "0" * 32], f"run {'0' * 32} does not exist"),
    (["--run-ids", "abc"], "--run-ids must be MLflow run ids"),
    (["--experiment-name", "compare-deleted"], "experiment 'compare-deleted' is deleted"),
    (["--experiment-name", EXPERIMENT, "--output-dir", "{file}"], "is a file; name a folder"),
])
def test_bad_selection_is_one_clear_error(tracking, three_runs, tmp_path, args, message):
    if "compare-deleted" in args and tracking.get_experiment_by_name("compare-deleted") is None:
        tracking.delete_experiment(tracking.create_experiment("compare-deleted"))
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "a-file")) for a in args]
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "out")]
    before = len(compare_runs(tracking, EXPERIMENT))
    proc = compare_cli(*args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and len(compare_runs(tracking, EXPERIMENT)) == before


def test_output_dir_holding_other_files_is_refused_and_they_are_never_logged(tracking, three_runs, tmp_path):
    from src.flows.report import FILES

    out = tmp_path / "report"
    out.mkdir()
    (out / ".env").write_text("API_TOKEN=not-for-mlflow\n")
    before = {r.info.run_id for r in compare_runs(tracking, EXPERIMENT)}
    refused = compare_cli("--experiment-name", EXPERIMENT, "--output-dir", str(out))
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert refused.returncode == 2 and lines[-1].startswith("error: "), refused.stderr[-2000:]
    assert "holds other files (.env)" in lines[-1] and "--overwrite true" in lines[-1]
    assert [p.name for p in out.iterdir()] == [".env"] and {r.info.run_id for r in compare_runs(
        tracking, EXPERIMENT)} == before
    written = compare_cli("--experiment-name", EXPERIMENT, "--output-dir", str(out), "--overwrite", "true")
    assert written.returncode == 0, written.stderr[-2000:]
    [run] = [r for r in compare_runs(tracking, EXPERIMENT) if r.info.run_id not in before]
    assert sorted(artifact_paths(tracking, run.info.run_id)) == sorted(
        [f"compare/{f}" for f in FILES] + ["compare/results.json"])
    assert (out / ".env").read_text() == "API_TOKEN=not-for-mlflow\n"
    # a folder holding only an earlier report is compare's own: the rerun refreshes it
    (out / ".env").unlink()
    again = compare_cli("--experiment-name", EXPERIMENT, "--output-dir", str(out))
    assert again.returncode == 0, again.stderr[-2000:]


def test_compare_entry_point_of_the_project(tracking, three_runs, tmp_path):
    proc = mlflow_run("compare", {"experiment_name": EXPERIMENT, "output_dir": tmp_path / "out"}, "compare-project",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = tracking.search_runs([tracking.get_experiment_by_name("compare-project").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["compared_runs"] == "4"
    assert "compare/metric_vs_params.png" in artifact_paths(tracking, run.info.run_id, "compare")
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 4


def test_notebook_executes_against_the_tracked_runs(tracking, three_runs, tmp_path, monkeypatch):
    """Run by a real Jupyter kernel, top to bottom, so it can never rot; stored without outputs."""
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "compare_runs.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("EXPERIMENTS", EXPERIMENT)
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "nb"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the notebook imports src.compare; the kernel runs in tmp_path
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the three charts, drawn inline
    table = pd.read_csv(tmp_path / "nb" / "table.csv").set_index("run_id")
    assert sorted(table.index) == sorted(three_runs.values())
    for run_id, row in table.iterrows():
        run = tracking.get_run(run_id)
        assert row["test_accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
        assert row["trainable_params"] == int(run.data.params["trainable_params"])
    assert all((tmp_path / "nb" / chart).stat().st_size > 0 for chart in CHARTS)


def test_pareto_front_known_answer():
    quality = [0.90, 0.90, 0.85, 0.95, 0.80, float("nan"), 0.95]
    cost = [100, 50, 10, 1000, 10, 1, 1000]
    # 0: as good as 1 and dearer; 4: as cheap as 2 and worse; 5: no quality; 3 and 6 tie, neither beats the other
    assert list(pareto_front(quality, cost)) == [False, True, True, True, False, False, True]
