"""Real ``cachefs node`` and ``cachefs csi`` processes for tests: started, watched,
signalled, killed.

Each runs as ``python -m cachefs.cli ...`` in its own process group with the test's
environment (so a node sees the S3 fixture's endpoint and credentials). Its JSON log
lines are collected; the ``serving`` line says where it listens, and readiness is
polled with a deadline, never slept for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from servers import wait_for

TOKEN = "test-token-4b1d"


class CachefsProcess:
    """A ``cachefs`` command running in the background, its log collected."""

    def __init__(
        self, args: list[str], token: str | None = TOKEN, env: dict[str, str] | None = None
    ) -> None:
        argv = [sys.executable, "-m", "cachefs.cli", *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
        if token is not None:
            environment["CACHEFS_TOKEN"] = token
        environment.update(env or {})
        self.argv = argv
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            argv,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.serving: dict[str, Any] = {}

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records so far (every line must be one)."""
        return [json.loads(line) for line in list(self.lines)]

    def wait_ready(self, timeout: float = 30.0) -> Any:
        def ready() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.argv[3]} exited with {self.process.returncode}: "
                    + "\n".join(self.lines)
                )
            for line in list(self.lines):
                if '"serving"' in line:
                    return json.loads(line)
            return None

        self.serving = wait_for(ready, timeout=timeout, message=f"{self.argv[3]} to serve")
        return self

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """kill -9 of the process and anything it started."""
        if self.process.poll() is None:
            self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


class NodeProcess(CachefsProcess):
    def __init__(
        self,
        cache_dir: Path,
        socket_path: Path,
        tcp: bool | str = True,
        metrics: bool = True,
        token: str | None = TOKEN,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.cache_dir = cache_dir
        self.socket_path = socket_path
        args = [
            "node",
            "--socket",
            str(socket_path),
            *(["--cache-dir", str(cache_dir)] if config is None else ["--config", str(config)]),
            *(["--address", tcp if isinstance(tcp, str) else "127.0.0.1:0"] if tcp else []),
            *(["--metrics-address", "127.0.0.1:0"] if metrics else []),
            *extra_args,
        ]
        super().__init__(args, token, env)

    @property
    def unix_endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_endpoint(self) -> str:
        return self.serving["address"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.serving['metrics_address']}/metrics"

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The node's metrics now, keyed by (sample name, labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, have), value in self.scrape().items()
            if sample == name and wanted <= have
        )


class CsiProcess(CachefsProcess):
    def __init__(
        self,
        socket_path: Path,
        node_endpoint: str,
        state_dir: Path,
        allow: tuple[str, ...] = (),
        publish_timeout: float = 10.0,
        node_id: str = "node-1",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        args = [
            "csi",
            "--csi-endpoint",
            f"unix://{socket_path}",
            "--endpoint",
            node_endpoint,
            "--node-id",
            node_id,
            "--state-dir",
            str(state_dir),
            "--publish-timeout",
            str(publish_timeout),
            *[arg for prefix in allow for arg in ("--allow", prefix)],
            *extra_args,
        ]
        super().__init__(args, token=None, env=env)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The ``cachefs`` command as a user runs it: a subprocess without this process's
    CACHEFS_ settings, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    return subprocess.run(
        [sys.executable, "-m", "cachefs.cli", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def loopback_addresses(count: int) -> list[str]:
    """``127.0.0.<n>:<port>`` for n = 1..count, each port free on its host when probed:
    a static cluster's members must be named before the nodes start."""
    addresses = []
    for index in range(1, count + 1):
        with socket.socket() as probe:
            probe.bind((f"127.0.0.{index}", 0))
            addresses.append(f"127.0.0.{index}:{probe.getsockname()[1]}")
    return addresses
