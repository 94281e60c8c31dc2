"""The page's event handlers: the Studio object holds the engine and each session's job.

Nothing here touches the GPU directly: every image goes through `engine.generate`, which holds
the one GPU lock. Form values arrive from Gradio and become one `FormValues`; the engine's
validation names the field, the value and what is allowed. Every handler checks what it gets and
answers a bad value with a sentence (gr.Error); guard.py checks every file in and out for all of
them, and each user sees only their own space (`Access.viewer`)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import gradio as gr

from zimage.errors import UnreadableImage, ZImageError
from zimage.model.presets import ASPECT_RATIOS
from zimage.service.pngmeta import clean_parameters, read_parameters, read_parameters_checked
from zimage.service.request import GUIDANCE_MAX, GenerationRequest
from zimage.service.store import is_output_name
from zimage.web.guard import INTERNAL_ERROR, Access, Refused, access_of
from zimage.web.panels import _s, history_items, parameters_markdown, render_banner, render_profiler, summary_markdown
from zimage.web.sizes import CUSTOM, match_preset, preset_size, ratio_label, size_note, size_tiers

log = logging.getLogger(__name__)

HISTORY_LIMIT = 40
PROGRESS_EVERY_S = 0.1  # at most ten progress updates a second to each browser
ASPECT_LABELS = tuple(ratio_label(r) for r in ASPECT_RATIOS)

# ------------------------------------------------------------------------------------------
# the handlers


def _who(request) -> str:
    """The logged-in user, else the client's address: the request log always says who asked."""
    user = getattr(request, "username", None)
    if user:
        return str(user)
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "") if client else ""


class _Progress:
    """Feeds gr.Progress from the engine's progress(phase, done, total) callback, with an ETA.

    The first call comes from inside the GPU lock, right after the run started: its time is
    when this job began using the pipeline."""

    def __init__(self, progress: gr.Progress):
        self.progress = progress
        self.started: float | None = None
        self.t0 = 0.0
        self.last_push = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = time.time()
            self.t0 = now
        if phase == "text":
            self.progress(0.0, desc="Encoding the prompt…")
        elif phase == "denoise":
            if done < total and now - self.last_push < PROGRESS_EVERY_S:
                return
            per_step = (now - self.t0) / max(done, 1)
            eta = per_step * (total - done)
            self.progress((done, total), desc=f"Denoising · ~{_s(eta)} left", unit="steps")
        elif phase == "decode":
            self.progress((total, total), desc="Decoding with the VAE…", unit="steps")
        self.last_push = now


@dataclass(frozen=True)
class FormValues:
    """The form's values as Gradio sends them (raw: the engine validates), in the API's argument order."""

    prompt: Any = ""
    negative_prompt: Any = ""
    width: Any = None
    height: Any = None
    steps: Any = None
    guidance: Any = 0.0
    seed: Any = -1
    count: Any = 1

    def request(self, user: str, owner: str = "") -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt if self.prompt is not None else "",
            negative_prompt=self.negative_prompt or "",
            width=_number(self.width),
            height=_number(self.height),
            steps=_number(self.steps),
            guidance=self.guidance if self.guidance is not None else 0.0,
            seed=_number(self.seed, -1),
            count=_number(self.count, 1),
            user=user,
            owner=owner,
        )


