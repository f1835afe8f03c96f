"""`difusi serve`: option parsing and a real process answering on the chosen port."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import httpx
import pytest

from difusi.server import DEFAULT_HOST, DEFAULT_PORT, bind_address, build_parser, main
from difusi.server.app import parse_auth
from loopback import free_port


def test_defaults_and_listen():
    args = build_parser().parse_args([])
    assert (bind_address(args), args.port, args.queue_size, args.api_auth) == (DEFAULT_HOST, DEFAULT_PORT, 32, None)
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 7860)
    assert bind_address(build_parser().parse_args(["--listen"])) == "0.0.0.0"
    assert bind_address(build_parser().parse_args(["--listen", "--host", "::1"])) == "::1"


def test_api_auth_parsing():
    assert parse_auth("alice:pw,bob:a:b") == {"alice": "pw", "bob": "a:b"}
    assert parse_auth(None) is None
    for bad in ("alice", ":pw", "alice:pw,,"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)


@pytest.mark.parametrize("argv", [["--port", "0"], ["--queue-size", "0"], ["--api-auth", "nocolon"]])
def test_bad_options_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert "difusi serve:" in capsys.readouterr().err


def test_difusi_serve_process_serves_api_and_ui(models, tmp_path):
    port = free_port()
    command = [sys.executable, "-c", "import sys; from difusi.cli import main; sys.exit(main())", "serve",
               "--port", str(port), "--models-dir", str(models.folder), "--outputs-dir", str(tmp_path / "out"),
               "--model", str(models.default), "--api-auth", "user:pass"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                response = httpx.get(url + "/sdapi/v1/progress", auth=("user", "pass"), timeout=5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"difusi serve did not come up: {process.communicate()[0][-2000:]}")
                time.sleep(0.3)
        assert response.status_code == 200 and response.json()["state"]["job_count"] == 0
        assert httpx.get(url + "/sdapi/v1/progress").status_code == 401
        token = base64.b64encode(b"user:pass").decode()
        page = httpx.get(url + "/", headers={"Authorization": f"Basic {token}"})
        assert page.status_code == 200 and "<title>difusi</title>" in page.text
        options = httpx.get(url + "/sdapi/v1/options", auth=("user", "pass")).json()
        assert options["sd_model_checkpoint"].startswith(models.default.stem)
    finally:
        process.terminate()
        process.wait(20)
