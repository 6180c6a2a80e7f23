"""Real processes for end-to-end tests: each in its own process group, logs to files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
TERMINAL = ("succeeded", "failed", "cancelled")


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, logdir: Path):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log_path = logdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.stopped = False  # by the test: kill() or stop()

    def start(self) -> Proc:
        self.stopped = False
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker and its pool children)."""
        self.stopped = True
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if sig == signal.SIGKILL and self.popen is not None:
            try:  # pool children may outlive the parent briefly
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return f"--- {self.name} ---\n" + "\n".join(text[-lines:])


class Processes:
    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env, self.procs = cwd, env, []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        """Start ``hsl *args``."""
        return self.spawn(name, [str(BIN / "hsl"), *args], env=env)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start any command (``argv[0]`` is looked up on the PATH of the environment)."""
        proc = Proc(name, argv, {**self.env, **(env or {})}, self.cwd, self.cwd)
        self.procs.append(proc)
        return proc.start()

    def hsl(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run an ``hsl`` command to completion; its stdout."""
        out = subprocess.run(
            [str(BIN / "hsl"), *args],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise AssertionError(f"hsl {' '.join(args)} -> {out.returncode}\n{out.stderr}")
        return out.stdout

    def assert_alive(self) -> None:
        """No process has exited but those the test stopped itself."""
        for p in self.procs:
            code = None if p.popen is None else p.popen.poll()
            assert p.stopped or code is None, f"{p.name} exited early with status {code}"

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


def base_env(**extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSL_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_http(
    url: str, timeout: float = 60.0, procs: Processes | None = None, *, alive: bool = False
) -> None:
    """Until ``url`` answers 200; with ``alive``, fail at once when one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive and procs is not None:
            procs.assert_alive()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout} s\n" + (procs.logs() if procs else ""))


def wait_status(
    client: httpx.Client,
    exp_id: str,
    statuses=TERMINAL,
    timeout: float = 300.0,
    procs: Processes | None = None,
    predicate=None,
    *,
    alive: bool = False,
) -> dict[str, Any]:
    """The experiment's status once terminal (or ``predicate``); ``alive`` as for wait_http."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if alive and procs is not None:
            procs.assert_alive()
        try:
            doc = client.get(f"/v1/experiments/{exp_id}").json()
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if predicate is not None:
            if predicate(doc):
                return doc
        elif doc.get("status") in statuses:
            return doc
        time.sleep(0.2)
    raise AssertionError(
        f"experiment {exp_id} did not reach {statuses} in {timeout} s: {doc}\n"
        + (procs.logs() if procs else "")
    )


def wait_until(predicate, timeout: float, what: str, procs: Processes | None = None) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + (procs.logs() if procs else ""))


def same_numbers(remote: dict[str, Any], local: dict[str, Any], *, rel: float = 0.0) -> None:
    """Every point of ``local`` is in ``remote`` with the same numbers: exactly, or, for a
    resumed run (``rel`` > 0), within ``rel``. A resumed run cold-starts the eigensolver at
    its first new n, so it converges to the same top eigenvectors within the solver's
    tolerance, but the reported eigenvalues past the top d1 are the bulk's and can differ
    (near-ties in |value| swap): they are compared only when ``rel`` is 0."""
    import math

    def key(p):
        return (p["method"], p["seed"], p["n"])

    got = {key(p): p for p in remote["points"]}
    assert len(got) == len(remote["points"]), "a point is stored twice"
    assert set(got) == {key(p) for p in local["points"]}
    for p in local["points"]:
        q = got[key(p)]
        fields = ["mse", "overlap", "cos2", "recovered", "n_train_used"]
        if rel == 0.0:
            fields.append("eigenvalues")
        for field in fields:
            a, b = q[field], p[field]
            if rel == 0.0 or a is None or isinstance(a, int):
                assert a == b, (key(p), field, a, b)
            else:
                aa = a if isinstance(a, list) else [a]
                bb = b if isinstance(b, list) else [b]
                for x, y in zip(aa, bb, strict=True):
                    assert math.isclose(x, y, rel_tol=rel, abs_tol=rel), (key(p), field, x, y)
