"""The security rules on their own (no server): the path rule, users' folders, the PNG reader's
limits, the outputs-folder check, the login throttle and the upload quota.
tests/test_security_web.py drives the same rules through a real server."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from zimage.errors import SettingsError, UnreadableImage
from zimage.service.pngmeta import read_parameters, read_parameters_checked, read_png_text
from zimage.service.store import OutputStore, output_name, user_folder_name

META = {"prompt": "a lighthouse", "seed": 7, "width": 64, "height": 48, "steps": 2, "guidance": 0.0}


# ------------------------------------------------------------------------------------------
# PNG files made by hand: a decompression bomb, malformed metadata


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, side: int = 13000, text: str = "bomb prompt\nSteps: 8, Seed: 1, Size: 64x64") -> Path:
    """A side x side RGB PNG of zeros (a few hundred KB on disk, side*side*3 bytes decoded) with its
    text chunk after the pixel data, where reading the text used to decode every pixel."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pixels = _zlib_zeros(side * (1 + 3 * side))  # each row: filter byte 0, then black pixels
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", pixels)
    data += _chunk(b"tEXt", b"parameters\0" + text.encode("latin-1")) + _chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _zlib_zeros(n: int, unit: int = 1 << 20) -> bytes:
    """A valid zlib stream of n zero bytes, made in milliseconds: one independently compressed
    block of `unit` zeros (a full flush ends it), repeated; then the final block and the checksum."""

    def block(k: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(bytes(k)) + c.flush(zlib.Z_FULL_FLUSH)

    body = block(unit) * (n // unit) + (block(n % unit) if n % unit else b"")
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return b"\x78\xda" + body + final + struct.pack(">I", ((n % 65521) << 16) | 1)  # adler32 of zeros


def png_with_meta(path: Path, meta: dict, key: str = "zimage") -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(key, json.dumps(meta))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=info)
    return path


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":")))


