"""`python -m src.serve` against hostile and odd requests: each gets one line and a 4xx status, never a
stack trace or a copy of the request, and the server keeps serving (a real server of a registered model,
two uvicorn workers, a 1 MiB body limit)."""

import http.client
import io
import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from src.mlflow_io.gate import register_gated
from tests.builders import answers_for, lookup_classifier, submit_logged
from tests.conftest import ROOT, free_port
from tests.test_model_safety import serve

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

GOOD = '{"inputs": {"text": ["great", "awful"]}}'
LIMIT_MB = 1


@pytest.fixture(scope="module")
def port(tracking, distilbert_dir, tmp_path_factory):
    model, tokenizer = lookup_classifier(distilbert_dir, answers_for())
    mlflow.set_experiment("serving-inputs")
    with mlflow.start_run(run_name="candidate"):
        register_gated(submit_logged(model, tokenizer, answers_for(), max_batch_size=4), "serving-inputs", 0.05)
    port = free_port()
    command = [sys.executable, "-m", "src.serve", "--model", "models:/serving-inputs@champion", "--port", str(port),
               "--workers", "2", "--max-body-mb", str(LIMIT_MB)]
    server = serve(command, port, tmp_path_factory.mktemp("serve") / "serve.log")
    yield port
    server.terminate()  # SIGTERM: src.serve stops its workers (tests/test_model_safety.py checks that)
    server.wait(timeout=60)


def request(port: int, body: bytes, content_type: str = "application/json", chunked: bool = False,
            method: str = "POST", path: str = "/invocations") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        if chunked:
            parts = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
            conn.request(method, path, body=parts, headers={"Content-Type": content_type}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers={"Content-Type": content_type})
    except OSError:
        pass  # a refused body may be answered and closed before it is all sent: the answer is still there
    response = conn.getresponse()
    try:
        return response.status, response.read().decode()
    finally:
        conn.close()


def parquet() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"text": ["great"]}).to_parquet(buffer)
    return buffer.getvalue()


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


OVERSIZE = b'{"inputs": {"text": ["' + b"a" * (3 << 20) + b'"]}}'
CASES = {  # name: (body, content type, chunked, status, a phrase of the one-line answer)
    "lone surrogate": (b'{"inputs": {"text": ["great", "\\ud800"]}}', "application/json", False, 400,
                       "half of a UTF-16 surrogate pair"),
    "bytes that are not UTF-8": (b'{"inputs": {"text": ["\xff"]}}', "application/json", False, 400,
                                 "not valid UTF-8 (byte 22"),
    "JSON nested 100,000 deep": (nested(100_000), "application/json", False, 400, "nested too deeply"),
    "JSON nested 20 deep": (nested(20), "application/json", False, 400, "nests more than 16 levels"),
    "JSON that is a list": (b'["great"]', "application/json", False, 400, "exactly one of the keys"),
    "JSON with two input keys": (b'{"inputs": ["a"], "instances": ["b"]}', "application/json", False, 400,
                                 "exactly one of the keys"),
    "a bad body of 0.9 MiB": (b"x" * 900_000, "application/json", False, 400, "not valid JSON"),
    "0.9 MiB of numbers": (b'{"inputs": {"text": [' + b",".join([b"1"] * 450_000) + b"]}}", "application/json",
                           False, 400, "takes at most 4"),
    "a number in a text": (b'{"inputs": {"text": [3]}}', "application/json", False, 400, "text 0 is int"),
    "body over the limit": (OVERSIZE, "application/json", False, 413, "takes at most 1 MiB"),
    "chunked body over the limit": (OVERSIZE, "application/json", True, 413, "takes at most 1 MiB"),
    "CSV without a text column": (b"review\ngreat\n", "text/csv", False, 400, "no text column (columns: 'review')"),
    "CSV with an empty text": (b'text\ngreat\n""\n', "text/csv", False, 400, "text 1 is empty"),
    "CSV with a short row": (b"id,text\n1,great\n2\n", "text/csv", False, 400, "CSV line 3 has no text field"),
    "CSV in Latin-1": ("text\ncaf\u00e9\n".encode("latin-1"), "text/csv", False, 400, "not valid UTF-8"),
    "CSV over the limit": (b"text\n" + b"great\n" * 200_000, "text/csv", False, 413, "takes at most 1 MiB"),
    "Parquet": (parquet(), "application/vnd.apache.parquet", False, 415, "send Content-Type: application/json"),
    "plain text": (b"great", "text/plain", False, 415, "'text/plain' is not accepted"),
    "JSON in UTF-16": (GOOD.encode("utf-16"), "application/json; charset=utf-16", False, 415,
                       "'application/json; charset=utf-16' is not accepted"),
    "no content type": (GOOD.encode(), "", False, 415, "'none' is not accepted"),
}


def alive(port: int) -> None:
    """The server still answers: /ping, and a good request with the right labels."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/ping")
    assert conn.getresponse().status == 200
    status, body = request(port, GOOD.encode())
    assert status == 200 and [r["label"] for r in json.loads(body)["predictions"]] == ["1", "0"], body


def one_line(body: str) -> str:
    answer = json.loads(body)
    assert set(answer) == {"error_code", "message"}, body[:500]
    message = answer["message"]
    assert "\n" not in message and len(message) <= 300, message
    assert "Traceback" not in body and "site-packages" not in body and "stack_trace" not in body
    return message


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_one_line_and_the_server_keeps_serving(name, port):
    body, content_type, chunked, expected, phrase = CASES[name]
    status, answer = request(port, body, content_type, chunked)
    assert status == expected, (name, answer[:500])
    assert phrase in one_line(answer), (name, answer[:500])
    assert len(answer) < 600  # never a copy of the request
    alive(port)


def test_csv_with_a_text_column_is_scored_like_json(port):
    body = b'id,text,note\n1,great,"a, b"\n2,"awful",\n'
    status, answer = request(port, body, "text/csv; charset=utf-8")
    assert status == 200, answer
    assert [r["label"] for r in json.loads(answer)["predictions"]] == ["1", "0"]
    status, answer = request(port, "\ufefftext\ngreat\n".encode(), "text/csv")  # a spreadsheet's byte order mark
    assert status == 200 and json.loads(answer)["predictions"][0]["label"] == "1", answer


def test_other_paths_answer_errors_in_one_line_too(port):
    for method, path, expected in (("GET", "/invocations", 405), ("GET", "/nowhere", 404)):
        status, answer = request(port, b"", method=method, path=path)
        assert status == expected and one_line(answer)
    status, answer = request(port, b"", method="GET", path="/version")
    assert status == 200


def test_body_limit_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "src.serve", "--model", "models:/x@champion", "--max-body-mb", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --max-body-mb must be a positive number"), proc.stderr