class Studio:
    """Holds the engine and the per-session jobs; its methods are the page's event handlers."""

    def __init__(self, engine: Any, ops: Any, settings: Any):
        self.engine = engine
        self.ops = ops
        self.settings = settings
        self.blocks: gr.Blocks | None = None
        self._jobs: dict[str, Any] = {}  # session hash -> its running Job
        self._jobs_lock = threading.Lock()
        w, _h = engine.default_size
        self.tiers = size_tiers(w, settings.max_size)

    def space_note(self) -> str:
        """One line on whose images the history shows."""
        if self.settings.auth or self.settings.auth_file:
            return "Only you see your images (each login has its own)."
        return "No logins are set up: everyone who opens this page shares one history and outputs folder."

    @property
    def access(self) -> Access:
        """Who may see what (installed on the Blocks by the server; one shared space without it)."""
        return access_of(self.blocks, self.engine.store)

    # --- generation ----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        negative_prompt: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        seed: float,
        count: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it through this default
    ):
        """Run the job on a worker thread. When Gradio cancels this task (the Cancel button,
        gradio_client's Job.cancel(), a closed tab), the engine job is cancelled too, so the
        pipeline stops within a step instead of running on for nobody."""
        job = self.engine.new_job()
        owner = self.access.viewer(request).owner
        session = getattr(request, "session_hash", None) or ""
        with self._jobs_lock:
            self._jobs[session] = job
        try:
            return await anyio.to_thread.run_sync(
                self._generate,
                job,
                FormValues(prompt, negative_prompt, width, height, steps, guidance, seed, count),
                _who(request),
                owner,
                progress,
                abandon_on_cancel=True,
            )
        except anyio.get_cancelled_exc_class():
            job.cancel()
            raise
        finally:
            with self._jobs_lock:
                if self._jobs.get(session) is job:
                    del self._jobs[session]

    def _generate(self, job: Any, values: FormValues, user: str, owner: str, progress: gr.Progress):
        engine = self.engine
        feed = _Progress(progress)
        try:
            self._wait_for_model(progress, job)
            req = values.request(user, owner)
            result = engine.generate(req, job=job, progress=feed, save=True, wait_ready=30.0)
            progress(1.0, desc="Saving PNG…")
            paths = result.wait_saved(timeout=120)
        except ZImageError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - never a traceback to a client; the log has it
            log.exception("generate failed")
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None
        details = result.details()
        gallery = [(p, f"seed {s}") for p, s in zip(paths, result.seeds)]
        return gallery, details

    def _wait_for_model(self, progress: gr.Progress, job: Any) -> None:
        """A request made while loading holds its place and says what the model is doing."""
        engine = self.engine
        while not engine.ready:
            if job.cancelled:
                raise gr.Error("Cancelled while waiting for the model.", print_exception=False)
            if engine.load_error:
                raise gr.Error(f"The model failed to load: {engine.load_error}", print_exception=False)
            snap = engine.timeline.snapshot()
            progress(
                max(0.0, min(1.0, snap["percent"] / 100.0)),
                desc=f"Waiting for the model to load: {snap['current']} ({_s(snap['elapsed_s'])})",
            )
            time.sleep(0.25)

    def cancel(self, request: gr.Request) -> str:
        """Cancel this session's own job (queued or running); other people's jobs go on."""
        session = getattr(request, "session_hash", None) or ""
        with self._jobs_lock:
            job = self._jobs.get(session)
        if job is None:
            return "Nothing of yours is running."
        job.cancel()
        return "Cancelled: the run stops after the current step."

    def after_generate(self, details: dict[str, Any], request: gr.Request = None):
        """The download list and summary of a finished run: only files of the asker's own space."""
        if not isinstance(details, dict):
            details = {}
        names = details.get("files") if isinstance(details.get("files"), list) else []
        folder = self.engine.store.folder_for(self.access.viewer(request).owner)
        files = [str(folder / n) for n in names if isinstance(n, str) and is_output_name(n)]
        files = [f for f in files if Path(f).is_file() and not Path(f).is_symlink()]
        seed = details.get("seed", -1)
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else -1
        download = gr.update(value=files or None, visible=bool(files))
        try:
            summary = summary_markdown(details)
        except Exception:  # noqa: BLE001 - a details dict the page did not make: no summary
            summary = ""
        return seed, summary, download, ""

    # --- history, parameters ------------------------------------------------------------

    def history(self, request: gr.Request = None):
        """The asker's own outputs (an admin's: everyone's), newest first."""
        viewer = self.access.viewer(request)
        owner = None if viewer.admin else viewer.owner
        return history_items(self.engine.store.history(HISTORY_LIMIT, owner))

    def select_image(self, evt: gr.SelectData, request: gr.Request = None):
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image")
        path = image.get("path") if isinstance(image, dict) else None
        if not path or not isinstance(path, str):
            return {}, "Select an image to see its parameters."
        try:  # the path comes from the browser: only the asker's own images and uploads
            real = self.access.check(path, self.access.viewer(request))
        except Refused:
            return {}, "That image is not one of yours (or is gone), so its parameters are not shown."
        try:
            params = read_parameters(real)
        except (UnreadableImage, OSError):
            params = {}
        caption = value.get("caption") if isinstance(value.get("caption"), str) else None
        return params, parameters_markdown(params, caption or real.name)

    def load_png(self, file: Any):
        """A PNG dropped on the page: its embedded parameters, and the form filled with them.

        The file is an upload of this session (guard.py refused anything else before this runs);
        its chunks are read without decoding a pixel, and every field is checked."""
        path = getattr(file, "name", file)
        no_change = [gr.update()] * 10
        if not path:
            return [{}, "", *no_change]
        if not isinstance(path, (str, Path)):
            raise Refused("Drop a PNG file made by zimage to load its settings.")
        name = Path(str(path)).name
        try:
            params, dropped = read_parameters_checked(path)
        except UnreadableImage as exc:
            return [{}, f"**{name}** is not a PNG image that zimage can read: {exc}", *no_change]
        except OSError:
            return [{}, f"**{name}** is not a PNG image that zimage can read.", *no_change]
        if not params:
            return [
                {},
                f"**{name}** carries no zimage parameters (was it made by zimage with metadata on?).",
                *no_change,
            ]
        note = f"  \nLeft out what could not be read: {', '.join(dropped)}." if dropped else ""
        return [params, parameters_markdown(params, name) + note, *self.use_settings(params)]

    def use_settings(self, params: dict[str, Any]):
        """Form values from a parameters dict: prompt, negative, width, height, steps, guidance, seed,
        count, aspect, tier."""
        params = clean_parameters(params)[0] if isinstance(params, dict) else {}
        if not params:
            return [gr.update()] * 10
        w = params.get("width")
        h = params.get("height")
        aspect, tier = (
            match_preset(w, h, self.tiers, self.settings.min_size, self.settings.max_size)
            if w and h
            else (CUSTOM, None)
        )
        return [
            params.get("prompt", gr.update()),
            params.get("negative_prompt", gr.update()),
            w if w else gr.update(),
            h if h else gr.update(),
            params.get("steps", gr.update()),
            params.get("guidance", gr.update()),
            params.get("seed", gr.update()),
            1,  # the image's own seed, one image
            aspect,
            tier if tier is not None else gr.update(),
        ]

    # --- small form helpers ---------------------------------------------------------------

    def pick_preset(self, aspect: str, tier: Any):
        if aspect == CUSTOM or tier is None:
            return gr.update(), gr.update(), gr.update()
        if aspect not in ASPECT_LABELS:
            raise Refused(f"Aspect ratio must be one of {', '.join(ASPECT_LABELS)} or {CUSTOM} (got {_short(aspect)}).")
        if _whole(tier) not in self.tiers:
            raise Refused(f"Resolution must be one of {', '.join(map(str, self.tiers))} (got {_short(tier)}).")
        w, h, note = preset_size(aspect, _whole(tier), self.settings.min_size, self.settings.max_size)
        return w, h, size_note(w, h, note)

    def custom_size(self, width: Any, height: Any):
        w, h = _whole(width), _whole(height)
        return CUSTOM, size_note(w, h) if w is not None and h is not None else ""

    @staticmethod
    def negative_state(guidance: float):
        try:
            guidance = float(guidance or 0.0)
        except (TypeError, ValueError, OverflowError):
            raise Refused(f"Guidance must be a number from 0 to {GUIDANCE_MAX:g} (got {_short(guidance)}).") from None
        if guidance > 0:
            return gr.update(
                interactive=True,
                info=f"In use: guidance {float(guidance):g} runs a second pass per step with it (about 2× slower).",
                elem_classes=["zi-negative"],
            )
        return gr.update(
            interactive=False,
            info="Inactive while guidance is 0: Z-Image-Turbo then ignores the negative prompt. "
            "Raise guidance to use it.",
            elem_classes=["zi-negative", "zi-inactive"],
        )

    # --- live panel ----------------------------------------------------------------------

    def tick(self):
        status = self.engine.status()
        try:
            ops_status = self.ops.status() if self.ops is not None else {}
        except Exception:  # noqa: BLE001 - the panel must keep answering
            log.exception("ops.status failed")
            ops_status = {"status": "unavailable (see log)"}
        return render_profiler(status, ops_status, self.gradio_waiting()), render_banner(status)

    def gradio_waiting(self) -> int:
        """Requests waiting in Gradio's queue (not yet handed to the engine)."""
        queue = getattr(self.blocks, "_queue", None)
        try:
            return len(queue) if queue is not None else 0
        except Exception:  # noqa: BLE001 - Gradio internals; a reading must never break the panel
            return 0


def _whole(value: Any) -> int | None:
    """A whole number from a widget value, or None (junk, infinities, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number == number and abs(number) < 1e9 and number.is_integer() else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, default: int | None = None) -> Any:
    """Whole numbers from Gradio widgets (which may send floats) stay exact; the engine validates the rest."""
    if value is None or value == "":
        return default if default is not None else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
