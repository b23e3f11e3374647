"""One server replica on several GPUs: the server process is rank 0 and starts the other ranks itself.

    python -m replan.serve --backbone flux --ulysses 2                   # one replica computing each edit on 2 GPUs
    python -m replan.serve --backbone flux --ulysses 2 --replicas 4      # Ray Serve: 4 replicas of 2 GPUs each

The leader (the process that answers HTTP) picks a free port, starts ``ulysses - 1`` follower processes
(``python -m replan.serve.followers CONFIG_JSON`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins one process group with them. Every rank loads the editor with context parallelism; the
planner lives on the leader only. The followers then wait in ``RePlanPipeline.follow()`` and compute every edit the
leader runs; closing the leader's pipeline releases them. Rank r uses ``cuda:r`` of the GPUs the process sees (a Ray
replica sees exactly its own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

logger = logging.getLogger("replan.serve")

LAUNCHER = [sys.executable, "-m"]  # how a follower process is started (tests on the CPU wrap it)
STOP_TIMEOUT = 60  # seconds a follower gets to leave after the leader closes


def start_followers(config, port: int) -> list[subprocess.Popen]:
    """Start ranks 1 … ulysses-1 of one replica; they wait for the leader on ``127.0.0.1:port``."""
    blob = json.dumps(dataclasses.asdict(config))
    procs = []
    for rank in range(1, config.ulysses):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(config.ulysses), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(config.ulysses), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([*LAUNCHER, __name__, blob], env=env))
    return procs


def load_leader(config, load):
    """Start the followers, join their process group as rank 0 and ``load()`` the pipeline (with context
    parallelism); the pipeline then sends each call to the followers. Followers are stopped if loading fails."""
    from replan.distributed import free_port, init_distributed

    port = free_port()
    procs = start_followers(config, port)
    try:
        init_distributed(config.device, rank=0, world_size=config.ulysses, init_method=f"tcp://127.0.0.1:{port}")
        pipe = load()
    except BaseException:
        stop(procs)
        raise
    pipe.drives_followers = True
    pipe.on_close.append(lambda: stop(procs))
    logger.info("replica spans %d ranks (this process is rank 0)", config.ulysses)
    return pipe


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("follower pid %d did not stop; terminating it", p.pid)
            p.terminate()


def main(argv=None) -> int:
    from replan.distributed import init_distributed, shutdown
    from replan.serve.service import ServeConfig, load_pipeline

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(**json.loads(argv[0]))
    init_distributed(config.device)
    pipe = load_pipeline(config)
    pipe.follow()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
