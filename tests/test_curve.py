"""CURVE across hosts: `runwire keys` writes a private pair, no socket binds beyond loopback without
keys, and with keys only clients that hold the cluster's pair (and know its public key) get events."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from shared.config import settings_from_toml
from shared.curve import (
    CurveAuthenticator,
    CurveKeys,
    bind_secured,
    is_loopback_endpoint,
    load_keys,
    secure_client,
    write_keypair,
)
from shared.errors import BindError, ConfigError

CLUSTER = '[cluster]\nnats = ["nats://127.0.0.1:4222"]\nstate = "postgresql://runwire@127.0.0.1/runwire"\n'


def _settings(tmp_path: Path, keys_dir: Path | None):
    text = CLUSTER
    if keys_dir is not None:
        text += f'[cluster.curve]\npublic_file = "{keys_dir.name}/runwire.key"\nsecret_file = "{keys_dir.name}/runwire.key_secret"\n'
    return settings_from_toml(text, tmp_path / "runwire.toml")


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_runwire_keys_writes_a_private_pair_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    r = subprocess.run([sys.executable, "-m", "runwire_cli", "--json", "keys", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    for name in ("public_file", "secret_file"):
        mode = stat.S_IMODE(os.stat(files[name]).st_mode)
        assert mode == 0o600, (name, oct(mode))
    keys = load_keys(_settings(tmp_path, out))
    assert keys is not None and zmq.curve_public(keys.secret) == keys.public
    assert keys.secret.decode() not in repr(keys)
    # a second run does not overwrite the pair every host holds
    again = subprocess.run([sys.executable, "-m", "runwire_cli", "keys", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert json.loads(r.stdout) == files and load_keys(_settings(tmp_path, out)) == keys


def test_bad_key_files_are_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cluster.curve.public_file.*cannot read"):
        load_keys(_settings(tmp_path, tmp_path / "missing"))
    a, b = tmp_path / "a", tmp_path / "b"
    write_keypair(a)
    write_keypair(b)
    (a / "runwire.key").write_bytes((b / "runwire.key").read_bytes())
    with pytest.raises(ConfigError, match="cluster.curve.public_file.*is not the public key"):
        load_keys(_settings(tmp_path, a))
    write_keypair(b, overwrite=True)
    os.chmod(b / "runwire.key_secret", 0o644)
    with pytest.raises(ConfigError, match="cluster.curve.secret_file.*chmod 600"):
        load_keys(_settings(tmp_path, b))
    assert load_keys(settings_from_toml(CLUSTER, tmp_path / "runwire.toml")) is None


@pytest.mark.parametrize(("endpoint", "loopback"), [
    ("tcp://127.0.0.1:5556", True), ("tcp://127.3.4.5:1", True), ("tcp://[::1]:5556", True),
    ("tcp://localhost:5556", True), ("ipc:///tmp/x.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5556", False), ("tcp://*:5556", False), ("tcp://10.1.2.3:5556", False),
    ("tcp://eth0:5556", False), ("tcp://[::]:5556", False), ("tcp://runner-a.example:5556", False),
    ("ws://127.0.0.1:5556", False), ("nonsense", False),
])
def test_which_endpoints_are_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def test_a_bind_beyond_loopback_without_keys_is_refused(ctx: zmq.Context, tmp_path: Path) -> None:
    sock = ctx.socket(zmq.PUB)
    try:
        with pytest.raises(BindError) as e:
            bind_secured(sock, "tcp://0.0.0.0:5556", "runner.publish", None, tmp_path / "runwire.toml", "PUB socket")
        msg = str(e.value)
        assert "runner.publish" in msg and "tcp://0.0.0.0:5556" in msg and "no CURVE keys are in use" in msg, msg
        assert "runwire keys" in msg and str(tmp_path / "runwire.toml") in msg
        assert sock.get(zmq.LAST_ENDPOINT) == b""  # nothing was bound
        bind_secured(sock, "tcp://127.0.0.1:0", "runner.publish", None)  # loopback without keys: as today
        assert sock.get(zmq.LAST_ENDPOINT).startswith(b"tcp://127.0.0.1:")
    finally:
        sock.close(linger=0)


def _subscriber(ctx: zmq.Context, endpoint: str, keys: CurveKeys | None) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    secure_client(sub, keys)
    sub.setsockopt(zmq.SUBSCRIBE, b"ev/")
    sub.connect(endpoint)
    return sub


def test_curve_pub_sub_reaches_only_holders_of_the_cluster_pair(ctx: zmq.Context, tmp_path: Path) -> None:
    write_keypair(tmp_path / "keys")
    keys = load_keys(_settings(tmp_path, tmp_path / "keys"))
    assert keys is not None
    other_public, other_secret = zmq.curve_keypair()
    with CurveAuthenticator(ctx, keys) as auth:
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        subs: dict[str, zmq.Socket] = {}
        try:
            bind_secured(pub, "tcp://127.0.0.1:0", "runner.publish", keys)
            endpoint = pub.get(zmq.LAST_ENDPOINT).decode()
            subs["right"] = _subscriber(ctx, endpoint, keys)
            # knows the secret of another pair but verifies the server by the wrong public key
            subs["wrong server key"] = _subscriber(ctx, endpoint, CurveKeys(other_public, keys.secret))
            # verifies the server rightly but presents a pair of its own: refused by ZAP
            wrong_client = ctx.socket(zmq.SUB)
            wrong_client.setsockopt(zmq.LINGER, 0)
            wrong_client.curve_serverkey = keys.public
            wrong_client.curve_publickey, wrong_client.curve_secretkey = other_public, other_secret
            wrong_client.setsockopt(zmq.SUBSCRIBE, b"ev/")
            wrong_client.connect(endpoint)
            subs["own pair"] = wrong_client
            subs["plain"] = _subscriber(ctx, endpoint, None)
            got: dict[str, int] = dict.fromkeys(subs, 0)
            poller = zmq.Poller()
            for s in subs.values():
                poller.register(s, zmq.POLLIN)
            deadline = time.monotonic() + 10
            sent = 0
            # publish until the right subscriber has had 50 messages (PUB drops before the handshake)
            while got["right"] < 50 and time.monotonic() < deadline:
                pub.send_multipart([b"ev/r/s/log", b"%d" % sent])
                sent += 1
                for s, _ in poller.poll(5):
                    name = next(n for n, x in subs.items() if x is s)
                    while s.poll(0):
                        s.recv_multipart()
                        got[name] += 1
            assert got["right"] >= 50, got
            assert got["wrong server key"] == got["own pair"] == got["plain"] == 0, got
            assert auth.refused >= 1  # the client with its own pair was seen and refused
        finally:
            for s in subs.values():
                s.close(linger=0)
            pub.close(linger=0)


@pytest.mark.parametrize(("service", "key", "what"), [
    ("scheduler_svc", "scheduler.publish", "socket"),
    ("runner_svc", "runner.publish", "PUB socket"),
    ("runner_svc", "runner.control", "ROUTER"),
])
def test_services_refuse_to_bind_beyond_loopback_without_curve(tmp_path: Path, service: str, key: str, what: str) -> None:
    from tests.harness import REPO, write_config

    config, ports = write_config(tmp_path)
    port = {"scheduler.publish": ports.scheduler_publish, "runner.publish": ports.publish,
            "runner.control": ports.runner_control}[key]
    text = config.read_text()
    assert f"tcp://127.0.0.1:{port}" in text
    config.write_text(text.replace(f"tcp://127.0.0.1:{port}", f"tcp://0.0.0.0:{port}"))
    proc = subprocess.run([sys.executable, "-m", service, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"{key}: cannot bind {what} on tcp://0.0.0.0:{port}: not a loopback address" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
