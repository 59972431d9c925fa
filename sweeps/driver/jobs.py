"""Sweeps as Ray jobs: run a sweep's driver on the cluster from a workstation (Ray's Jobs API).

``submit_sweep`` checks the sweep file here, then sends it (only it: the job's working directory
holds nothing else) to the Ray dashboard at ``--address http://HEAD:8265``, where the head runs
``cxr-sweep sweep run FILE --address auto`` as a job. Closing the laptop does not stop the sweep.
The job carries the sweep's name in its metadata, so ``sweep logs NAME``, ``sweep stop NAME`` and
``sweep status NAME --address http://…`` find its newest job without an id to remember.

Paths in the file are the cluster's: a relative ``storage_path`` or dataset cache would resolve in
the job's scratch directory, so they are refused here. With Ray token authentication the client
sends ``RAY_AUTH_TOKEN`` from the environment (Ray's own client does).
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.dotted import load_yaml_mapping
from trainer.errors import ConfigError, UserError

from ..checks import apply_sweep_overrides
from ..space import load_sweep

__all__ = ["SweepJob", "follow_logs", "job_logs", "latest_job", "stop_job", "submit_sweep"]

SWEEP_KEY = "cxr.sweep"  # the job metadata entry that names its sweep
FILE_NAME = "sweep.yaml"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
# `sweep stop`: Ray's job supervisor sends this signal, then SIGKILL after the wait. SIGINT is a
# first Ctrl-C to the driver: Tune ends the trials and saves its state, so `sweep resume` continues.
STOP_AS_CTRL_C = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"}


@dataclass(frozen=True)
class SweepJob:
    submission_id: str
    sweep: str
    status: str
    entrypoint: str
    start_time: float | None = None
    message: str = ""


def _client(address: str):
    """A Jobs API client for ``address`` (the dashboard URL), or one line saying why not."""
    if not address.startswith(("http://", "https://")):
        raise UserError(
            f"--address {address}: the Jobs API is the Ray dashboard's URL, e.g. http://HEAD:8265 "
            "(`sweep run --address` takes Ray's own addresses)"
        )
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or Ray's RuntimeError/ValueError for a refused request
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--address {address}: no Ray dashboard answers there: {first}") from None


EXAMPLES = {"storage_path": "/shared/sweeps", "trial.data.cache": "/data/cache/ne"}


def _cluster_paths(space_file: Path, overrides: list[str]) -> None:
    """Refuse relative paths in the file (with the overrides applied): they must be the cluster's."""
    raw = load_yaml_mapping(space_file, "sweep file")
    apply_sweep_overrides(raw, overrides)
    checks = {
        "storage_path": raw.get("storage_path"),
        "trial.data.cache": ((raw.get("trial") or {}).get("data") or {}).get("cache"),
    }
    for field, value in checks.items():
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            raise ConfigError(
                f"{space_file}: {field}: {value!r} is relative; a submitted sweep runs on the cluster, "
                f"where it would resolve in the job's scratch folder: give the cluster's path, e.g. "
                f"--set {field}={EXAMPLES[field]}"
            )


def submit_sweep(
    space_file: str | Path, address: str, overrides: list[str] | None = None, smoke: list[str] | None = None
) -> SweepJob:
    """Check ``space_file`` here, then start its driver on the cluster as a Ray job."""
    space_file = Path(space_file)
    overrides = [*(smoke or []), *(overrides or [])]
    _cluster_paths(space_file, overrides)
    spec, _ = load_sweep(space_file, overrides=overrides)  # every field and searched value, as `run`
    client = _client(address)
    args = [a for o in overrides for a in ("--set", o)]
    # status lines every 15 s in the job's log: what `sweep status NAME --address` shows
    entrypoint = shlex.join(
        ["cxr-sweep", "sweep", "run", FILE_NAME, "--address", "auto", "--every", "15", *args]
    )
    submission_id = f"cxr-sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="cxr-submit-") as tmp:
        (Path(tmp) / FILE_NAME).write_bytes(space_file.read_bytes())
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"working_dir": tmp, "env_vars": STOP_AS_CTRL_C},
                metadata={SWEEP_KEY: spec.name},
            )
        except Exception as e:  # Ray raises RuntimeError with the dashboard's answer
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"--address {address}: the cluster refused the sweep {spec.name!r}: {first}"
            ) from None
    return SweepJob(submission_id, spec.name, "PENDING", entrypoint)


def latest_job(name: str, address: str, client=None) -> SweepJob:
    """The newest job of sweep ``name`` on the cluster at ``address``."""
    client = client or _client(address)
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(SWEEP_KEY) == name]
    if not jobs:
        raise UserError(f"sweep {name!r}: no job of that name on the cluster at {address}")
    job = max(jobs, key=lambda j: j.start_time or 0)
    status = getattr(job.status, "value", str(job.status))
    return SweepJob(job.submission_id, name, status, job.entrypoint, job.start_time, job.message or "")


def job_logs(name: str, address: str) -> tuple[SweepJob, str]:
    client = _client(address)
    job = latest_job(name, address, client)
    return job, client.get_job_logs(job.submission_id)


def follow_logs(name: str, address: str, poll_s: float = 2.0) -> Iterator[str]:
    """The job's log as it grows, until the job ends (Jobs API polling; no websocket needed)."""
    client = _client(address)
    job = latest_job(name, address, client)
    shown = 0
    while True:
        text = client.get_job_logs(job.submission_id)
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
        status = getattr(client.get_job_status(job.submission_id), "value", "")
        if status in ENDED:
            rest = client.get_job_logs(job.submission_id)[shown:]
            if rest:
                yield rest
            return
        time.sleep(poll_s)


def stop_job(name: str, address: str) -> SweepJob:
    """Stop the sweep's running job. Ray ends the driver as a Ctrl-C would: resumable."""
    client = _client(address)
    job = latest_job(name, address, client)
    if job.status in ENDED:
        raise UserError(f"sweep {name!r}: its job {job.submission_id} has already ended ({job.status})")
    client.stop_job(job.submission_id)
    return job
