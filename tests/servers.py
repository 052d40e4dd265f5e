"""Real servers for the backend tests, started on 127.0.0.1: moto's S3 server, nginx with WebDAV, and
the fault proxy. Each runs as a subprocess and is stopped by its fixture."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hookd.selftest import stop_group

ACCESS_KEY = "AKIAHOOKDTESTKEY0001"
SECRET_KEY = "hookd-test-secret-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.05)


class Process:
    def __init__(self, argv: list[str], port: int, what: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, start_new_session=True)
        wait_port(port, self.proc, what)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_group(self.proc)


class Moto(Process):
    def __init__(self, workdir: Path) -> None:
        port = free_port()
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            port,
            "moto S3 server",
            workdir / "moto.log",
        )

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def make_bucket(self, name: str) -> None:
        """A bucket that anyone may read over plain HTTP (how Nix substitutes from it here)."""
        c = self.client()
        c.create_bucket(Bucket=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{name}/*"],
                }
            ],
        }
        c.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))

    def keys(self, bucket: str) -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


NGINX_CONF = """
daemon off;
load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
user root;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    client_max_body_size 0;
    location / {{
      dav_methods PUT DELETE MKCOL COPY MOVE;
      dav_ext_methods PROPFIND OPTIONS;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
  }}
}}
"""


class Nginx(Process):
    def __init__(self, workdir: Path, root: Path) -> None:
        if not shutil.which("nginx"):
            pytest.fail("nginx is not installed (run .ci/setup)", pytrace=False)
        port = free_port()
        conf_dir = workdir / "nginx"
        conf_dir.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=conf_dir, port=port, root=root))
        self.root = root
        super().__init__(["nginx", "-c", str(conf), "-p", str(conf_dir)], port, "nginx", conf_dir / "out.log")


class FaultProxy(Process):
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        rate: float = 0.0,
        delay_ms: float = 0.0,
        s3: bool = False,
        seed: int = 1,
    ) -> None:
        port = free_port()
        self.events = workdir / f"proxy-{port}.jsonl"
        argv = [
            sys.executable,
            "-m",
            "tests.faultproxy",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--fault-rate",
            str(rate),
            "--delay-ms",
            str(delay_ms),
            "--log",
            str(self.events),
            "--seed",
            str(seed),
        ] + (["--s3"] if s3 else [])
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        super().__init__(argv, port, "fault proxy", workdir / f"proxy-{port}.log", env)

    def records(self) -> list[dict[str, object]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]
