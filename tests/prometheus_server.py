"""Debian's Prometheus, started by a test: loopback only, its own temporary data folder and
config, stopped by its PID. Its HTTP API answers queries (and says where a query does not parse)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus; scripts/setup.sh installs it)")
    return exe


class PrometheusServer:
    """`prometheus` scraping `targets` (host:port) as job `job` every `scrape_interval`, and
    evaluating the rules of `rule_files` as often."""

    def __init__(self, folder: Path, targets: tuple[str, ...] = (), job: str = "probec",
                 scrape_interval: str = "1s", rule_files: tuple[Path, ...] = ()):
        exe = require_tool("prometheus")
        folder.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}}
        if rule_files:
            config["rule_files"] = [str(path) for path in rule_files]
        if targets:
            config["scrape_configs"] = [{"job_name": job, "scrape_interval": scrape_interval,
                                         "scrape_timeout": scrape_interval,
                                         "static_configs": [{"targets": list(targets)}]}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), cwd=folder)
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prometheus did not get ready:\n{self.log()}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/PATH; a 4xx answer (a query that does not parse: errorType bad_data) is
        returned as Prometheus wrote it."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                return json.loads(exc.read())
            raise

    def query(self, expr: str, at: float | None = None) -> dict:
        return self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))

    def vector(self, expr: str, at: float | None = None) -> dict[frozenset, float]:
        """An instant vector query's result: {frozenset(labels): value}."""
        answer = self.query(expr, at)
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["resultType"] == "vector", (expr, answer)
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in answer["data"]["result"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_text(port: int) -> str:
    """GET /metrics of a running collector, as Prometheus does."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def assert_promtool_finds_nothing(text: str) -> None:
    """`promtool check metrics` reads a scrape without a single line (names, units, `_total`, help)."""
    promtool = require_tool("promtool")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), text
