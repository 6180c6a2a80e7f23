"""An ext4 filesystem on a loop device, mounted where a test wants it (``./.hsl/`` of an
embedded server), to fail the way a disk fails.

Power loss: the image file behind the loop device *is* the device. What the kernel has not
written to it (dirty pages in ext4's page cache: SQLite's WAL frames that were written but
never fsynced) is not in it. ``snapshot()`` copies the image at one instant, which is what a
power cut leaves on the platter; ``e2fsck`` then replays the journal as a reboot would.
(device-mapper's flakey/error targets would be the textbook tool; this kernel has no
device-mapper driver, /dev/mapper/control does not exist and there is no modprobe.)

Read-only episode: ``trigger_error()`` writes to ext4's ``trigger_fs_error`` in sysfs, the
same path as a real I/O or corruption error: with ``errors=remount-ro`` the journal is
aborted and the filesystem turns read-only at once, and its dirty pages are never written.

Needs root (losetup, mount); the fixture skips with the reason where that is not allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOLS = ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {out.returncode}: {out.stderr.strip()}")
    return out


class LoopFS:
    def __init__(self, workdir: Path, size_mb: int = 64):
        self.workdir, self.size_mb = workdir, size_mb
        self.image = workdir / "disk.img"
        self.device: str | None = None
        self.target: Path | None = None

    def make(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb << 20)
        # -m 0: no blocks reserved for root (the server runs as root here), so "full" is full
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(self.image))

    def mount(self, target: Path, image: Path | None = None) -> None:
        image = image or self.image
        target.mkdir(parents=True, exist_ok=True)
        self.device = _run("losetup", "-f", "--show", str(image)).stdout.strip()
        self.image = image
        # commit=30: the journal's own timer must not write back what a test expects to be
        # still in the page cache (the kernel's dirty expiry is 30 s as well)
        _run("mount", "-o", "errors=remount-ro,commit=30", self.device, str(target))
        self.target = target

    def umount(self) -> None:
        if self.target is not None:
            for _ in range(50):
                if _run("umount", str(self.target), check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                _run("umount", "-l", str(self.target), check=False)
            self.target = None
        if self.device is not None:
            _run("losetup", "-d", self.device, check=False)
            self.device = None

    def snapshot(self, dest: Path) -> float:
        """Copy the device as it is now (what a power cut leaves); returns the seconds."""
        started = time.monotonic()
        shutil.copyfile(self.image, dest)
        return time.monotonic() - started

    def fsck(self, image: Path | None = None) -> int:
        """``e2fsck -fy``: 0 clean, 1 errors corrected (a replayed journal counts)."""
        out = _run("e2fsck", "-fy", str(image or self.image), check=False)
        if out.returncode not in (0, 1, 2):
            raise RuntimeError(f"e2fsck -> {out.returncode}: {out.stdout}{out.stderr}")
        return out.returncode

    def trigger_error(self) -> None:
        """An ext4 error now: journal aborted, filesystem read-only (errors=remount-ro)."""
        assert self.device is not None
        path = Path("/sys/fs/ext4") / Path(self.device).name / "trigger_fs_error"
        path.write_text("hsl reliability test: simulated disk error\n")

    def remount(self, mode: str) -> None:
        assert self.target is not None
        _run("mount", "-o", f"remount,{mode}", str(self.target))


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to attach a loop device and mount ext4 (run as root, as CI does)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if not Path("/sys/fs/ext4").is_dir():
        return "the kernel has no ext4 (no /sys/fs/ext4)"
    return None


@pytest.fixture
def loopfs(tmp_path) -> Iterator[LoopFS]:
    """A fresh 64 MiB ext4 image; the test mounts it. Request it before ``start_server`` and
    ``scenario``: it is unmounted after the servers stopped and the invariants were checked."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    fs = LoopFS(tmp_path)
    try:
        fs.make()
        probe = tmp_path / "probe-mount"
        fs.mount(probe)
        fs.umount()
        probe.rmdir()
    except (RuntimeError, OSError) as exc:
        fs.umount()
        pytest.skip(f"cannot mount a loop device here: {exc}")
    try:
        yield fs
    finally:
        fs.umount()
