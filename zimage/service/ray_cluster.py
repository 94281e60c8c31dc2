"""What the studio asks of Ray besides jobs (service.ray_serve's RayPool runs the jobs): joining the
cluster as a driver, the Serve options of the deployment, reading which replicas are alive, and
leaving. Every function here imports Ray when called, never at import: only --ray gets here."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zimage.errors import ZImageError
from zimage.service.ray_errors import chain_text, first_line

if TYPE_CHECKING:  # pragma: no cover
    from zimage.settings import Settings

log = logging.getLogger(__name__)


def connect(address: str) -> Any:
    """ray.init as a driver of the cluster at address (auto, local or HOST:PORT); returns ray.
    A cluster that cannot be reached is one sentence that says what to start where."""
    import ray

    kw: dict[str, Any] = {"namespace": "zimage", "logging_level": logging.WARNING, "ignore_reinit_error": True}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines: one per request
    try:
        if address == "local":  # a private cluster of this box, gone with the process
            ray.init(include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except ConnectionError as exc:
        if "token" in chain_text(exc).lower():
            raise ZImageError(
                f"The Ray cluster at {address} asks for its authentication token: start the studio with "
                "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)."
            ) from None
        if address == "auto":
            raise ZImageError(
                "Setting 'ray' is auto but no Ray cluster runs on this box: start one with `ray start --head` "
                "(and `ray start --address HEAD:6379` on the other boxes), or use --ray local."
            ) from None
        raise ZImageError(
            f"Could not connect to the Ray cluster at {address}: {first_line(exc)}. Is `ray start --head` "
            "running there, and is this box part of the cluster (`ray start --address ...`)?"
        ) from None
    return ray


def deployment_options(settings: Settings, cluster_gpus: int) -> tuple[dict[str, Any], int, int]:
    """Serve options: one GPU per replica (none with --device cpu), the replica count or the
    autoscaling range (from the cluster's GPUs at start, at least 1, up to --ray-max-replicas).
    Returns the options and the least and most replicas."""
    s = settings
    gpu = 0 if s.device == "cpu" else 1
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpu, "num_cpus": 1}}
    if s.ray_replicas == "auto":
        least = max(1, cluster_gpus if gpu else 1)
        most = max(least, s.ray_max_replicas)
        options["autoscaling_config"] = {
            "min_replicas": least,
            "initial_replicas": least,
            "max_replicas": most,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 600.0,
        }
    else:
        least = most = int(s.ray_replicas)
        options["num_replicas"] = least
    return options, least, most


def replica_settings(settings: Settings) -> Settings:
    """What each replica loads with: its own GPU (Ray sets CUDA_VISIBLE_DEVICES), or the CPU."""
    return settings.replace(device="cpu" if settings.device == "cpu" else "cuda", ray="")


def read_replicas() -> tuple[dict[str, int], list[str]]:
    """Serve's replica counts by state (RUNNING, STARTING, ...) and the names of the replica actors
    alive now (Serve names them SERVE_REPLICA::zimage#ZImageReplica#<id>; we say ray-<id>).
    Raises what Ray raises: the caller keeps what it knew last."""
    import ray
    from ray import serve

    from zimage.service.ray_replica import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    states: dict[str, int] = {}
    if app is not None:
        for dep in app.deployments.values():
            for state, count in dep.replica_states.items():
                key = str(getattr(state, "value", state))
                states[key] = states.get(key, 0) + count
    prefix = f"SERVE_REPLICA::{APP_NAME}#"
    alive = sorted(
        "ray-" + a["name"].rsplit("#", 1)[-1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("name", "").startswith(prefix)
    )
    return states, alive


def leave(deployed: bool) -> None:
    """Delete the deployment (when there is one: its GPUs are free again) and leave the cluster."""
    try:
        import ray
        from ray import serve

        from zimage.service.ray_replica import APP_NAME

        if deployed:
            serve.delete(APP_NAME)
            log.info("Ray Serve: the zimage replicas are stopped")
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the cluster may be gone already; nothing left to free
        log.exception("stopping the Ray Serve replicas failed")
