"""The real server (python app.py with the tiny model) in a subprocess on a free port, driven over
HTTP with gradio_client and httpx.

One server runs for the whole module (starting one costs ~10 s); it is built in a fresh tiny-model
folder so that its loading window (building the tiny model) is long enough to watch /ready say 503.
The graceful drain on SIGTERM and request_exit's exit code are tested in test_shutdown.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .support import App, free_port, generate, http_get, metric, run_python, status_of, submit, wait_running, wait_until

pytestmark = pytest.mark.slow  # a real server in a subprocess, and app.py runs

USER = ("alice", "wonder land:42")  # a password with a space and a colon
QUEUE_SIZE = 2

# A job that would run for many seconds: it holds the GPU while others queue, then it is cancelled.
HUGE = dict(width=512, height=512, steps=50, count=8)


# ------------------------------------------------------------------------------------------
# fixtures


class EarlyRequest:
    """A request made while the model loads: it waits in the queue and says so."""

    def __init__(self):
        self.job = None
        self.descs: list[str] = []
        self.thread: threading.Thread | None = None

    def __call__(self, server: App) -> None:
        self.job = submit(new_client(server), width=64, height=64, steps=2, seed=3)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.job.done():
            for unit in self.job.status().progress_data or []:
                if unit.desc and unit.desc not in self.descs:
                    self.descs.append(unit.desc)
            time.sleep(0.02)


@pytest.fixture(scope="module")
def early():
    return EarlyRequest()


@pytest.fixture(scope="module")
def server(tmp_path_factory, early):
    work = tmp_path_factory.mktemp("server")
    # a fresh tiny folder: building it makes a loading window of several seconds to observe
    srv = App(
        work,
        work / "tiny",
        "--auth",
        f"{USER[0]}:{USER[1]}",
        "--queue-size",
        str(QUEUE_SIZE),
        "--share",  # with auth: allowed; offline the link fails softly
    )
    srv.wait_ready(on_up=early)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, auth=USER, verbose=False)


def new_client(server):
    from gradio_client import Client

    return Client(server.url, auth=USER, verbose=False)


def gpu_interval(details: dict) -> tuple[float, float]:
    """When a job held the GPU: from the moment it got it, for as long as the engine measured."""
    return details["started_at"], details["started_at"] + details["timings"]["total_s"]


def no_overlap(intervals: list[tuple[float, float]], slack: float = 0.005) -> bool:
    ordered = sorted(intervals)
    return all(b[0] >= a[1] - slack for a, b in zip(ordered, ordered[1:]))


# ------------------------------------------------------------------------------------------
# policy checks that never start a server


def _app(*args: str, env: dict | None = None):
    return run_python(["app.py", *args], env=env, timeout=60)


def test_share_without_auth_is_refused(tmp_path):
    r = _app("--model", "tiny", "--share", "--port", str(free_port()), "--outputs-dir", str(tmp_path))
    assert r.returncode == 2
    assert "--share" in r.stderr and "--auth user:password" in r.stderr and "--share-without-auth" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_bad_auth_file_and_entries_are_refused(tmp_path):
    missing = tmp_path / "nope.txt"
    r = _app("--model", "tiny", "--auth-file", str(missing), "--outputs-dir", str(tmp_path))
    assert r.returncode == 2 and "auth_file" in r.stderr and str(missing) in r.stderr
    bad = tmp_path / "users.txt"
    bad.write_text("# team\nbob:secret\njust-a-name\n")
    r = _app("--model", "tiny", "--auth-file", str(bad), "--outputs-dir", str(tmp_path))
    assert r.returncode == 2 and "line 3" in r.stderr and "user:password" in r.stderr
    r = _app("--model", "tiny", "--outputs-dir", str(tmp_path), env={"ZIMAGE_AUTH": "carol:"})
    assert r.returncode == 2 and "empty password" in r.stderr
    assert "Traceback" not in r.stderr


def test_read_users_merges_flags_and_file(tmp_path):
    from zimage.errors import SettingsError
    from zimage.settings import Settings
    from zimage.web.server import check_share, read_users

    f = tmp_path / "users"
    f.write_text("bob:pa:ss\n\n# comment\n dave:x \n")
    s = Settings(auth=("alice:one",), auth_file=str(f))
    assert read_users(s) == [("alice", "one"), ("bob", "pa:ss"), ("dave", "x")]
    check_share(s.replace(share=True), read_users(s))  # auth set: fine
    check_share(Settings(share=True, share_without_auth=True), [])  # on purpose: fine
    with pytest.raises(SettingsError, match="needs a login"):
        check_share(Settings(share=True), [])


# ------------------------------------------------------------------------------------------
# the running server


def test_page_is_up_before_the_model_and_ready_says_why(server):
    first_up = next(o for o in server.observed if o[1] == 200)
    _, health, ready, body = first_up
    assert health == 200 and ready == 503, server.observed[:5]
    assert body["ready"] is False and body["reason"].startswith("loading the model:")
    assert "stage" in body and "percent" in body and "elapsed_s" in body
    r = http_get(server.url + "/ready")
    assert r.status_code == 200
    ok = r.json()
    assert ok["ready"] is True and ok["memory_mode"] == "cpu" and ok["model"] == "tiny" and ok["load_seconds"] > 0
    h = http_get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_a_request_made_while_loading_waits_and_says_so(server, early):
    gallery, details = early.job.result(timeout=120)
    assert details["seeds"] == [3] and len(gallery) == 1
    early.thread.join(10)
    assert any(d.startswith("Waiting for the model to load") for d in early.descs), early.descs


def test_a_model_that_fails_to_load_is_reported_by_ready_and_the_ui(make_settings, tmp_path):
    """In process (uvicorn on a thread, a real HTTP server): importing Gradio again costs ~10 s."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from zimage.web.server import create_app

    missing = tmp_path / "no-such-model"
    settings = make_settings(model=str(missing), host="127.0.0.1", port=free_port())
    web = create_app(settings)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(web.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:

        def failed():
            r = http_get(url + "/ready")  # None while not listening yet
            return r if r is not None and "failed to load" in r.json()["reason"] else None

        r = wait_until(failed, 60, "/ready to report the failed load", 0.1)
        body = r.json()
        assert r.status_code == 503
        assert body["reason"].startswith("the model failed to load:") and str(missing) in body["reason"]
        assert status_of(url + "/health") == 200  # still serving, saying why
        with pytest.raises(AppError, match="The model failed to load"):
            generate(Client(url, verbose=False), width=64, height=64)
    finally:
        web.request_exit(0)
        thread.join(60)
    assert codes == [0]


def test_generate_returns_the_requested_size_and_the_seed_it_reports(server, client):
    from PIL import Image

    from zimage.service.store import read_parameters

    gallery, details = generate(client, width=128, height=96, seed=-1, count=2)
    assert len(gallery) == 2 and details["count"] == 2
    seeds = details["seeds"]
    assert seeds[1] == seeds[0] + 1 and details["seed"] == seeds[0]
    for item, seed in zip(gallery, seeds):
        with Image.open(item["image"]) as im:
            assert im.size == (128, 96) and im.format == "PNG"
        params = read_parameters(item["image"])
        assert params["seed"] == seed and params["width"] == 128 and params["height"] == 96
        assert item["caption"] == f"seed {seed}"
    for name in details["files"]:  # our PNGs, saved in the outputs folder
        assert (server.outputs / USER[0] / name).is_file()  # the logged-in user's own folder
    t = details["timings"]
    assert t["total_s"] > 0 and len(t["steps_s"]) == 4 and t["png_s"] is not None
    assert details["memory_mode"] == "cpu"

    gallery, details = generate(client, width=64, height=160, seed=1234, steps=2)
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (64, 160)
    assert details["seeds"] == [1234] and read_parameters(gallery[0]["image"])["seed"] == 1234


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"width": 100}, "Width must be a multiple of 16 between 64 and 2048 (got 100). Try 96."),
        ({"height": 4096}, "Height must be a multiple of 16 between 64 and 2048 (got 4096)."),
        ({"width": 32}, "Width must be a multiple of 16 between 64 and 2048 (got 32)."),
        ({"width": "wide"}, "Width must be a multiple of 16 between 64 and 2048 (got 'wide')."),
        ({"count": 100}, "Count must be a whole number from 1 to 8 (got 100)."),
        ({"steps": 0}, "Steps must be a whole number from 1 to 50 (got 0)."),
        ({"prompt": "   "}, "Prompt must be a non-empty text"),
        ({"seed": -7}, "Seed must be -1 (random) or a whole number"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_server_stays_ready(server, client, kw, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        generate(client, **kw)
    text = str(info.value)
    assert message in text
    assert "Traceback" not in text and 'File "' not in text
    assert status_of(server.url + "/ready") == 200


def test_server_still_generates_after_bad_input(server, client):
    gallery, details = generate(client, width=96, height=96, seed=7)
    assert details["seeds"] == [7] and len(gallery) == 1


def test_metrics_are_prometheus_text(server, client):
    generate(client, width=64, height=64, steps=2)
    r = http_get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in (
        "zimage_requests_total",
        "zimage_request_seconds_bucket",
        "zimage_queue_depth",
        "zimage_images_total",
        "zimage_vram_bytes",  # declared; on the CPU it has no samples
        "zimage_host_rss_bytes",
        "zimage_oom_total",
        "zimage_model_load_seconds",
    ):
        assert family in text, family
    assert metric(server.url, "zimage_requests_total", {"outcome": "ok"}) >= 1
    assert metric(server.url, "zimage_requests_total", {"outcome": "invalid"}) >= 1
    assert metric(server.url, "zimage_request_seconds_count") >= 1
    assert metric(server.url, "zimage_images_total") >= 1
    assert metric(server.url, "zimage_model_load_seconds") > 0
    assert metric(server.url, "zimage_host_rss_bytes") > 0
    assert metric(server.url, "zimage_oom_total") == 0


def test_burst_beyond_the_queue_is_partly_refused_fast_and_the_rest_complete(server):
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    rejected_before = metric(server.url, "zimage_requests_total", {"outcome": "rejected"}) or 0
    burst = QUEUE_SIZE + 3
    clients = [new_client(server) for _ in range(burst)]
    holder_client = new_client(server)
    holder = submit(holder_client, seed=1, **HUGE)
    wait_running(server.url)

    outcomes: list[tuple[str, float, object]] = []
    lock = threading.Lock()

    def one(i: int):
        t0 = time.monotonic()
        try:
            result = generate(clients[i], width=64, height=64, steps=2, seed=100 + i)
            with lock:
                outcomes.append(("ok", time.monotonic() - t0, result))
        except (QueueError, AppError, ValueError) as exc:  # refused: the queue is full
            with lock:
                outcomes.append(("refused", time.monotonic() - t0, str(exc)))

    with ThreadPoolExecutor(burst) as pool:
        futures = [pool.submit(one, i) for i in range(burst)]

        # the refusals come back while the holder still runs; then free the GPU for the rest
        def all_refused() -> bool:
            with lock:
                return sum(o[0] == "refused" for o in outcomes) >= burst - QUEUE_SIZE

        wait_until(all_refused, 60, "the refusals", 0.05)
        assert not holder.done(), "the holder must still run while the burst arrives"
        assert holder.cancel()  # gradio_client's own cancel reaches the engine and stops the run
        for f in futures:
            f.result(timeout=120)

    refused = [o for o in outcomes if o[0] == "refused"]
    done = [o for o in outcomes if o[0] == "ok"]
    assert len(refused) == burst - QUEUE_SIZE and len(done) == QUEUE_SIZE, outcomes
    for _, seconds, message in refused:
        assert "Queue is full" in message
        assert seconds < 15, "a refusal must come at once, not after waiting"
    for _, _, (gallery, details) in done:
        assert len(gallery) == 1 and details["width"] == 64
    # the accepted ones ran one at a time
    intervals = [gpu_interval(r[1]) for _, _, r in done]
    assert no_overlap(intervals), intervals
    rejected_after = metric(server.url, "zimage_requests_total", {"outcome": "rejected"})
    assert rejected_after - rejected_before == len(refused)


def test_concurrent_requests_never_share_the_pipeline(server):
    clients = [new_client(server) for _ in range(3)]
    jobs = [submit(c, width=128, height=128, steps=12, count=2, seed=10 * i) for i, c in enumerate(clients)]
    results = [j.result(timeout=180) for j in jobs]
    intervals = [gpu_interval(d) for _, d in results]
    assert all(b > a for a, b in intervals)
    assert no_overlap(intervals), intervals


def test_cancel_stops_only_your_own_job(server):
    """Cancel (the page's button and the API's /cancel) stops this client's running job within a
    step and takes its waiting jobs out of the queue, and says which; other clients' jobs go on."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    mine, theirs, other = new_client(server), new_client(server), new_client(server)
    my_job = submit(mine, seed=5, **HUGE)
    wait_running(server.url)
    their_job = submit(theirs, width=64, height=64, steps=2, seed=6)
    wait_until(lambda: their_job.status().code == Status.IN_QUEUE, 30, "theirs to wait behind mine")
    assert other.predict(api_name="/cancel") == "Nothing of yours is running or waiting."
    assert theirs.predict(api_name="/cancel") == "Removed 1 waiting run(s) from the queue."
    with pytest.raises(AppError, match="Cancelled before it started: removed from the queue"):
        their_job.result(timeout=60)
    other_job = submit(other, width=64, height=64, steps=2, seed=7)
    wait_until(lambda: other_job.status().code == Status.IN_QUEUE, 30, "the other job to wait behind mine")
    t0 = time.monotonic()
    assert mine.predict(api_name="/cancel") == "Cancelling: the run stops after the current step."
    with pytest.raises(AppError, match="Cancelled"):
        my_job.result(timeout=60)
    assert time.monotonic() - t0 < 30
    gallery, details = other_job.result(timeout=60)
    assert details["seeds"] == [7] and len(gallery) == 1
    assert metric(server.url, "zimage_requests_total", {"outcome": "cancelled"}) >= 1


def test_the_prompt_alone_with_a_login(server, client):
    """README's API examples with logins on: gradio_client with auth=, and REST after POST /login."""
    import json

    import httpx

    gallery, details = client.predict("a cat", api_name="/generate")
    assert details["width"] == 256 and details["steps"] == 8 and len(gallery) == 1
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/gradio_api/call/generate", json={"data": ["a cat"]}).status_code == 401
        login = http.post("/login", data={"username": USER[0], "password": USER[1]})
        assert login.status_code == 200, login.text
        event = http.post("/gradio_api/call/generate", json={"data": ["a cat"]}).json()["event_id"]
        with http.stream("GET", f"/gradio_api/call/generate/{event}") as stream:
            lines = list(stream.iter_lines())
        # the page's "Log out" link is Gradio's /logout: afterwards the session is gone
        assert http.get("/logout").status_code in (302, 303, 307)
        assert http.post("/gradio_api/call/generate", json={"data": ["a cat"]}).status_code == 401
    assert "event: complete" in lines, lines[-4:]
    _, details = json.loads(lines[lines.index("event: complete") + 1][len("data: ") :])
    assert details["width"] == 256 and details["seed"] >= 0


def test_client_job_cancel_stops_the_pipeline(server):
    cancelled_before = metric(server.url, "zimage_requests_total", {"outcome": "cancelled"})
    c = new_client(server)
    job = submit(c, seed=8, **HUGE)
    wait_running(server.url)
    assert job.cancel()
    # the engine stops within a step; the GPU is free again
    wait_until(lambda: metric(server.url, "zimage_running_jobs") == 0, 30, "the GPU to be free", 0.05)
    assert metric(server.url, "zimage_requests_total", {"outcome": "cancelled"}) == cancelled_before + 1
    gallery, details = generate(c, width=64, height=64, steps=2, seed=9)
    assert details["seeds"] == [9]


def test_wrong_password_is_refused_and_probes_stay_open(server):
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    # a wrong login answers 400 (below), which gradio_client reports as a ValueError
    with pytest.raises(ValueError, match="Could not login to"):
        Client(server.url, auth=(USER[0], "wrong"), verbose=False)
    with pytest.raises(ValueError, match="Could not login to"):
        Client(server.url, auth=("mallory", USER[1]), verbose=False)
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server.url, verbose=False)
    r = httpx.post(server.url + "/login", data={"username": USER[0], "password": "wrong"})
    assert r.status_code == 400
    # health, readiness and metrics are for probes and Prometheus: no login
    for path in ("/health", "/ready", "/metrics"):
        assert status_of(server.url + path) == 200


def test_queue_cannot_be_skipped_with_a_direct_post(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/login", data={"username": USER[0], "password": USER[1]}).status_code == 200
        body = {"data": ["a cat", "", 64, 64, 2, 0, 1, 1]}
        r = http.post("/gradio_api/run/generate", json=body)
        assert r.status_code == 404 and "join the queue" in r.json()["detail"]


def test_share_link_fails_softly_offline(server):
    def tried() -> str:
        log = server.log()
        return log if "could not open a share link" in log or "public share link" in log else ""

    log = wait_until(tried, 60, "the share link attempt in the log", 0.2)
    assert "Traceback" not in log
    assert status_of(server.url + "/ready") == 200
