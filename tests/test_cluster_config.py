"""The `[cluster]` config section: absent means one host (nothing of cluster mode is loaded); present,
each bad value is refused naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import settings_from_toml
from shared.errors import ConfigError

GOOD = """
[cluster]
nats = ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
state = "postgresql://runwire:secret@10.0.0.1:5432/runwire"
stream_max_age = "3d"
stream_replicas = 3
[cluster.curve]
public_file = "keys/runwire.key"
secret_file = "keys/runwire.key_secret"
"""


def test_a_cluster_section_loads_and_its_absence_is_none(tmp_path: Path) -> None:
    c = settings_from_toml(GOOD, tmp_path / "runwire.toml").config.cluster
    assert c is not None and c.nats[1] == "tls://10.0.0.2:4222" and c.stream_max_age == "3d"
    assert c.curve is not None and c.curve.secret_file == "keys/runwire.key_secret"
    minimal = settings_from_toml('[cluster]\nnats = ["nats://h:4222"]\nstate = "postgresql://h/db"\n', tmp_path / "r.toml")
    assert minimal.config.cluster is not None and minimal.config.cluster.curve is None
    assert minimal.config.cluster.stream_replicas == 3
    assert settings_from_toml("", tmp_path / "runwire.toml").config.cluster is None


@pytest.mark.parametrize(("old", "new", "key", "expected"), [
    ('nats = ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]', "nats = []", "cluster.nats", "at least one"),
    ('"tls://10.0.0.2:4222"', '"http://10.0.0.2:4222"', "cluster.nats[1]", "nats://host:4222"),
    ('"nats://10.0.0.1:4222"', '"10.0.0.1:4222"', "cluster.nats[0]", "nats://host:4222"),
    ("postgresql://runwire:secret@", "mysql://runwire:secret@", "cluster.state", "PostgreSQL URL"),
    ('stream_max_age = "3d"', 'stream_max_age = "forever"', "cluster.stream_max_age", "not a duration"),
    ("stream_replicas = 3", "stream_replicas = 7", "cluster.stream_replicas", "from 1 to 5"),
    ('secret_file = "keys/runwire.key_secret"', 'secret_file = " "', "cluster.curve.secret_file", "file path"),
    ('secret_file = "keys/runwire.key_secret"', "", "cluster.curve", "missing required field `secret_file`"),
    ("stream_replicas = 3", "stream_replica = 3", "cluster", "unknown field `stream_replica`"),
])
def test_bad_cluster_values_are_refused_naming_the_key(tmp_path: Path, old: str, new: str, key: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        settings_from_toml(GOOD.replace(old, new), tmp_path / "runwire.toml")
    msg = str(e.value)
    assert f"`{key}`" in msg and expected in msg, msg
    assert "secret@" not in msg  # a password in the state URL is never echoed


def test_single_host_mode_loads_nothing_of_cluster_mode(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from shared.config import settings_from_toml\n"
        "import scheduler_svc.service, runner_svc.service, gateway_svc.service, runwire_cli.cli\n"
        f"settings_from_toml('', __import__('pathlib').Path({str(tmp_path / 'runwire.toml')!r}))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('nats', 'asyncpg', 'runwire_cluster'))\n"
        "print(loaded)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]", r.stdout
