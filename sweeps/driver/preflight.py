"""Checks that run before any trial starts, so a wrong setting fails in seconds with one line.

:func:`check_sweep` runs them before Ray starts: the storage folder is writable and has room,
the tracking store answers, the Ray address is reachable, the dataset cache opens.
:func:`check_shared_storage` runs once Ray is up on a cluster: every node that can run a trial
sees ``storage_path`` as the driver does.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from trainer.errors import ConfigError, UserError
from trainer.metrics.names import check_metric, logged_names
from trainer.tasks import classes_for

from ..space import SweepSpec
from ..tracking.store import check_tracking, resolve_tracking_uri

__all__ = ["MIN_FREE_STORAGE_MB", "check_ray_address", "check_shared_storage", "check_storage", "check_sweep"]


def check_sweep(spec: SweepSpec, address: str | None) -> str:
    """Every check that needs no Ray; returns the sweep's tracking URI."""
    check_storage(spec)
    uri = resolve_tracking_uri(spec=spec)
    check_tracking(uri)
    check_ray_address(address)
    from trainer.data.cache import open_cache  # PyTorch: only once the file itself is valid

    cache = open_cache(
        spec.trial["data"]["cache"], classes=classes_for(spec.trial["data"]["task"]), verify=False
    )
    lesions = bool(cache.lesion_known[cache.split_indices("val")].any())
    for metric in spec.all_metrics:
        try:  # localization scores need lesion masks in the validation split
            check_metric(metric, logged_names("val_", lesions), "a validation metric this cache gives")
        except UserError as e:
            raise ConfigError(
                f"metric: {e}; {cache.path} has no lesion masks in its validation split"
            ) from None
    return uri


MIN_FREE_STORAGE_MB = 100  # checkpoints, Ray's experiment state and the embedded MLflow store


def check_storage(spec: SweepSpec) -> None:
    """A local ``storage_path`` must be creatable, writable and not (nearly) full, before any trial."""
    if spec.remote_storage:
        return
    path = Path(spec.storage_path)
    probe = path / f".cxr-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"storage_path: {path} is not writable: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < MIN_FREE_STORAGE_MB:
        raise ConfigError(
            f"storage_path: {path} has {free_mb:.1f} MiB free; a sweep needs at least "
            f"{MIN_FREE_STORAGE_MB} MiB for checkpoints, Ray's experiment state and the MLflow store"
        )


def check_ray_address(address: str | None) -> None:
    """A quick TCP probe of ``host:port`` / ``ray://host:port`` so a wrong address fails in seconds."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(f"--address: Ray cluster at {address} is unreachable: {e}") from None


_PROBE_TIMEOUT_S = 60


def check_shared_storage(spec: SweepSpec) -> None:
    """On a cluster, prove every node that can run a trial sees ``storage_path`` as the driver does.

    The driver writes a random token under ``storage_path``; a zero-CPU task pinned to each node
    reads it back and writes a reply the driver must then see. A node-local directory fails this
    (the node finds no token, or another one): its trials' checkpoints would never reach the driver
    and a trial moved off a failed node could not resume. Cloud URIs (``s3://``) need no check.
    """
    import ray

    if spec.remote_storage:
        return
    need_cpu, need_gpu = spec.resources.cpu, spec.resources.gpu
    nodes = [
        n
        for n in ray.nodes()
        if n.get("Alive")
        and n["Resources"].get("CPU", 0) >= need_cpu
        and n["Resources"].get("GPU", 0) >= need_gpu
    ]
    if len(nodes) < 2 and all(n["NodeManagerAddress"] == _driver_ip() for n in nodes):
        return  # one node, the driver's own machine: nothing to share
    import secrets

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    probe_dir = Path(spec.storage_path).resolve() / f".cxr-storage-check-{token}"
    try:
        probe_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"storage_path: cannot create {probe_dir}: {e.strerror or e}") from None
    try:
        (probe_dir / "token").write_text(token)
        probe = ray.remote(num_cpus=0, max_retries=0)(_storage_probe)
        refs = {
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe_dir), token
            ): n
            for n in nodes
        }
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
        problems = []
        for ref in ready:
            node, error = refs[ref], ray.get(ref)
            if not error and not (probe_dir / f"seen-{node['NodeID']}").is_file():
                error = "its writes there do not appear on the driver's side"
            if error:
                problems.append(f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]}): {error}")
        unchecked = [refs[r]["NodeManagerAddress"] for r in refs if r not in ready]
        if unchecked:
            import warnings

            warnings.warn(
                f"storage_path check: node(s) {', '.join(unchecked)} did not answer within "
                f"{_PROBE_TIMEOUT_S} s; their view of {spec.storage_path} is unverified",
                stacklevel=2,
            )
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if problems:
        raise ConfigError(
            f"storage_path: {spec.storage_path} is not shared across the cluster's nodes: these nodes do "
            f"not see the directory the driver (on {_driver_ip()}) wrote to: " + "; ".join(problems) + ". "
            "Every node that runs trials must see the same directory at the same path (an NFS/CephFS "
            "mount, or one volume mounted at that path in every pod), or use s3://bucket/prefix. "
            "Otherwise trials write checkpoints and results the driver never sees, and a trial moved "
            "off a failed node cannot resume (docs/cluster.md, 'Shared storage')."
        )


def _storage_probe(probe_dir: str, token: str) -> str:
    """Runs on one node: '' when it reads the driver's token and can reply, else what went wrong."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    path = Path(probe_dir)
    try:
        seen = (path / "token").read_text()
    except OSError as e:
        return f"cannot read {path / 'token'} ({e.strerror or e})"
    if seen != token:
        return f"{path} holds another token: a different directory under the same name"
    try:
        (path / f"seen-{node}").write_text(token)
    except OSError as e:
        return f"cannot write in {path} ({e.strerror or e})"
    return ""


def _driver_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
