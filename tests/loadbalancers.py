"""HAProxy and nginx from Debian's packages, run on the deployment guide's own configs.

The configurations are the files under ``docs/deploy/`` that ``docs/deploy.md`` shows,
filled in only with addresses and paths: HAProxy's through environment variables (it
expands ``"${NAME}"`` itself, so the file runs as it is), nginx's ``${NAME}`` placeholders
substituted as envsubst would (nginx's own ``$variables`` are left alone). Only the parts
a real host has elsewhere (HAProxy's ``global``, nginx's main context) are written here.

As for Chromium (tests/browser.py): the packages are installed with apt-get if missing,
and a test fails, not skips, when they cannot be.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import socket
import string
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.apt import ensure_package
from tests.polling import eventually_sync
from tests.s3util import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
NGINX_CONF = DEPLOY / "nginx-s3proxy.conf"
HAPROXY = Path("/usr/sbin/haproxy")
NGINX = Path("/usr/sbin/nginx")
# The apt package that brings each binary (the Makefile's `loadbalancers` target agrees).
PACKAGES = {HAPROXY: "haproxy", NGINX: "nginx"}


def ensure_installed(binary: Path) -> Path:
    """Debian's HAProxy or nginx, installed with apt-get if missing; fail if it can't be."""
    return ensure_package(binary, PACKAGES[binary], "--no-install-recommends")


def render(template: Path, values: Mapping[str, str]) -> str:
    """``${NAME}`` placeholders filled in (envsubst-style); every one must be given."""
    text = string.Template(template.read_text()).safe_substitute(values)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if "${" in body:
        raise ValueError(f"{template.name}: a placeholder was not given: {body}")
    return text


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    def accepts() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    eventually_sync(accepts, within=20, what=f"listening on {port}", ignoring=(OSError,))


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class HAProxy:
    """A running HAProxy on the guide's haproxy.cfg; its runtime API says what it sees."""

    proc: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` of the runtime API: one row per frontend, server and backend."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server(self, name: str) -> dict[str, str]:
        [row] = [r for r in self.stats() if r["pxname"] == "s3proxy" and r["svname"] == name]
        return row

    def status(self, name: str) -> str:
        """UP, DOWN, or a transition ("UP 1/3", "DOWN 1/2")."""
        return self.server(name)["status"]


@contextlib.contextmanager
def running_haproxy(servers: list[str], workdir: Path) -> Iterator[HAProxy]:
    """HAProxy with the guide's config over ``servers`` ("127.0.0.1:port", three)."""
    binary = ensure_installed(HAPROXY)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sock = workdir / "haproxy.sock"
    global_cfg = workdir / "global.cfg"
    # What a host's own global section has; in the foreground, logging to stderr.
    global_cfg.write_text(
        "global\n"
        "    log stderr format short local0 info\n"
        f'    stats socket "{sock}" mode 600 level admin\n'
        "    maxconn 4096\n"
    )
    env = {
        **os.environ,
        "S3PROXY_LB_BIND": f"127.0.0.1:{port}",
        **{f"S3PROXY_{i}": addr for i, addr in enumerate(servers, 1)},
    }
    log = workdir / "haproxy.log"
    check = subprocess.run(
        [str(binary), "-c", "-f", str(global_cfg), "-f", str(HAPROXY_CFG)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, f"haproxy -c refused the guide's config:\n{check.stdout}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "-db", "-f", str(global_cfg), "-f", str(HAPROXY_CFG)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, log)
        yield HAProxy(proc, port, sock, log)
    finally:
        _stop(proc, signal.SIGUSR1)  # soft stop: finish what runs, then exit


@dataclass
class Nginx:
    """A running nginx on the guide's nginx-s3proxy.conf."""

    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"


@contextlib.contextmanager
def running_nginx(servers: list[str], workdir: Path) -> Iterator[Nginx]:
    """nginx with the guide's site config over ``servers`` ("127.0.0.1:port", three)."""
    binary = ensure_installed(NGINX)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = workdir / "s3proxy.conf"
    site.write_text(
        render(
            NGINX_CONF,
            {
                "S3PROXY_LB_LISTEN": f"127.0.0.1:{port}",
                **{f"S3PROXY_{i}": addr for i, addr in enumerate(servers, 1)},
            },
        )
    )
    # A host's nginx.conf around it: one worker, everything under workdir. Root runs
    # its worker as root here, so the temp dirs under a 0700 tmp dir stay writable.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(
        f"    {name}_temp_path {workdir / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = workdir / "nginx.conf"
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n{temps}"
        f"    include {site};\n"
        "}\n"
    )
    argv = [str(binary), "-p", str(workdir), "-c", str(main), "-e", str(workdir / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, f"nginx -t refused the guide's config:\n{check.stderr}"
    log = workdir / "nginx.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, proc, log)
        yield Nginx(proc, port, workdir)
    finally:
        _stop(proc, signal.SIGQUIT)  # graceful: finish what runs, then exit
