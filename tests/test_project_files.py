"""MLproject, CLI, generated docs and config stay in step: one name per setting, stated once."""

import dataclasses
import shlex
import subprocess
import sys

import pytest
import yaml

from src.base.config import DEFAULT_LEARNING_RATE, CompareConfig, TuneConfig, all_fields
from src.base.strategies import STRATEGIES
from src.cli import normalize_argv, option_name
from src.compare import compare
from src.train import train
from src.tune import NOT_IN_PROJECT, SEARCHED, TUNE_DEFAULTS, tune
from tests.conftest import ROOT

SETTINGS = {f.name: f for f in all_fields()}
TUNE = {f.name: f for f in dataclasses.fields(TuneConfig)}
COMPARE = {f.name: f for f in dataclasses.fields(CompareConfig)}
# entry point -> (module, its click command, the strategy it fixes)
# Every strategy has an entry point of its own name (strategies.py), besides main, tune and compare.
ENTRY_POINTS = {"main": ("src.train", train, "lora"), **{name: ("src.train", train, name) for name in STRATEGIES},
                "tune": ("src.tune", tune, None), "compare": ("src.compare", compare, None)}


def entry_points():
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def test_mlproject_restates_no_setting():
    """Settings, defaults and checks live in config.py; MLflow passes every -P on as `--name value`."""
    eps = entry_points()
    assert set(eps) == set(ENTRY_POINTS)
    for ep, spec in eps.items():
        assert not spec.get("parameters"), f"{ep} declares parameters: pass them through instead"
        assert "{" not in spec["command"], ep
        flags = [a.lstrip("-").replace("-", "_") for a in shlex.split(spec["command"]) if a.startswith("--")]
        assert set(flags) <= {"strategy"}, (ep, flags)


@pytest.mark.parametrize("ep", ENTRY_POINTS)
def test_entry_point_passes_every_setting_to_its_command(ep):
    """The command MLflow builds (its own code) parses as the right click command and strategy, with
    user values intact: spaces, quotes, shell characters, booleans."""
    from mlflow.projects import _project_spec

    module, command, strategy = ENTRY_POINTS[ep]
    given = {"compare": {"experiment_name": "a b,'c'", "overwrite": "true"},
             "tune": {"n_trials": "3", "evaluate_test": "false", "run_name": "it's \"x\"; echo no"}}.get(
        ep, {"lora_r": "4", "temperature_scaling": "true", "run_name": "it's \"x\"; echo no"})
    line = _project_spec.load_project(ROOT).get_entry_point(ep).compute_command(given, None)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", module], line
    params = command.make_context(module, normalize_argv(argv[3:])).params
    if strategy:
        assert params["strategy"] == strategy
        assert params["learning_rate"] is None  # the strategy's default, from config.py alone
        assert params["lora_r"] == 4 and params["temperature_scaling"] is True
    for name, value in given.items():
        assert str(params[name]).lower() == value.lower(), name


