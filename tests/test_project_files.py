"""MLproject, CLI, README and config stay in step: one name per setting everywhere."""

import dataclasses
import re
import subprocess
import sys

import yaml

from src.cli import option_name
from src.compare import compare
from src.config import DEFAULT_LEARNING_RATE, CompareConfig, LoraConfig, TuneConfig, all_fields
from src.train import train
from src.tune import NOT_IN_PROJECT, SEARCHED, TUNE_DEFAULTS, tune
from tests.conftest import ROOT

LORA = {f.name for f in dataclasses.fields(LoraConfig)}
SETTINGS = {f.name: f for f in all_fields()}
TUNE = {f.name: f for f in dataclasses.fields(TuneConfig)}
COMPARE = {f.name: f for f in dataclasses.fields(CompareConfig)}


def entry_points():
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def test_mlproject_parameters_equal_config_fields():
    eps = entry_points()
    assert set(eps) == {"full", "lora", "main", "tune", "compare"}
    assert set(eps["full"]["parameters"]) == set(SETTINGS) - LORA - {"strategy"}
    assert set(eps["lora"]["parameters"]) == set(SETTINGS) - {"strategy"}
    assert eps["main"] == eps["lora"]
    # a storage URL may hold a password, and `mlflow run` logs every parameter: it comes from OPTUNA_STORAGE
    assert set(eps["tune"]["parameters"]) == (set(SETTINGS) - set(SEARCHED)) | (set(TUNE) - set(NOT_IN_PROJECT))
    assert "storage" in NOT_IN_PROJECT
    assert set(eps["compare"]["parameters"]) == set(COMPARE)


def test_mlproject_defaults_equal_config_defaults():
    for ep, strategy in (("full", "full"), ("lora", "lora"), ("tune", "lora"), ("compare", "")):
        params = entry_points()[ep]["parameters"]
        for name, spec in params.items():
            field = COMPARE[name] if ep == "compare" else SETTINGS.get(name) or TUNE[name]
            expected = field.default
            if name == "learning_rate":
                expected = DEFAULT_LEARNING_RATE[strategy]
            if ep == "tune":
                expected = TUNE_DEFAULTS.get(name, expected)
            if isinstance(expected, bool):
                assert str(spec["default"]).lower() == str(expected).lower(), (ep, name)
                continue
            assert type(expected)(spec["default"]) == expected, (ep, name)
            assert spec["type"] == ("string" if isinstance(expected, str) else "float"), (ep, name)


def test_mlproject_commands_pass_every_parameter_to_the_cli():
    for ep, spec in entry_points().items():
        flags = re.findall(r"--(\w+) \{(\w+)\}", spec["command"])
        assert all(a == b for a, b in flags)
        assert {a for a, _ in flags} == set(spec["parameters"]), ep
        if ep not in ("tune", "compare"):
            assert f"--strategy {'lora' if ep == 'main' else ep}" in spec["command"]


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


def test_readme_documents_every_setting_and_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:15])
    assert "make lora" in first_screen and "make test" in first_screen
    for name in [*SETTINGS, *TUNE, *COMPARE]:
        assert f"| `{name}` |" in readme, name
    assert "make test" in (ROOT / ".ci" / "run").read_text()


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
