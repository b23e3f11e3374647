"""Scale-out: the same FastAPI app, one copy per Ray Serve replica (one GPU each by default; with ``--ulysses N`` a
replica asks for N GPUs and starts its N-1 follower ranks itself, ``replan.serve.followers``).

Ray Serve routes requests across replicas (power-of-two-choices on queue length), restarts failed replicas, spans
nodes (``RAY_ADDRESS``) and gives in-cluster callers a ``DeploymentHandle``; there is no home-made load balancer.
Each replica loads its models inside replica initialisation, so Ray sends it traffic only once it is ready; a
replica whose loading fails fails its start and Ray reports it. Back-pressure stays ours: each replica answers 429
once ``queue`` edits wait behind its running one. Ray's own per-replica cap is set above that, so ``/health`` and
error replies are not queued behind edits.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replan.serve.app import ServeConfig, create_app

logger = logging.getLogger("replan.serve")

HEADROOM = 8  # requests a replica accepts beyond its edit capacity: health checks, fast 4xx/429 replies
MIN_RAY = (2, 60)  # ingress apps built at replica start (``__serve_build_asgi_app__``); tested with 2.60.0


class RayServeMissing(RuntimeError):
    pass


def _serve():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RayServeMissing(f'--replicas needs Ray Serve: pip install "ray[serve]" ({e})') from None
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_RAY:
        need = ".".join(map(str, MIN_RAY))
        raise RayServeMissing(f'--replicas needs Ray Serve >= {need}, found {ray.__version__}: '
                              f'pip install -U "ray[serve]>={need}"')
    return serve


class ReplanReplica:
    """The deployment class: builds the app at replica start and loads the models before taking traffic."""

    def __init__(self, config: ServeConfig, log_level: str = "INFO"):
        self.config = config
        if not logger.handlers:  # replicas are fresh processes: show the per-edit timing lines
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(log_level.upper())

    async def __serve_build_asgi_app__(self):
        app = create_app(self.config)
        await asyncio.to_thread(app.state.service.load, True)  # raise: a replica that cannot load fails its start
        return app


def build_app(config: ServeConfig, replicas: int, gpus_per_replica: float = 1.0, name: str = "replan",
              log_level: str = "INFO"):
    """A bound Ray Serve application (``serve.run(build_app(...))``)."""
    serve = _serve()
    deployment = serve.deployment(
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica},
        max_ongoing_requests=config.queue + 1 + HEADROOM,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=60,
    )(serve.ingress()(ReplanReplica))
    return deployment.bind(config, log_level)


def serve_forever(config: ServeConfig, replicas: int, *, host: str = "127.0.0.1", port: int = 8001,
                  gpus_per_replica: float = 1.0, log_level: str = "INFO") -> None:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster, deploy, and block until interrupted."""
    serve = _serve()
    import ray

    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    serve.start(http_options={"host": host, "port": port})
    logger.info("deploying %d replica(s) of %s (%g GPU each)", replicas, config.backbone, gpus_per_replica)
    serve.run(build_app(config, replicas, gpus_per_replica, log_level=log_level), name="replan", route_prefix="/")
    logger.info("ready: %d replica(s) on http://%s:%d in %.1fs", replicas, host, port, time.perf_counter() - start)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
