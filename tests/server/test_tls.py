"""TLS served by `opd serve` itself (uvicorn's ssl options, OPD_SSL_CERTFILE / OPD_SSL_KEYFILE),
and the client trusting a private CA through SSL_CERT_FILE, as docs/operations.md says."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from opd.client import TeacherClient
from opd.client.teacher.child_process import start_child, stop_child
from opd.client.teacher.launch import free_port
from opd.server.settings import Settings
from opd.shared.schemas import ScoreRequest


def _self_signed(folder) -> tuple[str, str]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_half_a_tls_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="OPD_SSL_CERTFILE and OPD_SSL_KEYFILE"):
        Settings(ssl_certfile="cert.pem")


def test_opd_serve_speaks_https_and_the_client_trusts_ssl_cert_file(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OPD_SSL_CERTFILE": cert,
        "OPD_SSL_KEYFILE": key,
        "OPD_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "opd.client.cli", "serve", "--port", str(port)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = start_child([*cmd, "--model", str(tiny_model_dir)], env=env, stdout=log, stderr=log)
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=cert)
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/readyz", verify=trusted, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the HTTPS server never became ready")
        with pytest.raises(httpx.TransportError):  # the port speaks TLS only
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            httpx.get(url + "/readyz", timeout=5)
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # httpx (and so opd's client) trusts it
        request = {"sequences": [{"token_ids": [1, 2, 3, 4], "score_from": 1}]}
        with TeacherClient(url) as client:
            result = client.score(ScoreRequest.model_validate(request))
        assert result.token_logprobs_N.shape == (3,)
    finally:
        stop_child(proc)
        log.close()
