"""Nothing a tracking server holds runs code here, and what is loaded is what was judged: a planted
pickle or code file is never loaded, a file changed in the artifact store after logging is refused by
the gate, predict and serve with one line naming it, and the served model answers malformed requests
with one line and HTTP 400."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from src.base.config import ConfigError
from src.mlflow_io import serving
from src.mlflow_io.gate import register_gated
from tests.builders import GATE_TEXTS, answers_for, lookup_classifier, submit_logged
from tests.conftest import BIN, ROOT, free_port, run_cli

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow


class Planted(mlflow.pyfunc.PythonModel):
    """Unpickling this model writes a file: proof that code from the store ran."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))

    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ARG002 - hinted: no MLflow advice
        return model_input


@pytest.fixture(scope="module")
def lookup(distilbert_dir):
    return lookup_classifier(distilbert_dir, answers_for())


def gate(lookup, name: str, max_batch_size: int = 0) -> dict:
    model, tokenizer = lookup
    with mlflow.start_run(run_name="candidate"):
        return register_gated(submit_logged(model, tokenizer, answers_for(), max_batch_size=max_batch_size), name,
                              0.05)


def plant(name: str, marker) -> str:
    Planted.marker = str(marker)
    with mlflow.start_run(run_name="planted"):
        info = mlflow.pyfunc.log_model(name="model", python_model=Planted(), registered_model_name=name)
    marker.unlink(missing_ok=True)  # logging may have loaded it once; what follows must not
    return str(info.registered_model_version)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[-1]


def test_a_planted_pickle_is_never_loaded(tracking, lookup, distilbert_dir, data_files, tmp_path):
    mlflow.set_experiment("planted-model")
    marker = tmp_path / "code-ran"
    legit = gate(lookup, "planted")["candidate_version"]
    planted = plant("planted", marker)
    # a planted version beside the champion: gating, predicting, serving the champion never touch it
    assert gate(lookup, "planted")["decision"] == "challenger"
    assert not marker.exists()
    # the planted version made champion behind the gate's back: every reader refuses it
    tracking.set_registered_model_alias("planted", "champion", planted)
    with pytest.raises(ConfigError, match="not a text classifier logged by this project"):
        gate(lookup, "planted")
    train = run_cli(["--strategy", "lora", "--model", str(distilbert_dir), "--train-data", str(data_files[0]),
                     "--test-data", str(data_files[1]), "--registered-model-name", "planted",
                     "--experiment-name", "planted-model", "--checkpoint-dir", ""])
    assert "not a text classifier logged by this project" in one_error_line(train)
    for module in ("src.predict", "src.serve"):
        args = ["--model", "models:/planted@champion"] + (["a fine film"] if module == "src.predict" else [])
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert "not a text classifier logged by this project" in one_error_line(proc)
    assert not marker.exists()
    runs = mlflow.search_runs(experiment_names=["planted-model"], filter_string="attributes.status = 'RUNNING'")
    assert len(runs) == 0
    tracking.set_registered_model_alias("planted", "champion", legit)


def post(port: int, body: bytes | str, content_type: str = "application/json") -> tuple[int, str]:
    data = body if isinstance(body, bytes) else body.encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


MALFORMED = [  # (request body, status, a phrase the one-line answer holds)
    ('{"inputs": {"text": ["a fine film", null]}}', 400, "text 1 is NoneType"),
    ('{"inputs": {"text": [3, 4]}}', 400, "text 0 is int"),
    ('{"dataframe_records": [{"text": [1]}]}', 400, "text 0 is int"),
    ('{"inputs": {"text": [["a", "b"], "c"]}}', 400, "text 0 is list"),
    ('{"dataframe_records": [{"text": {"an": "object"}}]}', 400, "text 0 is dict"),
    ('{"inputs": {"text": [""]}}', 400, "text 0 is empty"),
    ('{"inputs": {"text": []}}', 400, "holds no texts"),
    ('{"dataframe_records": []}', 400, ""),
    ('{"inputs": {"text": ["a", "b", "c", "d", "e"]}}', 400, "takes at most 4"),
    ("not json", 400, ""),
]


def serve(command: list[str], port: int, log_path, env=None) -> subprocess.Popen:
    log = open(log_path, "w")
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=env)
    log.close()
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            assert server.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)


@pytest.mark.parametrize("how", ["src.serve", "mlflow models serve"])
def test_served_champion_answers_malformed_requests_with_400(tracking, lookup, tmp_path, how):
    mlflow.set_experiment("served")
    name = "served-" + how.split()[0].replace(".", "-")
    gate(lookup, name, max_batch_size=4)
    marker = tmp_path / "code-ran"
    plant(name, marker)  # a newer planted version that is not the champion
    port = free_port()
    uri = f"models:/{name}@champion"
    command = ([sys.executable, "-m", "src.serve", "--model", uri, "--port", str(port)] if how == "src.serve" else
               [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1",
                "--port", str(port)])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = serve(command, port, tmp_path / "serve.log", env={**os.environ, "TMPDIR": str(scratch)})
    try:
        status, body = post(port, json.dumps({"inputs": {"text": [GATE_TEXTS[0], GATE_TEXTS[50]]}}))
        assert status == 200, body
        assert [r["label"] for r in json.loads(body)["predictions"]] == ["1", "0"]
        answers = [(request, *post(port, request)) for request, _, _ in MALFORMED]
    finally:
        # src.serve gets SIGTERM alone, as a service manager sends it: it must stop its own workers
        os.kill(server.pid, signal.SIGTERM) if how == "src.serve" else os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    if how == "src.serve":
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            listening = True  # a uvicorn worker outlived the command
        except OSError:
            listening = False
        assert not listening and not [p for p in scratch.iterdir() if p.name.startswith("serve-")]
    print("\n".join(f"{status} {request} -> {body[:300]}" for request, status, body in answers))
    for (request, expected, phrase), (_, status, body) in zip(MALFORMED, answers, strict=True):
        assert status == expected, (request, body)
        assert "Traceback" not in body and "stack_trace" not in body, (request, body)
        assert phrase in body, (request, body)
    assert not marker.exists()


