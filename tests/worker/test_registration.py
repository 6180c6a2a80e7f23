"""Worker registration against a real, migrated database (SQLite and PostgreSQL): the row a
worker writes, its heartbeat, its goodbye, the device probe and the gpu-queue check."""

from __future__ import annotations

import time

import pytest

import hsl_engine as he
from service.db import Worker
from service.db.workers import Devices
from worker import registration
from worker.registration import Registration, gpu_queue_problem, probe_devices

A100 = Devices(torch=True, cuda_devices=2, cuda_memory_bytes=80 * 2**30)


@pytest.fixture
def fast(settings):
    """Heartbeats every 0.1 s (lease 0.3 s), alive 0.9 s after each."""
    return settings.model_copy(update={"lease_seconds": 0.3})


def _row(sessions, worker_id) -> Worker | None:
    with sessions() as s:
        return s.get(Worker, worker_id)


def _until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_worker_registers_beats_and_says_goodbye(sessions, fast):
    reg = Registration(sessions, fast, kind="celery", queues=["gpu"], devices=A100)
    reg.start()
    try:
        row = _row(sessions, reg.id)
        assert row is not None
        assert (row.kind, row.queues, row.pid) == ("celery", ["gpu"], reg.pid)
        assert row.engine_version == he.ENGINE_VERSION
        assert (row.torch, row.cuda_devices, row.cuda_memory_bytes) == (True, 2, 80 * 2**30)
        assert row.expires_at > row.last_seen and row.started_at <= row.last_seen
        first = row.last_seen
        # the heartbeat renews it
        _until(lambda: _row(sessions, reg.id).last_seen > first)
        # a row that vanished (pruned, database restored) is written again
        with sessions.begin() as s:
            s.delete(s.get(Worker, reg.id))
        again = _until(lambda: _row(sessions, reg.id))
        assert again.queues == ["gpu"] and again.cuda_devices == 2
    finally:
        reg.stop()
    assert _row(sessions, reg.id) is None
    time.sleep(3 * fast.heartbeat_seconds)
    assert _row(sessions, reg.id) is None  # no heartbeat brings it back


@pytest.mark.slow  # a probe process that imports PyTorch per database: ~2 s each
def test_devices_are_probed_in_the_background_and_recorded(sessions, fast):
    reg = Registration(sessions, fast, kind="embedded", queues=["cpu", "gpu"])
    reg.start()
    try:
        # registered at once, the devices unknown until the probe answers
        assert _row(sessions, reg.id).queues == ["cpu", "gpu"]
        row = _until(
            lambda: (r := _row(sessions, reg.id)) is not None and r.torch is not None and r
        )
        assert row.torch == he.torch_available()
        assert row.cuda_devices == he.cuda_devices()
        assert row.cuda_memory_bytes == he.cuda_memory_bytes(0)
    finally:
        reg.stop()


@pytest.mark.slow  # a process that imports PyTorch: ~3 s
def test_probe_reports_what_the_engine_sees():
    devices = probe_devices()
    assert devices == Devices(he.torch_available(), he.cuda_devices(), he.cuda_memory_bytes(0))


def test_a_failed_probe_is_none(monkeypatch):
    monkeypatch.setattr(registration, "_PROBE", "raise SystemExit(3)")
    assert probe_devices() is None


def test_gpu_queue_problem_names_what_is_missing():
    assert "probe failed" in gpu_queue_problem(None)
    assert "PyTorch is not installed" in gpu_queue_problem(Devices(False, 0, None))
    assert "no CUDA device" in gpu_queue_problem(Devices(True, 0, None))
    assert gpu_queue_problem(A100) is None
