"""Security on a real server (python app.py, tiny model) with logged-in users, driven over HTTP the
way a hostile teammate would: alice and bob (users), root (an admin), carol (for the upload quota).

The path rule is tried on every event handler the page has, read from the running app's /config,
so a handler added later is tried without anyone adding it here. One server serves the module;
the login-throttle test comes last (it holds up logins from this address for a few seconds).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .support import App, metric, run_python, wait_running, wait_until
from .test_security_rules import png_bomb, png_with_meta, reset_peak_rss, rss_kib

pytestmark = pytest.mark.slow

USERS = {"alice": "pa", "bob": "pb", "root": "pr", "carol": "pc"}
SECRET = b"\x89PNG\r\n\x1a\n" + b"TOP-SECRET-" * 20
MAX_JOBS = 2
HUGE = [512, 512, 50, 0.0, 1, 8]  # width, height, steps, guidance, seed, count: runs until cancelled
SMALL = [64, 64, 2, 0.0, 5, 1]
LEAKS = ("Traceback", "object at 0x", "invalid literal", 'File "', "Exception")


@dataclass
class Site:
    server: Any
    work: Path
    secret: Path
    link: Path  # a link in bob's outputs, named like an output, to the secret
    http: dict[str, Any] = field(default_factory=dict)  # logged-in httpx clients
    config: dict[str, Any] = field(default_factory=dict)
    alice_png: Path | None = None  # alice's image in outputs/alice/
    alice_shown: str = ""  # Gradio's cached copy of it, as shown to alice

    @property
    def url(self) -> str:
        return self.server.url

    def fn(self, name: str) -> int:
        return next(d["id"] for d in self.config["dependencies"] if d.get("api_name") == name)

    def dep(self, name: str) -> dict[str, Any]:
        return next(d for d in self.config["dependencies"] if d.get("api_name") == name)


def login(url: str, user: str) -> Any:
    import httpx

    http = httpx.Client(base_url=url, timeout=60)
    r = http.post("/login", data={"username": user, "password": USERS[user]})
    assert r.status_code == 200, r.text
    return http


def fd(path: Any) -> dict[str, Any]:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": Path(str(path)).name}


def direct(http, fn: int, data: list, session: str, event_data: Any = None):
    """A handler called straight (queue=False handlers answer on /gradio_api/run/predict)."""
    body = {"fn_index": fn, "data": data, "session_hash": session, "event_data": event_data}
    return http.post("/gradio_api/run/predict", json=body)


def queued(http, fn: int, data: list, session: str, event_data: Any = None) -> tuple[int, dict[str, Any]]:
    """(join status, the completed message or the refusal): a queued handler, as the page calls it."""
    body = {"fn_index": fn, "data": data, "session_hash": session, "event_data": event_data}
    r = http.post("/gradio_api/queue/join", json=body)
    if r.status_code != 200:
        return r.status_code, r.json()
    event_id = r.json()["event_id"]
    with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    return 200, msg
    raise AssertionError("the queue stream ended without the result")


def call(site: Site, http, dep: dict[str, Any], data: list, session: str, event_data: Any = None) -> tuple[int, str]:
    """(status, the text the client got) for any handler; queued ones report 200 and their message."""
    if dep["queue"] is False:
        r = direct(http, dep["id"], data, session, event_data)
        return r.status_code, r.text
    status, msg = queued(http, dep["id"], data, session, event_data)
    return status, json.dumps(msg)


def upload(http, name: str, content: bytes):
    return http.post("/gradio_api/upload", files=[("files", (name, content, "image/png"))])


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_dir):
    work = tmp_path_factory.mktemp("security")
    users = work / "team-users.txt"
    users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    (work / "zimage.yaml").write_text("png_compress_level: 1\n")  # read at start: a settings file to protect
    secret = work / "secret.png"
    secret.write_bytes(SECRET)
    server = App(
        work,
        tiny_dir,
        "--auth-file",
        str(users),
        "--admins",
        "root",
        "--max-jobs-per-user",
        str(MAX_JOBS),
        "--max-upload-mb",
        "1",
        "--upload-quota-mb",
        "3",
        "--login-max-delay-s",
        "4",
    ).wait_ready()
    from zimage.service.store import output_name

    link = server.outputs / "bob" / output_name(424242)
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    s = Site(server, work, secret, link)
    s.http = {u: login(server.url, u) for u in USERS}
    s.config = s.http["bob"].get("/config").json()
    # alice makes an image; her history shows it (Gradio copies it into its cache for her)
    status, msg = queued(s.http["alice"], s.fn("generate"), ["alice's secret prompt", "", *SMALL], "alice-gen")
    assert status == 200 and msg["success"], msg
    name = msg["output"]["data"][1]["files"][0]
    s.alice_png = server.outputs / "alice" / name
    assert s.alice_png.is_file()
    r = direct(s.http["alice"], s.fn("history"), [], "alice-page")
    assert r.status_code == 200, r.text
    s.alice_shown = r.json()["data"][0][0]["image"]["path"]
    yield s
    for http in s.http.values():
        http.close()
    server.kill()  # the graceful stop is test_shutdown's; here it would only cost time


# ------------------------------------------------------------------------------------------
# one rule for files, over every handler


def test_every_handler_refuses_files_that_are_not_the_askers(site):
    bob = site.http["bob"]
    handlers = [d for d in site.config["dependencies"] if d.get("backend_fn")]
    assert len(handlers) >= 15, [d.get("api_name") for d in handlers]  # the page's own, read from the app
    targets = {
        "a planted secret": site.secret,
        "a link in bob's outputs": site.link,
        "alice's image": site.alice_png,
        "alice's shown copy": site.alice_shown,
        "an address": "http://127.0.0.1:1/x.png",
    }
    tried = 0
    for dep in handlers:
        for what, target in targets.items():
            select = {"index": 0, "value": {"image": fd(target), "caption": "x"}, "selected": True}
            payloads = [([None] * len(dep["inputs"]), select)]
            if dep["inputs"]:
                payloads.append(([fd(target)] * len(dep["inputs"]), None))
            for data, event in payloads:
                status, text = call(site, bob, dep, data, f"bob-{tried}", event)
                tried += 1
                assert status in (200, 400), (dep["api_name"], what, status, text)
                assert status == 400 or dep["queue"] is not False, (dep["api_name"], what, text)
                said = json.loads(text) if status == 400 else json.loads(text)["output"]
                assert (
                    "not one of your" in said["error"]
                    or "is a link" in said["error"]
                    or "never fetched" in said["error"]
                ), (dep["api_name"], what, said)
                assert "TOP-SECRET" not in text and "alice's secret prompt" not in text
                assert not any(leak in text for leak in LEAKS), text
    assert tried > 100
    # nothing of the secret reached Gradio's cache, so nothing of it can be fetched from there
    cached = [p for p in (site.work / "gradio").rglob("*") if p.is_file()]
    assert cached and not [p for p in cached if p.read_bytes() == SECRET]
    assert "Traceback" not in site.server.log()


def test_own_uploads_and_images_still_work(site):
    """The other side of the rule: bob's own upload and alice's own shown copy are theirs to use."""
    bob = site.http["bob"]
    meta = {"prompt": "bob's fox", "seed": 9, "width": 64, "height": 96, "steps": 2, "guidance": 0.0}
    png = png_with_meta(site.work / "bob.png", meta)
    r = upload(bob, "bob.png", png.read_bytes())
    assert r.status_code == 200, r.text
    r = direct(bob, site.fn("load_png"), [fd(r.json()[0])], "bob-load")
    assert r.status_code == 200, r.text
    params_md, prompt = r.json()["data"][1:3]  # [0] is the page's State: it stays on the server
    assert "bob's fox" in params_md and prompt == "bob's fox"
    select = {"index": 0, "value": {"image": fd(site.alice_shown), "caption": "x"}, "selected": True}
    r = direct(site.http["alice"], site.fn("select_image"), [], "alice-page", select)
    assert r.status_code == 200 and "alice's secret prompt" in r.json()["data"][1], r.text


def test_the_file_route_serves_only_the_askers_own_images(site):
    bob, alice, root = site.http["bob"], site.http["alice"], site.http["root"]

    def get(http, path):
        return http.get(f"/gradio_api/file={path}")

    for path in (
        site.secret,
        site.link,
        site.work / "team-users.txt",
        site.work / "zimage.yaml",
        site.work / "app.log",
        "/etc/passwd",
        site.alice_png,
        site.alice_shown,
        f"{site.server.outputs}/bob/../alice/{site.alice_png.name}",
    ):
        r = get(bob, path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert b"TOP-SECRET" not in r.content and b"alice:" not in r.content
        assert "not one of" in r.json()["detail"] or "is a link" in r.json()["detail"], r.text
    assert get(alice, site.alice_png).status_code == 200
    assert get(alice, site.alice_shown).status_code == 200
    assert get(root, site.alice_png).status_code == 200  # an admin sees everything
    import httpx

    anonymous = httpx.get(f"{site.url}/gradio_api/file={site.alice_png}")
    assert anonymous.status_code == 401


# ------------------------------------------------------------------------------------------
# users are kept apart


def test_bob_cannot_list_load_or_cancel_alices_work(site):
    import httpx
    from gradio_client import Client

    bob, alice = site.http["bob"], site.http["alice"]

    def listed(http, session):
        r = direct(http, site.fn("history"), [], session)
        assert r.status_code == 200, r.text
        return [Path(item["image"]["orig_name"] or item["image"]["path"]).name for item in r.json()["data"][0]]

    assert site.alice_png.name in listed(alice, "alice-page")
    assert site.alice_png.name not in listed(bob, "bob-page") and site.link.name not in listed(bob, "bob-page")
    assert site.alice_png.name in listed(site.http["root"], "root-page")
    # her shown copy named in a select: refused (the every-handler test tries the rest)
    select = {"index": 0, "value": {"image": fd(site.alice_shown)}}
    r = direct(bob, site.fn("select_image"), [], "bob-page", select)
    assert r.status_code == 400 and "alice's secret prompt" not in r.text

    # cancel: bob names alice's session on Gradio's /cancel, on the studio's cancel, on her stream
    client = Client(site.url, auth=("alice", USERS["alice"]), verbose=False)
    job = client.submit("a long one", "", *HUGE, api_name="/generate")
    wait_running(site.url)
    her = client.session_hash
    gen = site.fn("generate")
    r = bob.post("/gradio_api/cancel", json={"session_hash": her, "fn_index": gen, "event_id": "x"})
    assert r.status_code == 403 and "another user" in r.json()["detail"]
    r = bob.post("/gradio_api/queue/join", json={"fn_index": site.fn("cancel"), "data": [], "session_hash": her})
    assert r.status_code == 403
    assert bob.get("/gradio_api/queue/data", params={"session_hash": her}).status_code == 403
    assert bob.get(f"/gradio_api/heartbeat/{her}").status_code == 403
    anonymous = httpx.post(
        f"{site.url}/gradio_api/cancel", json={"session_hash": her, "fn_index": gen, "event_id": "x"}
    )
    assert anonymous.status_code == 401
    assert metric(site.url, "zimage_running_jobs") == 1 and not job.done()  # hers runs on
    assert job.cancel()  # her own cancel works
    wait_until(lambda: metric(site.url, "zimage_running_jobs") == 0, 30, "her job to stop")
    client.close()


def test_every_route_but_the_probes_needs_a_login(site):
    import httpx

    for path in ("/config", "/gradio_api/info", "/gradio_api/startup-events", "/gradio_api/heartbeat/x"):
        assert httpx.get(site.url + path).status_code == 401, path
    for path in ("/gradio_api/cancel", "/gradio_api/upload", "/gradio_api/queue/join", "/gradio_api/run/predict"):
        assert httpx.post(site.url + path, json={}).status_code == 401, path
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(site.url + path).status_code == 200, path
    # Gradio routes the studio does not use are closed, logged in or not
    assert site.http["bob"].post("/gradio_api/process_recording").status_code == 404


# ------------------------------------------------------------------------------------------
# limits


def test_a_decompression_bomb_does_not_grow_the_server(site):
    bob = site.http["bob"]
    bomb = png_bomb(site.work / "bomb.png")
    r = upload(bob, "bomb.png", bomb.read_bytes())
    assert r.status_code == 200, r.text
    path = r.json()[0]
    pid = site.server.proc.pid
    reset_peak_rss(pid)
    before = rss_kib(pid)
    results: list = []

    def drop(i: int) -> None:
        results.append(direct(bob, site.fn("load_png"), [fd(path)], f"bob-bomb-{i}"))

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(4)]  # four at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    grown_mib = (rss_kib(pid, "VmHWM") - before) / 1024
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert all("bomb prompt" in r.text for r in results)
    assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"


def test_uploads_have_a_size_limit_and_a_quota_per_user(site):
    carol, bob = site.http["carol"], site.http["bob"]
    too_big = upload(carol, "big.png", os.urandom(1_500_000))  # --max-upload-mb 1
    assert too_big.status_code == 413
    for i in range(3):  # 3 x 0.9 MB within the 3 MB an hour
        assert upload(carol, f"c{i}.png", os.urandom(900_000)).status_code == 200
    r = upload(carol, "c3.png", os.urandom(900_000))
    assert r.status_code == 429 and "upload quota is 3 MB per hour" in r.json()["detail"], r.text
    assert upload(bob, "b.png", os.urandom(900_000)).status_code == 200  # others are not held up
    assert "upload refused for user:carol" in site.server.log()


def test_one_user_cannot_fill_the_queue(site):
    from gradio_client import Client

    alice, bob = site.http["alice"], site.http["bob"]
    gen = site.fn("generate")
    clients = [Client(site.url, auth=("alice", USERS["alice"]), verbose=False) for _ in range(MAX_JOBS)]
    jobs = [c.submit(f"long {i}", "", *HUGE, api_name="/generate") for i, c in enumerate(clients)]
    wait_running(site.url)
    wait_until(lambda: metric(site.url, "zimage_queue_depth") >= 1, 30, "her second job waiting behind her first")
    refused = metric(site.url, "zimage_requests_total", {"outcome": "rejected"}) or 0
    r = alice.post(
        "/gradio_api/queue/join", json={"fn_index": gen, "data": ["one more", "", *SMALL], "session_hash": "a3"}
    )
    assert r.status_code == 429 and f"already have {MAX_JOBS} job(s)" in r.json()["detail"], r.text
    assert metric(site.url, "zimage_requests_total", {"outcome": "rejected"}) == refused + 1
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(r=queued(bob, gen, ["bob's turn", "", *SMALL], "bob-q")))
    waiter.start()
    wait_until(lambda: metric(site.url, "zimage_queue_depth") >= 2, 30, "bob's job in the queue behind hers")
    assert not result, "bob waits for the GPU like anyone"
    for job in jobs:
        job.cancel()
    waiter.join(120)
    status, msg = result["r"]
    assert status == 200 and msg["success"], msg  # bob got in and got his image
    assert msg["output"]["data"][1]["files"][0] in os.listdir(site.server.outputs / "bob")
    for c in clients:
        c.close()


# ------------------------------------------------------------------------------------------
# what users see: sentences


def test_handler_errors_are_sentences(site):
    from gradio_client import Client

    bob = site.http["bob"]
    cases = [
        (site.fn("pick_preset"), ["16:9", "abc"], "Value: 'abc' is not in the list of choices: [256, 512"),
        (site.fn("custom_size"), [{"a": 1}, [2]], "The values sent could not be used: this action takes 2"),
        (
            site.fn("negative_state"),
            ["abc"],
            "The values sent could not be used: this action takes 1 value(s) (guidance)",
        ),
        (site.fn("pick_preset"), [], "This action takes 2 value(s)"),
    ]
    for fn, data, message in cases:
        r = direct(bob, fn, data, "bob-errors")
        assert r.status_code == 400 and message in r.json()["error"], (data, r.text)
        assert not any(leak in r.text for leak in LEAKS), r.text
    status, msg = queued(bob, site.fn("generate"), ["a cat"], "bob-few")
    assert status == 200 and "This action takes 8 value(s) (prompt, negative prompt" in msg["output"]["error"]
    assert not any(leak in json.dumps(msg) for leak in LEAKS)
    # malformed metadata in a dropped PNG: the fields that make sense, and a sentence for the rest
    meta = {"prompt": "a fox", "width": "abc", "height": 96, "steps": 2, "seed": 4}
    r = upload(bob, "odd.png", png_with_meta(site.work / "odd.png", meta).read_bytes())
    r = direct(bob, site.fn("load_png"), [fd(r.json()[0])], "bob-errors")
    assert r.status_code == 200, r.text
    md, prompt, _negative, width, height, steps = r.json()["data"][1:7]
    assert (prompt, width, height, steps) == ("a fox", {"__type__": "update"}, 96, 2), r.json()["data"]
    assert "Left out what could not be read: width ('abc')" in md and "invalid literal" not in r.text
    # too few arguments from the API: every input has a default
    client = Client(site.url, auth=("bob", USERS["bob"]), verbose=False)
    gallery, details = client.predict("a cat", api_name="/generate")
    assert len(gallery) == 1 and details["prompt"] == "a cat"
    client.close()


def test_an_outputs_folder_that_holds_secrets_is_refused_at_start(tmp_path):
    from .support import ROOT

    r = run_python([str(ROOT / "app.py"), "--model", "tiny", "--outputs-dir", str(ROOT)], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "is the checkout" in r.stderr and "Traceback" not in r.stderr


def test_failed_logins_wait_longer_each_time_and_are_logged(site):
    """Last: it holds up logins from this address for a few seconds."""
    import httpx

    def attempt(user: str, password: str):
        return httpx.post(site.url + "/login", data={"username": user, "password": password})

    assert [attempt("dave", "guess").status_code for _ in range(5)] == [400] * 5  # a few typos are free
    r = attempt("dave", "guess")
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "wait 1 s" in r.json()["detail"]
    assert attempt("alice", USERS["alice"]).status_code == 429  # this address is held up, whoever it names
    time.sleep(1.05)
    assert attempt("dave", "guess").status_code == 400
    r = attempt("dave", "guess")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"  # twice as long now
    time.sleep(2.05)
    assert attempt("alice", USERS["alice"]).status_code == 200  # a success from the address clears it
    log = site.server.log()
    assert "login failed for 'dave' from 127.0.0.1 (6 failure(s) in a row); the next attempt must wait 2 s" in log
    assert "login attempt for 'dave' from 127.0.0.1 refused: throttled" in log
