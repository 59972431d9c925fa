"""Where a run's MLflow tracking store is, and whether it answers.

:func:`resolve_tracking_uri` is the one place that decides the store, for a trial, a sweep and
the commands that read a sweep afterwards: an explicit URI, else the sweep's ``mlflow.tracking_uri``,
else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store (``mlflow.db`` in the sweep's
storage folder, or in the given folder / the working directory). :func:`check_tracking` probes a
served store once, in seconds, before a sweep starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from ..space import SweepSpec

__all__ = ["CREDENTIAL_VARS", "check_tracking", "default_tracking_uri", "resolve_tracking_uri"]

CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


def default_tracking_uri(directory: str | Path | None = None) -> str:
    """The embedded store: a sqlite file ``mlflow.db`` in ``directory`` (default: the cwd)."""
    d = Path(directory or Path.cwd()).resolve()
    return f"sqlite:///{d / 'mlflow.db'}"


def resolve_tracking_uri(
    uri: str | None = None, *, spec: SweepSpec | None = None, directory: str | Path | None = None
) -> str:
    """The tracking store of a trial or a sweep.

    ``uri`` if given; else the sweep's ``mlflow.tracking_uri``; else ``$MLFLOW_TRACKING_URI``;
    else ``mlflow.db`` in the sweep's (local) storage folder, or in ``directory``, or in the cwd.
    A sweep on remote storage (``s3://``) has no folder for the embedded store: it needs a URI.
    """
    if uri:
        return uri
    if spec is not None and spec.mlflow.tracking_uri:
        return spec.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if spec is not None:
        if spec.remote_storage:
            raise ConfigError(
                "mlflow.tracking_uri: required when storage_path is remote (set it or MLFLOW_TRACKING_URI)"
            )
        directory = spec.storage_path
    return default_tracking_uri(directory)


def check_tracking(uri: str) -> None:
    """Fail fast (seconds, no retry storm) when the tracking store cannot be reached or refuses us.

    A served store (``http(s)://``) is probed once, without MLflow's minutes of retries, with the
    credentials the MLflow client would send; a database URI (``postgresql://``...) gets one
    connection attempt. File and sqlite stores need no check.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_tracking_server(uri)
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        _check_tracking_database(uri)


def _check_tracking_server(uri: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        resp = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=10,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException as e:  # connection refused, DNS, TLS, timeout
        raise ConfigError(f"mlflow.tracking_uri: tracking server {uri} is unreachable: {e.message}") from None
    who = f"user {creds.username!r}" if creds.username else ("a token" if creds.token else None)
    if resp.status_code == 401:
        if who is None:
            raise ConfigError(
                f"mlflow.tracking_uri: {uri} requires a login (HTTP 401) and no credentials are set: "
                f"export {CREDENTIAL_VARS}"
            )
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} refused the credentials of {who} (HTTP 401): check {CREDENTIAL_VARS}"
        )
    if resp.status_code == 403:
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} denies {who or 'anonymous access'} (HTTP 403): ask its admin for "
            f"permission, or use other credentials ({CREDENTIAL_VARS})"
        )
    if resp.status_code >= 500:
        raise ConfigError(
            f"mlflow.tracking_uri: tracking server {uri} is up but failing (HTTP {resp.status_code}: "
            f"{_server_message(resp)}); its backend store (PostgreSQL) may be down: see the server's log"
        )
    if resp.status_code != 200:
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} answered HTTP {resp.status_code} ({_server_message(resp)}): "
            "is this an MLflow tracking server?"
        )


def _server_message(resp) -> str:
    try:
        return str(resp.json().get("message", ""))[:300] or resp.reason
    except ValueError:
        return (resp.text or resp.reason or "").strip().splitlines()[0][:300] if resp.text else resp.reason


def _check_tracking_database(uri: str) -> None:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=args)
    except (sqlalchemy.exc.ArgumentError, ImportError) as e:
        raise ConfigError(f"mlflow.tracking_uri: unusable database URI {uri!r}: {e}") from None
    shown = url.render_as_string(hide_password=True)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as e:
        first = str(e.orig or e).strip().splitlines()[0]
        raise ConfigError(
            f"mlflow.tracking_uri: database {shown} is not accepting connections ({first}): "
            "is PostgreSQL running and are host, port, user and password right?"
        ) from None
    finally:
        engine.dispose()
