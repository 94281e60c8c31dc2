"""No finished image lost: a real server whose outputs folder is a real 4 MiB tmpfs, filled up,
made read-only and given back while the server runs.

The server runs in a mount namespace of its own (`unshare`), where the tmpfs is mounted on its
outputs folder; this test reaches that folder through /proc/<pid>/root and remounts it with
`nsenter`. Skipped where user or mount namespaces are not allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support import START_TIMEOUT, app_args, app_env, free_port, http_get, kill_group, metric, status_of, wait_until

pytestmark = pytest.mark.slow

TMPFS_SIZE = 4 << 20
MIN_FREE_MIB = 1
MiB = 1 << 20


def _namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || exit 1"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


class DiskServer:
    """`python app.py` with its outputs folder on a tmpfs that only it (and we, via /proc) see."""

    def __init__(self, root: Path, tiny_dir: Path):
        self.root = root
        self.outputs = root / "outputs"
        self.outputs.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        env = {**os.environ, **app_env(root, min_free_mib=str(MIN_FREE_MIB), log_level="INFO")}
        env.pop("ZIMAGE_AUTH", None)
        mount = f'mount -t tmpfs -o size={TMPFS_SIZE},mode=0755 tmpfs "$0" && exec "$@"'
        cmd = ["unshare", "-rm", "--propagation", "private", "sh", "-c", mount, str(self.outputs)]
        cmd += [sys.executable, *app_args(self.port, tiny_dir, self.outputs)]
        with open(self.log_path, "wb") as log:
            # unshare and sh exec: the app keeps this pid, and its namespace is /proc/<pid>
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
            )
        self.seen = Path(f"/proc/{self.proc.pid}/root") / self.outputs.relative_to("/")
        wait_until(self._ready_or_dead, START_TIMEOUT, "the server's /ready")

    def _ready_or_dead(self) -> bool:
        assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}"
        return status_of(self.url + "/ready") == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def free(self) -> int:
        st = os.statvfs(self.seen)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Leave about `leave` bytes free on the tmpfs (a filler file the purge never touches)."""
        with open(self.seen / "filler.bin", "ab") as f:
            f.write(b"\0" * max(0, self.free() - leave))
        assert abs(self.free() - leave) < 64 << 10, self.free()

    def empty(self) -> None:
        (self.seen / "filler.bin").unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-U", "-m", "mount", "-o", f"remount,{mode}", str(self.outputs)],
            check=True,
            timeout=30,
        )

    def pngs(self) -> list[str]:
        return sorted(p.name for p in self.seen.iterdir() if p.suffix == ".png")

    def temp_files(self) -> list[str]:
        return [p.name for p in self.seen.iterdir() if p.name.startswith(".tmp-")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                kill_group(self.proc.pid)  # its own session: the app and nothing else
                self.proc.wait(10)


@pytest.fixture(scope="module")
def disk(tmp_path_factory, tiny_dir):
    if not _namespaces_work():
        pytest.skip("user and mount namespaces (unshare -rm) are not available here")
    srv = DiskServer(tmp_path_factory.mktemp("disk"), tiny_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(disk):
    from gradio_client import Client

    return Client(disk.url + "/", verbose=False)


@pytest.fixture(autouse=True)
def space_back(disk):
    """Every test leaves the disk as it found it: writable, empty of filler."""
    yield
    disk.remount("rw")
    disk.empty()


def generate(client, size=64, seed=1, count=1):
    return client.predict("a lighthouse", "", size, size, 2, 0.0, seed, count, api_name="/generate")


def value(disk, name: str, labels: dict | None = None) -> float:
    found = metric(disk.url, name, labels)
    assert found is not None, f"{name} {labels} not in /metrics"
    return found


def outcome(disk, label: str) -> float:
    return value(disk, "zimage_requests_total", {"outcome": label})


def ready(disk) -> tuple[int, dict]:
    r = http_get(disk.url + "/ready")
    return r.status_code, r.json()


def check_unsaved(disk, gallery, details, seeds: list[int], unsaved: list[int]) -> None:
    """The user got every image, the unsaved ones too (downloaded as the page's download button
    does, parameters embedded), in order, with the saved ones on disk."""
    from PIL import Image

    from zimage.service.store import read_parameters

    assert details["saved"] is False and len(details["unsaved"]) == len(unsaved)
    assert len(details["files"]) == len(seeds) - len(unsaved)
    assert "Download" in details["save_error"] and details["save_error"] in details["notes"]  # the summary shows it
    assert [g["caption"] for g in gallery] == [f"seed {s}" + (" · not saved" if s in unsaved else "") for s in seeds]
    for item, seed in zip(gallery, seeds):
        with Image.open(item["image"]) as im:
            im.load()
            assert im.format == "PNG"
        assert read_parameters(item["image"])["seed"] == seed
    assert sorted(Path(g["image"]).name for g, s in zip(gallery, seeds) if s in unsaved) == sorted(details["unsaved"])
    assert disk.temp_files() == []


def test_a_full_disk_refuses_new_jobs_clearly_and_ready_says_so(disk, client):
    from gradio_client.exceptions import AppError

    generate(client, seed=1)  # fine while there is room
    before = outcome(disk, "nospace")
    disk.fill(leave=MIN_FREE_MIB * MiB // 2)
    status, body = ready(disk)
    assert status == 503 and f"outputs folder {disk.outputs}" in body["reason"]
    assert "below min_free_mib (1 MiB); new jobs are refused" in body["reason"]
    assert value(disk, "zimage_storage_ok") == 0 and value(disk, "zimage_outputs_free_bytes") < MiB
    with pytest.raises(AppError) as info:
        generate(client, seed=2)
    message = str(info.value)
    assert f"Not enough free disk space to save images: the outputs folder {disk.outputs} has" in message
    assert "below the 1 MiB zimage keeps free (setting min_free_mib)" in message
    assert outcome(disk, "nospace") == before + 1
    assert "seed=2 outcome=nospace" in disk.log()
    # space comes back: ready again, and the next request works and is saved
    disk.empty()
    assert ready(disk)[0] == 200 and value(disk, "zimage_storage_ok") == 1
    pngs = disk.pngs()
    _gallery, details = generate(client, seed=3)
    assert details["saved"] is True and details["save_error"] is None
    assert len(disk.pngs()) == len(pngs) + 1


def test_a_write_that_fails_for_lack_of_space_still_gives_the_image(disk, client):
    """Above the threshold, but too little room for this PNG (1024x1024 noise, about 2.6 MB): ENOSPC."""
    unsaved, ok = outcome(disk, "unsaved"), outcome(disk, "ok")
    pngs = disk.pngs()
    disk.fill(leave=MIN_FREE_MIB * MiB + (200 << 10))
    gallery, details = generate(client, size=1024, seed=11)
    check_unsaved(disk, gallery, details, [11], [11])
    assert details["save_error"] == (
        "Not saved: the image was made, but it could not be written to the outputs folder because the disk is "
        "full (no space left on the device). Download it from the result now: the page keeps it only for a few hours."
    )
    assert disk.pngs() == pngs
    assert outcome(disk, "unsaved") == unsaved + 1 and outcome(disk, "ok") == ok
    log = disk.log()
    assert "size=1024x1024 steps=2 count=1 seed=11 outcome=unsaved" in log and "No space left on device" in log
    # a batch whose first PNG (about 650 KB) fits and whose second does not: one saved, one handed over
    gallery, details = generate(client, size=512, seed=12, count=2)
    check_unsaved(disk, gallery, details, [12, 13], [13])
    assert details["save_error"].startswith(
        "Not saved: 1 of the 2 images could not be written to the outputs folder because the disk is full"
    )
    assert len(disk.pngs()) == len(pngs) + 1 and outcome(disk, "unsaved") == unsaved + 2
    disk.empty()
    _gallery, details = generate(client, size=512, seed=14)
    assert details["saved"] is True and outcome(disk, "ok") == ok + 1 and len(disk.pngs()) == len(pngs) + 2


def test_a_read_only_outputs_folder_still_gives_the_image(disk, client):
    unsaved = outcome(disk, "unsaved")
    disk.remount("ro")
    status, body = ready(disk)
    assert (
        status == 503 and body["reason"] == f"outputs folder {disk.outputs} cannot be written (read-only file system)"
    )
    assert value(disk, "zimage_storage_ok") == 0
    job = client.submit("a lighthouse", "", 64, 64, 2, 0.0, 21, 1, api_name="/generate")
    gallery, details = job.result(timeout=120)
    check_unsaved(disk, gallery, details, [21], [21])
    updates = job.communicator.updates  # everything the server streamed for this job, the toasts too
    toasts = []
    while not updates.empty():
        log = getattr(updates.get_nowait(), "log", None)
        if log:
            toasts.append(log)
    assert (details["save_error"], "warning") in toasts, toasts
    assert "because the folder is on a read-only file system." in details["save_error"]
    assert outcome(disk, "unsaved") == unsaved + 1
    assert "seed=21 outcome=unsaved" in disk.log()
    # the disk is writable again: /ready recovers by itself, and the next image is saved
    disk.remount("rw")
    wait_until(lambda: ready(disk)[0] == 200, 10, "/ready after the remount")
    _gallery, details = generate(client, seed=22)
    assert details["saved"] is True and any("seed22" in n for n in disk.pngs())
