"""Real servers for the backend tests, started on 127.0.0.1: moto's S3 server, Ceph's radosgw, nginx with
WebDAV, and the fault proxy. Each runs as a subprocess and is stopped by its fixture."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class S3Server:
    """What the tests ask of an S3 server: its endpoint, a boto3 client, and buckets anyone may read."""

    url: str

    def client(self, config: Any = None):  # type: ignore[no-untyped-def]
        """A boto3 client of this server (`config`: a botocore Config, for example the benchmark's)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
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


class Moto(Process, S3Server):
    def __init__(self, workdir: Path) -> None:
        port = free_port()
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            port,
            "moto S3 server",
            workdir / "moto.log",
        )


CEPH_CONF = """
[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
# a throw-away cluster on loopback: no authentication, so no keyrings to make. radosgw hangs talking to a
# monitor without "crc secure" here when auth is none.
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc secure
keyring = /dev/null
run_dir = {dir}/run
admin_socket = {dir}/run/$name.asok
log_file = {dir}/log/$name.log
pid_file = {dir}/run/$name.pid
mon_data = {dir}/mon
osd_data = {dir}/osd
# one OSD holding everything in memory; no manager
osd_objectstore = memstore
# radosgw's object classes (Ceph 20 in Debian defaults to a path relative to the OSD's working directory)
osd_class_dir = {classes}
memstore_device_bytes = 4294967296
osd_pool_default_size = 1
osd_pool_default_min_size = 1
# few placement groups per pool (radosgw makes ~8 pools; one OSD takes 250 at most), and no autoscaler to set
# them (Ceph 20 would otherwise create each pool with 1)
osd_pool_default_pg_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
# the default 1 s between proposals makes the ~12 map changes of a first start take 13 s instead of 1 s
paxos_propose_interval = 0.01

[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_data = {dir}/rgw
"""


class Radosgw(S3Server):
    """Ceph's S3 gateway on a throw-away one-node cluster (one monitor, one in-memory OSD), all on
    127.0.0.1: a real S3 implementation, with its own ideas about ETags, errors and multipart uploads."""

    def __init__(self, workdir: Path) -> None:
        for tool in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph"):
            if not shutil.which(tool):
                pytest.fail(f"{tool} is not installed (run .ci/setup: radosgw ceph-mon ceph-osd)", pytrace=False)
        d = self.dir = workdir / "ceph"
        for sub in ("mon", "osd", "run", "log", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        mon_port, rgw_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{rgw_port}"
        conf = self.conf = d / "ceph.conf"
        fsid = str(uuid.uuid4())
        classes = glob.glob("/usr/lib/*/rados-classes") + glob.glob("/usr/lib*/rados-classes")
        if not classes:
            pytest.fail("Ceph's rados-classes are not installed (run .ci/setup)", pytrace=False)
        conf.write_text(CEPH_CONF.format(fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, dir=d, classes=classes[0]))
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
                      str(d / "monmap"))  # fmt: skip
            self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
            mon = self._daemon("ceph-mon", "-i", "a")
            wait_port(mon_port, mon, "ceph-mon")
            osd_uuid = str(uuid.uuid4())
            self._run("ceph", "--connect-timeout", "30", "osd", "new", osd_uuid)
            self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon("ceph-osd", "-i", "0")
            rgw = self._daemon("radosgw", "-n", "client.rgw")
            wait_port(rgw_port, rgw, "radosgw", timeout=60)
            self._run("radosgw-admin", "-n", "client.admin", "user", "create", "--uid", "hookd-test",
                      "--display-name", "hookd tests", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def _run(self, *argv: str) -> None:
        with open(self.dir / "log" / "setup.log", "ab") as log:
            done = subprocess.run([argv[0], "-c", str(self.conf), *argv[1:]], stdout=log, stderr=log, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode} (see {self.dir / 'log'})")

    def _daemon(self, *argv: str) -> subprocess.Popen[bytes]:
        with open(self.dir / "log" / f"{argv[0]}.out", "ab") as out:
            proc = subprocess.Popen(
                [argv[0], "-f", "-c", str(self.conf), *argv[1:]], stdout=out, stderr=out, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGKILL: the cluster's data lives in memory and goes with it, and radosgw takes ~4 s to obey SIGTERM."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
        corrupt: float = 0.0,
        wrong_region_for: str | None = None,
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
            "--corrupt-rate",
            str(corrupt),
        ] + (["--s3"] if s3 else []) + (["--wrong-region-for", wrong_region_for] if wrong_region_for else [])
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        super().__init__(argv, port, "fault proxy", workdir / f"proxy-{port}.log", env)

    def records(self) -> list[dict[str, object]]:
        """The records written so far; a last line without its newline is one the proxy is still writing."""
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().split("\n")[:-1] if line]

    def records_when(
        self, ready: Callable[[list[dict[str, object]]], bool], timeout: float = 10.0
    ) -> list[dict[str, object]]:
        """The records once `ready` finds them all there: the proxy writes a request's record after its
        answer went out, so the client can be done before the last one is written."""
        deadline = time.monotonic() + timeout
        while not ready(records := self.records()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return records
