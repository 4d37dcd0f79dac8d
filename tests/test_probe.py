"""The reachability probe speaks to a team server as MLflow's client does: TLS with the team's own
certificate (MLFLOW_TRACKING_SERVER_CERT_PATH) or MLFLOW_TRACKING_INSECURE_TLS, and token auth
(MLFLOW_TRACKING_TOKEN). The server here is the session's real `mlflow server` behind an HTTPS proxy
that wants a bearer token, as a team's gateway would."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
import urllib.error
import urllib.request

import mlflow
import pytest

from src.base.config import ConfigError
from src.mlflow_io.tracking import check_reachable

# Trains models, starts servers or processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

TOKEN = "team-token-123"


def gateway(upstream: str, cert, key):
    """An HTTPS server on 127.0.0.1 forwarding requests that carry the bearer token to `upstream`."""

    class Forward(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "")})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    status, payload = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                status, payload = exc.code, exc.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def https_server(mlflow_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = gateway(mlflow_server, cert, key)
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()


@pytest.fixture
def probe(https_server, monkeypatch):
    uri, cert = https_server
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield monkeypatch, cert
    mlflow.set_tracking_uri(previous)


def test_an_unknown_certificate_is_refused_in_one_line(probe):
    with pytest.raises(ConfigError, match=r"is not reachable \(TLS CERTIFICATE_VERIFY_FAILED; a private CA's "
                                          r"certificate goes in MLFLOW_TRACKING_SERVER_CERT_PATH"):
        check_reachable()


def test_the_teams_certificate_and_token_pass(probe):
    monkeypatch, cert = probe
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    with pytest.raises(ConfigError, match=r"refuses these credentials \(HTTP 401\); set MLFLOW_TRACKING_TOKEN"):
        check_reachable()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "wrong")
    with pytest.raises(ConfigError, match=r"HTTP 401"):
        check_reachable()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    check_reachable()  # no exception: reachable


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_tls_setting_is_honoured(probe):
    monkeypatch, _ = probe
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    check_reachable()