@pytest.mark.slow
def test_project_run_logs_the_resolved_settings(tracking, distilbert_dir, data_files, tmp_path):
    """MLflow logs only the -P values given; the command logs the rest as it resolved them: the
    strategy's learning rate from config.py, the dataset as the file used (no default `imdb`)."""
    from tests.test_end_to_end import mlflow_run

    params = {"model": distilbert_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 1,
              "max_train_samples": 32, "max_test_samples": 16, "checkpoint_dir": ""}
    proc = mlflow_run("full", params, "pass-through", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = tracking.search_runs([tracking.get_experiment_by_name("pass-through").experiment_id])
    logged = run.data.params
    assert run.info.status == "FINISHED" and logged["strategy"] == "full" and "lora_r" not in logged
    assert float(logged["learning_rate"]) == DEFAULT_LEARNING_RATE["full"]
    assert logged["dataset"] == "train.parquet" and logged["train_size"] == "32"


@pytest.mark.slow
def test_the_head_strategy_runs_as_an_entry_point(tracking, distilbert_dir, data_files, tmp_path):
    """`-e head`, the linear probe: only the classification head trains; the run's logged model holds
    the head's tensors and names its base, and loads through the checked loader to the run's accuracy."""
    import pandas as pd

    from src.mlflow_io import serving
    from tests.test_end_to_end import mlflow_run

    params = {"model": distilbert_dir, "train_data": data_files[0], "test_data": data_files[1], "epochs": 1,
              "checkpoint_dir": ""}
    proc = mlflow_run("head", params, "head-probe", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = tracking.search_runs([tracking.get_experiment_by_name("head-probe").experiment_id])
    logged = run.data.params
    assert run.data.tags["strategy"] == "head" and float(logged["learning_rate"]) == DEFAULT_LEARNING_RATE["head"]
    assert int(logged["trainable_params"]) == (32 * 32 + 32) + (32 * 2 + 2)  # pre_classifier + classifier
    assert run.data.tags["mlflow.note.content"].startswith("Classification head only: test acc")
    (output,) = run.outputs.model_outputs
    stored = serving.resolve(f"models:/{output.model_id}")
    assert "artifacts/weights/head.safetensors" in stored.files
    assert not [f for f in stored.files if f.endswith("model.safetensors")]  # the base is named, not copied
    test = pd.read_parquet(data_files[1])
    labels = serving.load(f"runs:/{run.info.run_id}/model").classify(test["text"].tolist())["label"]
    assert (labels.astype(int) == test["label"]).mean() == pytest.approx(run.data.metrics["test/accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("ep, given, reason", [
    ("lora", {"lora_rr": 4}, "No such option '--lora-rr'"),
    *[("tune", {name: "sqlite:///never.db"}, f"-P {name} is refused") for name in NOT_IN_PROJECT],
])
def test_refused_project_parameter_fails_the_run_with_one_line(ep, given, reason, tracking, tmp_path):
    from tests.test_end_to_end import mlflow_run

    proc = mlflow_run(ep, given, f"refused-{ep}", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and reason in errors[0], proc.stderr[-2000:]
    [run] = tracking.search_runs([tracking.get_experiment_by_name(f"refused-{ep}").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["mlflow.note.content"] == errors[0]
    assert not list(tmp_path.iterdir())  # no storage, no checkpoint folder, no store


def test_cli_options_equal_config_fields():
    opts = {p.name: p for p in train.params}
    assert set(opts) == set(SETTINGS)
    for name, f in SETTINGS.items():
        assert option_name(name) in opts[name].opts
        assert opts[name].default == f.default
    tune_opts = {p.name: p for p in tune.params}
    assert set(tune_opts) == (set(SETTINGS) - set(SEARCHED)) | set(TUNE)
    for name, f in {**SETTINGS, **TUNE}.items():
        if name in tune_opts:
            assert option_name(name) in tune_opts[name].opts
            assert tune_opts[name].default == TUNE_DEFAULTS.get(name, f.default)
    compare_opts = {p.name: p for p in compare.params}
    assert set(compare_opts) == set(COMPARE)
    for name, f in COMPARE.items():
        assert option_name(name) in compare_opts[name].opts and compare_opts[name].default == f.default


def test_options_reference_is_generated_from_config():
    from src.options import PATH, render

    text = render()
    for name in [*SETTINGS, *TUNE, *COMPARE]:
        assert f"| `{name}` |" in text, name
    assert all(f"{lr:g}" in SETTINGS["learning_rate"].metadata["help"] for lr in DEFAULT_LEARNING_RATE.values())
    assert PATH.exists() and PATH.read_text() == text, (
        "docs/options.md is stale: regenerate it with `make docs` (or `python -m src.options`)")


def test_readme_first_screen_runs_the_main_job_and_the_tests():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme.splitlines()[:25]
    for command in ("make demo", "make lora", "make test"):
        assert any(line.startswith(command + " ") for line in first_screen), command
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert len(readme.splitlines()) < 170  # a two-minute read; details live in docs/


def test_settings_are_documented_once_in_the_generated_reference():
    """README and docs/*.md point to docs/options.md instead of restating a setting's row; every
    document they link to exists."""
    import re

    pages = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                                        ROOT / "benchmarks" / "README.md"] if p.name != "options.md"}
    for path, text in pages.items():
        rows = [name for name in {*SETTINGS, *TUNE, *COMPARE} if f"| `{name}` |" in text]
        assert not rows, (path, rows)
        for link in re.findall(r"\]\(([^)#]+\.md)", text):
            assert (path.parent / link).exists(), (path, link)
    assert "docs/options.md" in pages[ROOT / "README.md"]


def test_help_is_instant_and_light():
    for module in ("src.train", "src.tune", "src.compare", "src.predict"):
        code = ("import sys, runpy; sys.argv=['x','--help']\n"
                f"try: runpy.run_module('{module}', run_name='__main__')\n"
                "except SystemExit: pass\n"
                "print(sorted(m for m in ('torch','transformers','mlflow','peft','optuna') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith(f"Usage: python -m {module}"), out.stdout[:300] + out.stderr[-1000:]
        assert "--n-trials" in out.stdout or module != "src.tune"
        assert out.stdout.strip().endswith("[]"), out.stdout[-500:]
    code = ("import sys, src.options\n"
            "print(sorted(m for m in ('torch','transformers','mlflow','peft','optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout[-500:] + out.stderr[-1000:]  # `make docs` needs no torch


def test_requirements_pin_the_tested_stack():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0"
    for pkg in ("transformers", "peft", "mlflow", "optuna", "datasets", "scikit-learn", "accelerate", "click"):
        assert pkg in pins
    assert yaml.safe_load((ROOT / "python_env.yaml").read_text())["python"] == "3.11.7"


def test_readme_and_make_runs_land_where_compare_reads():
    """`mlflow run` ignores `-P experiment_name`: the README's lines and the Makefile choose it."""
    readme = (ROOT / "README.md").read_text()
    # lines with $VARIABLES record measured runs as they were typed; the others are for copying
    runs = [line for line in readme.splitlines() if line.startswith("mlflow run . -e ") and "$" not in line]
    assert runs
    for line in runs:
        assert "--env-manager local" in line, line
        if " -e compare " not in line:
            assert "--experiment-name imdb-" in line, line
    trains = [line for line in runs if " -e lora " in line or " -e full " in line]
    assert all(f"--experiment-name {CompareConfig().experiment_name} " in line for line in (t + " " for t in trains))
    assert f"MLFLOW_EXPERIMENT_NAME ?= {CompareConfig().experiment_name}" in (ROOT / "Makefile").read_text()


def test_conda_and_python_envs_are_the_same_environment():
    """MLflow runs the project from python_env.yaml; conda.yaml, for conda users, must say the same:
    read both as MLflow reads them (its virtualenv and uv managers also read a conda file so)."""
    from mlflow.utils.environment import _PythonEnv

    conda = _PythonEnv.from_conda_yaml(str(ROOT / "conda.yaml")).to_dict()
    assert conda == _PythonEnv.from_yaml(str(ROOT / "python_env.yaml")).to_dict()
    assert yaml.safe_load((ROOT / "MLproject").read_text())["python_env"] == "python_env.yaml"


def test_a_cpu_only_machine_can_take_torch_from_another_index(tmp_path):
    """`make install TORCH_INDEX=...` sends pip there for torch alone; without it, pip's default index."""
    def planned(*extra: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path}/venv", f"{tmp_path}/venv/.installed", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [ln for ln in out.stdout.splitlines() if "install -q torch==" in ln]

    [cpu] = planned("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert cpu.endswith("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    [default] = planned()
    assert default.rstrip().endswith("torch==2.13.0")
