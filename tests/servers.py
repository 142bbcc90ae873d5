"""Real servers on loopback for the tests of remote shard folders: Debian's nginx for HTTP range
requests and moto's standalone S3 server. Each starts in well under a second; where one cannot
start here (not installed, no apt), the tests that need it skip and say why."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

NGINX_CONF = """daemon off;
{user}worker_processes 2;
error_log {state}/error.log;
pid {state}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def nginx_binary() -> str | None:
    """nginx from PATH or Debian's /usr/sbin; installed from Debian's archive when missing and this
    is root on a machine with apt-get (as slurm/local-cluster.sh installs Slurm for its tests)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
        subprocess.run(install, capture_output=True, env=env, timeout=300)
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


class Nginx:
    """nginx serving `root` on a free loopback port; stop() and start() again on the same port."""

    def __init__(self, root: Path, state: Path):
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        self.binary, self.root, self.state, self.port = binary, root, state, free_port()
        self.process: subprocess.Popen | None = None
        state.mkdir(parents=True, exist_ok=True)
        # As root, nginx's workers would switch to "nobody", who cannot enter pytest's private temp folders.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (state / "nginx.conf").write_text(NGINX_CONF.format(user=user, state=state, port=self.port, root=root))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.state / "nginx.conf"), "-p", str(self.state)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_port(self.port, self.process, "nginx")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown, connections dropped
            self.process.wait(timeout=10)
        self.process = None


class MotoS3:
    """moto's standalone S3 server on a free loopback port (any credentials work)."""

    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What a client needs, as the environment a user would set (no credentials in configs)."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        self.process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, "moto_server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