def reset_peak_rss(pid: int | str = "self") -> None:
    """Linux: VmHWM (the peak resident size) starts again from the current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_text_after_the_pixels_is_read_without_decoding_them(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000  # 507 MB of pixels once decoded
    reset_peak_rss()
    before = rss_kib()
    t0 = time.perf_counter()
    params = read_parameters(bomb)
    grown_mib = (rss_kib(field="VmHWM") - before) / 1024
    assert params["prompt"] == "bomb prompt" and params["seed"] == 1 and params["width"] == 64
    assert grown_mib < 20, grown_mib  # chunks are skipped by their length, never inflated
    assert time.perf_counter() - t0 < 1.0


def test_a_huge_image_or_a_compressed_text_bomb_is_refused_or_skipped(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10, 8, 2, 0, 0, 0)) + _chunk(b"IEND", b"")
    )
    with pytest.raises(UnreadableImage, match=r"20000x10 pixels; the loader reads images of at most 16384x16384"):
        read_parameters(huge)
    # a zTXt chunk of a few KB that inflates to 200 MB: left unread past 1 MiB
    zbomb = tmp_path / "ztext.png"
    Image.new("RGB", (8, 8)).save(zbomb)
    body = zbomb.read_bytes()
    ztxt = _chunk(b"zTXt", b"parameters\0\0" + _zlib_zeros(200_000_000))
    zbomb.write_bytes(body[:-12] + ztxt + body[-12:])
    reset_peak_rss()
    before = rss_kib()
    assert read_png_text(zbomb) == {}
    assert (rss_kib(field="VmHWM") - before) / 1024 < 20
    notpng = tmp_path / "notes.png"
    notpng.write_text("not an image")
    with pytest.raises(UnreadableImage, match="not a PNG image"):
        read_parameters(notpng)


def test_malformed_metadata_is_left_out_field_by_field(tmp_path):
    bad = png_with_meta(
        tmp_path / "bad.png",
        {"prompt": "ok", "width": "abc", "height": 64, "seed": -5, "steps": 1e9, "guidance": "nan", "x": 1},
    )
    params, dropped = read_parameters_checked(bad)
    assert params == {"prompt": "ok", "height": 64}
    assert dropped == ["width ('abc')", "seed (-5)", "steps (1000000000.0)", "guidance ('nan')"]
    text_only = tmp_path / "text.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: abc, Seed: 3, Size: 64xZZ")
    Image.new("RGB", (8, 8)).save(text_only, pnginfo=info)
    params, dropped = read_parameters_checked(text_only)
    assert params == {"prompt": "a cat", "seed": 3, "width": 64}
    assert dropped == ["steps ('abc')", "height ('ZZ')"]


# ------------------------------------------------------------------------------------------
# users' folders


def test_each_user_has_a_folder_and_a_history_of_their_own(tmp_path):
    store = OutputStore(tmp_path / "outputs")
    img = Image.new("RGB", (8, 8))
    a, _ = store.save([img], [dict(META, seed=1)], owner="alice")
    b, _ = store.save([img], [dict(META, seed=2)], owner="bob")
    shared, _ = store.save([img], [dict(META, seed=3)])
    assert Path(a[0]).parent == store.root / "alice" and Path(b[0]).parent == store.root / "bob"
    assert Path(shared[0]).parent == store.root
    assert [p.name for p in store.history(owner="alice")] == [Path(a[0]).name]
    assert [p.name for p in store.history(owner="bob")] == [Path(b[0]).name]
    assert [p.name for p in store.history()] == [Path(shared[0]).name]  # the shared space
    assert len(store.history(owner=None)) == 3  # an admin's view
    # a link planted as a user's folder is neither listed nor written through
    (store.root / "mallory").symlink_to(store.root / "alice", target_is_directory=True)
    assert store.history(owner="mallory") == []
    with pytest.raises(OSError, match="not a plain folder"):
        store.save([img], [META], owner="mallory")
    assert len(store.history(owner="alice")) == 1


@pytest.mark.parametrize("user", ["Alice", "../x", "a b", "x.png", "é", ".hidden", "a" * 200])
def test_user_folder_names_are_plain_and_distinct(user):
    name = user_folder_name(user)
    assert "/" not in name and name not in ("", ".", "..") and not name.startswith(".")
    assert name != user.lower()  # anything unusual gets a hash: no two users share a folder
    assert user_folder_name("alice") == "alice" and user_folder_name("Alice") != "alice"


def test_the_purge_keeps_each_users_folder_in_bounds(tmp_path):
    from zimage.ops.purge import PurgePolicy, Purger

    store = OutputStore(tmp_path)
    img = Image.new("RGB", (8, 8))
    old = store.save([img], [META], owner="alice")[0][0]
    os.utime(old, (time.time() - 10 * 3600,) * 2)
    new = store.save([img], [META], owner="bob")[0][0]
    Purger(tmp_path, policy=PurgePolicy(max_age_s=3600, max_count=0, max_bytes=0)).run_once()
    assert not Path(old).exists() and Path(new).exists()


# ------------------------------------------------------------------------------------------
# the path rule


@pytest.fixture
def rule(tmp_path):
    from zimage.web.guard import Access, Viewer

    store = OutputStore(tmp_path / "outputs")
    cache = tmp_path / "cache"
    (cache / "abc").mkdir(parents=True)
    access = Access(store, users=[("alice", "x"), ("bob", "y"), ("root", "z")], admins=("root",), cache_dir=cache)
    img = Image.new("RGB", (8, 8))
    files = {
        "alice": Path(store.save([img], [META], owner="alice")[0][0]),
        "bob": Path(store.save([img], [META], owner="bob")[0][0]),
    }
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = store.folder_for("bob") / output_name(99)
    link.symlink_to(secret)
    upload = cache / "abc" / "upload.png"
    upload.write_bytes(b"x")
    viewers = {u: Viewer(u, u == "root") for u in ("alice", "bob", "root")}
    return access, files, secret, link, upload, viewers


def test_the_path_rule(rule):
    from zimage.web.guard import Refused

    access, files, secret, link, upload, v = rule
    assert access.check(files["bob"], v["bob"]) == files["bob"]
    assert access.check(files["alice"], v["root"]) == files["alice"]  # admins see every space
    refused = {
        "another user's image": (files["alice"], v["bob"], "is not one of your images"),
        "a link in one's own folder": (link, v["bob"], "is a link"),
        "a file elsewhere": (secret, v["bob"], "only those can be used here"),
        "a walk up and over": (f"{files['bob'].parent}/../alice/{files['alice'].name}", v["bob"], "not one of your"),
        "an address": ("http://169.254.169.254/latest", v["bob"], "never fetched"),
        "an upload nobody was granted": (upload, v["bob"], "not one of your images or uploads"),
        "nothing": ("", v["bob"], "none was named"),
    }
    for what, (path, viewer, message) in refused.items():
        with pytest.raises(Refused, match=message):
            access.check(path, viewer)
        assert what
    access.grant(upload, v["alice"])
    assert access.check(upload, v["alice"]) == upload
    with pytest.raises(Refused):
        access.check(upload, v["bob"])
    access.grant(upload, v["bob"])  # bob uploads the very same file: now it is both users'
    assert access.check(upload, v["bob"]) == access.check(upload, v["alice"]) == upload
    # every file reference in a payload, however nested
    with pytest.raises(Refused):
        access.check_payload({"value": [{"image": {"path": str(files["alice"])}}]}, v["bob"])
    access.check_payload([{"path": str(files["bob"])}, "just text"], v["bob"])


def test_sessions_belong_to_their_first_user(rule):
    access, _, _, _, _, v = rule
    assert access.claim("s1", v["alice"]) and access.claim("s1", v["alice"])
    assert not access.claim("s1", v["bob"])


def test_an_outputs_folder_holding_secrets_is_refused(tmp_path, monkeypatch):
    from zimage.web.server import check_outputs_dir, checkout_folder

    auth = tmp_path / "team" / "users.txt"
    auth.parent.mkdir()
    auth.write_text("alice:pw\n")
    cases = {
        "/": "is the root of the file system",
        str(Path.home()): "is the home folder",
        str(checkout_folder()): "is the checkout",
        str(tmp_path / "team"): "holds the auth file",
    }
    monkeypatch.chdir(tmp_path)
    for outputs, message in cases.items():
        with pytest.raises(SettingsError, match=message):
            check_outputs_dir(outputs, None, str(auth))
    with pytest.raises(SettingsError, match="holds the settings file"):
        check_outputs_dir(str(tmp_path), None, None)  # the working folder, where zimage.yaml is read
    check_outputs_dir(str(tmp_path / "outputs"), None, str(auth))  # a folder of its own: fine


# ------------------------------------------------------------------------------------------
# throttles and quotas


def test_failed_logins_wait_longer_and_longer():
    from zimage.web.limits import LoginThrottle

    t = LoginThrottle(max_delay_s=8)
    keys = ("user:alice", "address:1.2.3.4")
    delays = [t.failure(keys)[1] for _ in range(10)]
    assert delays == [0, 0, 0, 0, 1, 2, 4, 8, 8, 8]
    assert 7 < t.wait(keys) <= 8
    assert t.wait(("user:bob", "address:5.6.7.8")) == 0  # others are not held up
    t.success(keys)
    assert t.wait(keys) == 0
    assert LoginThrottle(max_delay_s=0).delay(50) == 0  # 0 turns it off


def test_upload_quota_counts_bytes_and_files_per_user():
    from zimage.web.limits import UploadQuota

    q = UploadQuota(max_bytes=1000, max_files=3)
    assert q.check("user:a", 600)[0] is None
    q.record("user:a", 600, 1)
    refusal, _ = q.check("user:a", 600)
    assert "quota is 0 MB per hour" in refusal or "does not fit" in refusal
    assert q.check("user:b", 600)[0] is None  # each user has their own
    q.record("user:a", 10, 2)
    refusal, _ = q.check("user:a", 1)
    assert "uploaded 3 files in the last hour" in refusal


def test_sending_the_same_files_again_is_free_of_the_quota_but_limited_per_minute():
    """Gradio stores an upload under the SHA-256 of its bytes: a repeat adds nothing to the disk
    (the image editor repeats its layers on every page update while it holds strokes)."""
    from zimage.web.limits import REPEAT_BYTES_PER_MINUTE, REPEATS_PER_MINUTE, UploadQuota

    q = UploadQuota(max_bytes=1000, max_files=2)
    assert q.record("user:a", 400, 2, ["/c/h1/background.png", "/c/h2/layer_0.png"]) is True
    for _ in range(REPEATS_PER_MINUTE - 1):
        assert q.record("user:a", 400, 2, ["/c/h1/background.png", "/c/h2/layer_0.png"]) is False
    assert "uploaded 2 files in the last hour" in q.check("user:a", 0)[0]  # the repeats added none
    assert q.record("user:b", 400, 2, ["/c/h1/background.png", "/c/h2/layer_0.png"]) is True  # per key
    q2 = UploadQuota(max_bytes=1000, max_files=10)
    q2.record("user:a", 100, 1, ["/c/h1/background.png"])
    for _ in range(REPEATS_PER_MINUTE):
        q2.record("user:a", 100, 1, ["/c/h1/background.png"])
    assert q2.check("user:a", 100)[0] is not None and "again within a minute" in q2.check("user:a", 100)[0]
    q4 = UploadQuota(max_bytes=0, max_files=0)  # no hourly quota: the repeats' bytes still have a cap
    q4.record("user:a", 200_000_000, 1, ["/c/big/x.png"])
    for _ in range(REPEAT_BYTES_PER_MINUTE // 200_000_000 + 1):
        q4.record("user:a", 200_000_000, 1, ["/c/big/x.png"])
    assert "MB) again within a minute" in q4.check("user:a", 1)[0]
    q3 = UploadQuota(max_bytes=1000, max_files=10)
    q3.record("user:a", 100, 1, ["/c/h1/background.png"])
    q3.record("user:a", 100, 1, ["/c/h1/background.png", "/c/h3/new.png"])  # one new file: counted
    assert q3.check("user:a", 801)[0] is not None and q3.check("user:a", 800)[0] is None


def test_the_page_says_whether_people_share_one_space(engine, make_settings):
    from zimage.web.handlers import Studio

    shared = Studio(engine, None, make_settings()).space_note()
    assert "No logins are set up: everyone who opens this page shares one history" in shared
    own = Studio(engine, None, make_settings(auth=("alice:pw",))).space_note()
    assert own == "Only you see your images (each login has its own)."
