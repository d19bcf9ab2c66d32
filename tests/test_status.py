"""`partita status`: each device of a cluster file up, down or emulated, with what its worker reports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from partita.cli import main, partita_version
from partita.runtime.keys import new_keypair

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory):
    """One running worker (a), one address where nothing listens (b), one device without an address (c)."""
    root = tmp_path_factory.mktemp("status")
    keys = root / "keys"
    new_keypair(keys, "coordinator")
    _, secret = new_keypair(keys, "a")
    new_keypair(keys, "b")
    ready = root / "a.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "partita.commands.worker", "--listen", "tcp://127.0.0.1:0", "--name", "a",
         "--secret-key", str(secret), "--authorized-keys", str(keys / "coordinator.key"),
         "--device", "cpu", "--threads", "1", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        address = json.loads(ready.read_text())["control"]
        path = root / "cluster.yaml"
        path.write_text(
            "source: client\ndevices:\n"
            f"  - {{name: a, compute: 1GFLOPS, memory: 1GiB, address: '{address}', public_key: keys/a.key}}\n"
            f"  - {{name: b, compute: 1GFLOPS, memory: 1GiB, address: 'tcp://127.0.0.1:{free_port()}', "
            "public_key: keys/b.key}\n"
            "  - {name: c, compute: 1GFLOPS, memory: 1GiB}\n"
            "links: {default: {bandwidth: 100MB/s, latency: 1ms}}\n"
        )
        yield path, keys / "coordinator.key_secret"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_status_reports_each_device_up_down_or_emulated_and_exits_1_when_one_is_down(cluster_file, capsys):
    path, secret = cluster_file
    with pytest.raises(SystemExit) as info:
        main(["status", str(path), "--secret-key", str(secret), "--timeout", "0.5", "--json"])
    assert info.value.code == 1  # b is down
    devices = json.loads(capsys.readouterr().out)
    assert devices["a"]["state"] == "up"
    assert devices["a"]["version"] == partita_version() and devices["a"]["threads"] == 1
    assert devices["a"]["stages"] == [] and devices["a"]["device"] == "cpu" and devices["a"]["secure"] is True
    assert devices["a"]["dtype"] == "float32"  # what its stages compute in, beside device and threads
    assert devices["b"]["state"] == "down" and "did not" in devices["b"]["error"]
    assert devices["c"] == {"state": "emulated"}


def test_status_prints_a_table_and_why_a_worker_is_down(cluster_file, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    path, secret = cluster_file
    with pytest.raises(SystemExit):
        main(["status", str(path), "--secret-key", str(secret), "--timeout", "0.5"])
    out = capsys.readouterr().out
    assert "1 of 2 workers up" in out and "emulated" in out
    assert "b: worker b at tcp://127.0.0.1:" in out and "did not" in out
