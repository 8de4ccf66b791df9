"""Submit the pipeline to a Ray cluster as a Ray job through the Jobs API.

    r1pipe submit recipes/demo.yaml --address http://HEAD:8265 --follow

The working dir is uploaded; the job's entrypoint is ``python -m pipelines.cli
run ... --address auto`` on the head. Ray 2.60 turns token auth on by default:
a client on the head's machine finds the token under ~/.ray; elsewhere set
RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).
"""
from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path

_EXCLUDES = [".venv", ".git", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def auth_headers() -> dict[str, str]:
    """Ray's token, looked up in Ray's own order; sent explicitly as a bearer header
    because RAY_AUTH_MODE is read once, when ray is first imported."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not token and os.path.exists(path):
        token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_entrypoint(config: str, *, stages, from_stage, force, run_id, runs_dir, overrides,
                     python: str = "python") -> str:
    args = [python, "-m", "pipelines.cli", "run", config, "--address", "auto"]
    for flag, value in (("--stages", stages), ("--from", from_stage), ("--run-id", run_id),
                        ("--runs-dir", runs_dir)):
        if value:
            args += [flag, value]
    if force:
        args.append("--force")
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def _submit_when_ready(client, entrypoint: str, runtime_env: dict, wait_s: float = 90) -> str:
    """A head that just started answers 'No available agent' until its job agent is up."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def submit_job(config: str, *, address: str, working_dir: str, stages=None, from_stage=None,
               force=False, run_id=None, runs_dir=None, overrides=(), follow=False,
               python="python", echo=print) -> tuple[str, int]:
    from ray.job_submission import JobStatus, JobSubmissionClient
    wd = Path(working_dir).resolve()
    recipe = Path(config).resolve()
    if not recipe.is_relative_to(wd):
        raise ValueError(f"recipe {config!r} is outside the working dir {wd}; it must be uploaded with it")
    client = JobSubmissionClient(address, headers=auth_headers())
    entrypoint = build_entrypoint(str(recipe.relative_to(wd)), stages=stages, from_stage=from_stage,
                                  force=force, run_id=run_id, runs_dir=runs_dir,
                                  overrides=list(overrides), python=python)
    job_id = _submit_when_ready(client, entrypoint, {"working_dir": str(wd), "excludes": _EXCLUDES})
    echo(f"submitted {job_id}: {entrypoint}")
    if not follow:
        return job_id, 0

    async def _tail():
        async for lines in client.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))
    asyncio.run(_tail())
    status = client.get_job_status(job_id)
    echo(f"job {job_id} ended: {status}")
    return job_id, 0 if status == JobStatus.SUCCEEDED else 1
