"""charforge as separate processes (servers, workers), their output kept in files so a busy
process never blocks on a full pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

CHARFORGE = [sys.executable, "-m", "charforge"]


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env = name, args, env
        self.log_path = logs / f"{name}.log"
        self._log: IO[str] | None = None
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Process:
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [*CHARFORGE, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_http(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.output()[-3000:]}")
            try:
                httpx.get(url, timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"{url} did not come up:\n{self.output()[-3000:]}")


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARFORGE_", "RUNPOD_"))}
    env.update(values)
    return env