def on_disk(server_folder, model_uri: str, path: str):
    """The file behind a stored model's artifact, where a writer of the artifact store can change it."""
    location = serving.resolve(model_uri).artifact_location
    return server_folder / "artifacts" / location.removeprefix("mlflow-artifacts:/") / path


def commands(uri: str) -> dict[str, list[str]]:
    return {"predict": [sys.executable, "-m", "src.predict", "--model", uri, "a fine film"],
            "serve": [sys.executable, "-m", "src.serve", "--model", uri, "--port", str(free_port())]}


def refused_everywhere(lookup, name: str, phrase: str, stdin: str = "") -> None:
    """The gate (judging a new candidate against this champion), predict and serve each refuse with one
    line holding `phrase`, before anything is loaded."""
    with pytest.raises(ConfigError, match=phrase):
        gate(lookup, name)
    for how, command in commands(f"models:/{name}@champion").items():
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, input=stdin)
        assert phrase in one_error_line(proc), (how, proc.stderr[-1500:])


@pytest.mark.parametrize("path", ["artifacts/weights/model.safetensors", "artifacts/classifier.json",
                                  "artifacts/weights/tokenizer.json"])
def test_a_file_changed_after_logging_is_refused(tracking, lookup, server_folder, models_ab, path):
    """The champion's weights swapped for another version's, its classifier.json or a tokenizer file
    changed in the artifact store: the digest recorded in the tracking store no longer matches."""
    mlflow.set_experiment("swapped")
    name = "swapped-" + Path(path).stem.replace(".", "-")
    champion = gate(lookup, name)["candidate_version"]
    other = gate(models_ab, name)["candidate_version"]  # a second version, whose files are also legit
    target = on_disk(server_folder, f"models:/{name}/{champion}", path)
    source = on_disk(server_folder, f"models:/{name}/{other}", path)
    original = target.read_bytes()
    if path.endswith("classifier.json"):
        target.write_text(target.read_text().replace('"temperature": 1.0', '"temperature": 9.0'))
    elif path.endswith("tokenizer.json"):  # both versions share the tokenizer: swap two words' ids instead
        vocab = json.loads(target.read_text())
        words = vocab["model"]["vocab"]
        words["great"], words["awful"] = words["awful"], words["great"]
        target.write_text(json.dumps(vocab))
    else:
        target.write_bytes(source.read_bytes())
    assert target.read_bytes() != original
    try:
        refused_everywhere(lookup, name, f"file {path} is not the one recorded when the model was logged")
    finally:
        target.write_bytes(original)
    assert serving.load(f"models:/{name}@champion").labels == ["0", "1"]  # restored: loads again


@pytest.fixture(scope="module")
def models_ab(distilbert_dir):
    return lookup_classifier(distilbert_dir, answers_for((0,)))


def test_planted_code_is_never_run(tracking, lookup, server_folder, tmp_path):
    """A stored model made to carry code: a `.py` file listed among its files, or an `auto_map` in its
    config.json (its digests recorded to match, as a writer of both stores could). The gate, predict
    and serve refuse it with one line, answering `y` on stdin changes nothing, the code never runs."""
    mlflow.set_experiment("planted-code")
    marker = tmp_path / "code-ran"
    for how in ("listed .py", "auto_map"):
        name = "planted-code-" + how.split()[-1].replace(".", "").replace("_", "-")
        version = gate(lookup, name)["candidate_version"]
        stored = serving.resolve(f"models:/{name}/{version}")
        weights = on_disk(server_folder, f"models:/{name}/{version}", "artifacts/weights")
        (weights / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        files = dict(stored.files)
        if how == "listed .py":
            files["artifacts/weights/evil.py"] = serving.file_digest(weights / "evil.py")
        else:
            config = json.loads((weights / "config.json").read_text())
            config["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model", "AutoConfig": "evil.Config"}
            (weights / "config.json").write_text(json.dumps(config))
            files["artifacts/weights/config.json"] = serving.file_digest(weights / "config.json")
        tracking.set_logged_model_tags(stored.model_id, {serving.MANIFEST_TAG: json.dumps(files)})
        tracking.delete_model_version_tag(name, version, "files.sha256")  # a writer of the store could
        phrase = "lists files a classifier of this project never holds" if how == "listed .py" else "holds code"
        refused_everywhere(lookup, name, phrase, stdin="y\ny\n")
        assert not marker.exists()
    # a local model folder with code in it is refused the same way, before transformers reads it
    local = tmp_path / "local"
    mlflow.artifacts.download_artifacts(f"models:/{stored.model_id}", dst_path=str(local))
    proc = subprocess.run(commands(str(local))["predict"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          input="y\n")
    assert "holds code" in one_error_line(proc) and not marker.exists()
