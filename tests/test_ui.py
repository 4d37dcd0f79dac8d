"""The MLflow UI in a real browser: demo-size `mlflow run . -e lora`, `-e full` and a 3-trial
`python -m src.tune` into one experiment of a real `mlflow server`, then headless Chromium checks
what a reader sees, one test per view, each with its screenshot (tests/ui.py).

`make ui-screenshots` runs this module with UI_SCREENSHOTS=docs/ui, rewriting the images that
docs/ui.md shows. Without chromium the module is skipped (`make install-services` installs it); in
CI (CI=true) a missing chromium fails instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import ui
from tests.conftest import BIN, ROOT, free_port, start_mlflow_server, stop_mlflow_server

# The three commands on 2 busy cores take 3-4 minutes; the checks about a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EXPERIMENT = "tiny-sentiment"
MODEL = "tiny-sentiment"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")  # session: set up before the session's tiny model, which `world` also needs
def chromium():
    """Checked before anything trains: skipped for a user without chromium, failed in CI."""
    reason = ui.missing()
    if reason and in_ci():
        pytest.fail(f"CI must run the UI checks: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: UI_SCREENSHOTS (docs/ui for `make ui-screenshots`), else a temp folder."""
    folder = os.environ.get("UI_SCREENSHOTS")
    return Path(folder).resolve() if folder else tmp_path_factory.mktemp("ui-screenshots")


@dataclass
class World:
    base: str
    experiment_id: str
    stderr: dict[str, str]  # command -> what it printed on stderr
    run_ids: dict[str, str]  # lora, full -> run id
    runs: list = field(default_factory=list)  # every run of the experiment

    def name(self, run_id: str) -> str:
        return next(r.info.run_name for r in self.runs if r.info.run_id == run_id)


@pytest.fixture(scope="module")
def world(chromium, distilbert_dir, data_files, tmp_path_factory) -> World:
    """The three commands as a user types them, against this module's own server (so the pages show
    this experiment and model only), each checked to have succeeded."""
    import mlflow

    folder = tmp_path_factory.mktemp("ui-server")
    port = free_port()
    server = start_mlflow_server(folder, port)
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env["MLFLOW_TRACKING_URI"] = base
    cwd = tmp_path_factory.mktemp("ui-cwd")
    data = {"model": distilbert_dir, "train_data": data_files[0], "test_data": data_files[1], "batch_size": 16}
    commands = {
        # the recipe of tests/test_end_to_end.py: a LoRA run that beats the majority class, so it is champion
        "lora": ("mlflow run", "lora", {**data, "epochs": 3, "learning_rate": "5e-3", "lora_r": 4,
                                        "registered_model_name": MODEL}),
        "full": ("mlflow run", "full", {**data, "epochs": 2, "learning_rate": "1e-3"}),
        "tune": ("tune", None, {**data, "epochs": 2, "n_trials": 3, "study_name": "ui",
                                "storage": f"sqlite:///{cwd}/optuna.db", "pruner": "none",
                                "learning_rate_range": "2e-3,8e-3", "experiment_name": EXPERIMENT,
                                "registered_model_name": MODEL}),
    }
    stderr, run_ids = {}, {}
    try:
        for key, (kind, entry, params) in commands.items():
            if kind == "mlflow run":
                args = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local",
                        "--experiment-name", EXPERIMENT]
                for k, v in params.items():
                    args += ["-P", f"{k}={v}"]
                where = cwd
            else:
                args = [sys.executable, "-m", "src.tune"]
                for k, v in params.items():
                    args += [f"--{k.replace('_', '-')}", str(v)]
                where = ROOT
            proc = subprocess.run(args, cwd=where, capture_output=True, text=True, env=env, timeout=900)
            assert proc.returncode == 0, f"{key}: {proc.stderr[-3000:]}"
            stderr[key] = proc.stderr
            found = re.search(r"=== Run \(ID '([0-9a-f]+)'\) succeeded ===", proc.stderr)
            if found:
                run_ids[key] = found.group(1)
        client = mlflow.MlflowClient(base)
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        runs = client.search_runs([experiment_id], max_results=100)
        yield World(base, experiment_id, stderr, run_ids, runs)
    finally:
        stop_mlflow_server(server)


@pytest.fixture(scope="module")
def browser(chromium):
    with ui.browser() as b:
        yield b


@pytest.fixture
def page(browser):
    with ui.fresh_page(browser) as p:
        yield p


def top_level(world: World) -> list[str]:
    return [r.info.run_name for r in world.runs if "mlflow.parentRunId" not in r.data.tags]


def test_1_printed_link_lands_on_the_runs_list(world, browser, shots, tmp_path):
    """Each command's `view in MLflow: <url>` opens the experiment's runs list for a new user, not MLflow 3's
    GenAI overview (where a plain experiment link lands)."""
    failures = []
    for key in world.stderr:  # lora's page is the one docs/ui.md shows
        shot = shots / "landing.png" if key == "lora" else tmp_path / f"landing-{key}.png"
        with ui.fresh_page(browser) as page:
            try:
                ui.check_link_lands_on_runs(page, ui.printed_link(world.stderr[key]), top_level(world), shot, key)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_2_every_run_row_has_a_model(world, page, shots):
    """The runs table's Models column names a model on every row: both runs, the study and each trial."""
    ui.check_runs_have_models(page, ui.runs_url(world.base, world.experiment_id),
                              [r.info.run_name for r in world.runs], shots / "runs.png")


def test_3_models_tab_lists_every_logged_model_with_its_held_out_metric(world, page, shots):
    """The experiment's Models tab: a logged model of each run with test/accuracy, of each completed trial
    with its validation metrics (val/...)."""
    expected = {}
    for r in world.runs:
        if r.data.tags.get("strategy") == "search":
            continue  # the study logs no model of its own: its row shows its winner's (test_2)
        if "optuna.trial" in r.data.tags:
            if r.data.tags.get("optuna.state") == "COMPLETE":
                expected[r.info.run_name] = "val/"
        else:
            expected[r.info.run_name] = "test/accuracy"
    ui.check_models_tab(page, ui.models_url(world.base, world.experiment_id), expected, shots / "models.png")


def test_4_compare_page_starts_with_result_metrics(world, page, shots):
    """Comparing the LoRA and the full run: the metric rows start with test/..., not system/* or best_epoch."""
    assert {"lora", "full"} <= set(world.run_ids), f"`mlflow run` printed no run id: {world.run_ids}"
    url = ui.compare_url(world.base, world.experiment_id, [world.run_ids["lora"], world.run_ids["full"]])
    ui.check_compare_starts_with_results(page, url, shots / "compare.png")


@pytest.mark.parametrize("key", ["lora", "tune"])
def test_5_registered_version_page_shows_its_decision(world, page, shots, tmp_path, key):
    """The version each command registered shows the gate's decision sentence as its description."""
    lines = [line.strip() for line in world.stderr[key].splitlines()
             if re.match(rf"{re.escape(MODEL)}: version \d+ is \w", line)]
    assert lines, f"{key} printed no '{MODEL}: version N is ...' decision line"
    sentence = lines[-1]
    version = re.match(rf"{re.escape(MODEL)}: version (\d+)", sentence).group(1)
    shot = shots / "version.png" if key == "lora" else tmp_path / "version.png"
    ui.check_version_description(page, ui.version_url(world.base, MODEL, version), version, sentence, shot)
