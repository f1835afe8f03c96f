"""Issue 19 defect 4: `difusi serve` on a port in use or with a bad --host says so in one line naming the address
and the cause, exits non-zero, and never announces an address it does not serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from difusi.server import main


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port another program is listening on, for the length of the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_port_in_use_is_one_line_and_nothing_announced(busy_port, models, tmp_path):
    # A real process, so uvicorn's own logging (multi-line "ERROR: [Errno 98]" before) would show up here too.
    command = [sys.executable, "-m", "difusi", "serve", "--port", str(busy_port), "--models-dir", str(models.folder),
               "--outputs-dir", str(tmp_path / "out"), "--model", str(models.default)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (f"difusi serve: cannot listen on 127.0.0.1:{busy_port}: the port is already in use "
                           f"(another server is listening on it); choose another with --port\n")


def test_unknown_host_is_one_line_exit_2(capsys, tmp_path):
    code = main(["--host", "no-such-host.invalid", "--port", "7999", "--outputs-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("difusi serve: cannot listen on no-such-host.invalid:7999: --host 'no-such-host.invalid' "
                          "is not a known address (")
    assert err.count("\n") == 1 and "serving" not in err


def test_address_of_another_machine_is_one_line_exit_2(capsys, tmp_path):
    code = main(["--host", "192.0.2.1", "--port", "7999", "--outputs-dir", str(tmp_path / "out")])  # TEST-NET-1
    assert code == 2
    assert capsys.readouterr().err == ("difusi serve: cannot listen on 192.0.2.1:7999: that address does not belong "
                                       "to this machine; check --host\n")


def test_bind_comes_before_the_model_is_loaded(busy_port, capsys, monkeypatch):
    """A busy port fails fast: no engine is built and no model is read."""
    import difusi.server.app as app_module
    import difusi.server.engine as engine_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the server was built before the port was bound")

    monkeypatch.setattr(app_module, "create_app", must_not_run)
    monkeypatch.setattr(engine_module, "Engine", must_not_run)
    assert main(["--port", str(busy_port)]) == 1
    assert "cannot listen on" in capsys.readouterr().err
