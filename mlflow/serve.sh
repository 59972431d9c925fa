#!/usr/bin/env bash
# Launch the MLflow tracking server for sweeps: PostgreSQL backend store, proxied artifacts
# (s3://... on a cluster, a local directory in tests), and the basic-auth app. Everything comes from
# environment variables (see README.md here and docker/.env.example), so the same script runs in the
# compose stack, on a VM, and in tests/test_tracking_server.py.
#
# Fails in seconds with one clear line when a setting is missing or the database cannot be reached
# (after waiting MLFLOW_DB_WAIT_S for it to come up), instead of a worker restart loop.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "mlflow/serve.sh: $*" >&2; exit 2; }
need() { [ -n "${!1:-}" ] || die "$1 is not set ($2)"; }

need MLFLOW_BACKEND_STORE_URI "the tracking database, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow"
need MLFLOW_ARTIFACTS_DESTINATION "where artifacts go, e.g. s3://mlflow or /srv/mlflow-artifacts"
need MLFLOW_AUTH_ADMIN_USERNAME "the basic-auth admin user created on first start"
need MLFLOW_AUTH_ADMIN_PASSWORD "that user's password (only read on first start)"
need MLFLOW_FLASK_SERVER_SECRET_KEY "a long random string; the same on every server replica"
export MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}"
export MLFLOW_AUTH_DEFAULT_PERMISSION="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
export MLFLOW_AUTH_CACHE_TTL_S="${MLFLOW_AUTH_CACHE_TTL_S:-60}"
# GenAI evaluation jobs (huey worker processes) are not used by sweeps: off unless asked for
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-4}"
MLFLOW_DB_WAIT_S="${MLFLOW_DB_WAIT_S:-60}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$MLFLOW_BIN")")/python}"
[ -x "$PYTHON" ] || PYTHON=python3
case "$MLFLOW_AUTH_DEFAULT_PERMISSION" in
  READ | USE | EDIT | MANAGE | NO_PERMISSIONS) ;;
  *) die "MLFLOW_AUTH_DEFAULT_PERMISSION=$MLFLOW_AUTH_DEFAULT_PERMISSION: use READ, USE, EDIT, MANAGE or NO_PERMISSIONS" ;;
esac

# Wait for the databases (compose starts everything at once), then say exactly which one is missing.
"$PYTHON" - "$MLFLOW_DB_WAIT_S" <<'PY' || exit 2
import os, sys, time

import sqlalchemy
from sqlalchemy.engine import make_url

deadline = time.monotonic() + float(sys.argv[1])
for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
    try:
        url = make_url(os.environ[var])
        shown = url.render_as_string(hide_password=True)
        args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=args)
    except (sqlalchemy.exc.ArgumentError, ImportError) as e:  # a typo or a missing driver: no waiting
        sys.exit(f"mlflow/serve.sh: {var}: unusable database URI: {type(e).__name__}: {e}")
    while True:
        try:
            with engine.connect():
                break
        except sqlalchemy.exc.OperationalError as e:  # not up yet, wrong password, no such database
            if time.monotonic() > deadline:
                first = str(e.orig or e).strip().splitlines()[0]
                sys.exit(f"mlflow/serve.sh: {var}: cannot connect to {shown}: {first}")
            time.sleep(2)
PY

# The auth config with this environment's values, readable only by us (it holds the DB password).
MLFLOW_AUTH_CONFIG_PATH="$(mktemp -t mlflow-basic-auth.XXXXXX.ini)"
export MLFLOW_AUTH_CONFIG_PATH
chmod 600 "$MLFLOW_AUTH_CONFIG_PATH"
"$PYTHON" - "$here/basic_auth.ini" >"$MLFLOW_AUTH_CONFIG_PATH" <<'PY' || exit 2
import os, string, sys

try:
    sys.stdout.write(string.Template(open(sys.argv[1]).read()).substitute(os.environ))
except KeyError as e:
    sys.exit(f"mlflow/serve.sh: {sys.argv[1]} needs the environment variable {e.args[0]}")
PY

# Local artifact destinations must exist; s3:// (MinIO, AWS) needs boto3 and AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY (+ MLFLOW_S3_ENDPOINT_URL for MinIO). MLFLOW_CREATE_BUCKET=true creates the
# bucket when it is missing (compose: a fresh MinIO has none).
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://*)
    if [ "${MLFLOW_CREATE_BUCKET:-false}" = true ]; then
      "$PYTHON" - "$MLFLOW_DB_WAIT_S" <<'PY' || exit 2
import os, sys, time
from urllib.parse import urlparse

import boto3
import botocore.exceptions

bucket = urlparse(os.environ["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
s3 = boto3.client("s3", endpoint_url=endpoint)
deadline = time.monotonic() + float(sys.argv[1])
while True:
    try:
        s3.head_bucket(Bucket=bucket)
        break
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            s3.create_bucket(Bucket=bucket)
            print(f"mlflow/serve.sh: created bucket {bucket} at {endpoint or 'AWS'}", file=sys.stderr)
            break
        sys.exit(f"mlflow/serve.sh: bucket {bucket} at {endpoint or 'AWS'}: {e} (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    except botocore.exceptions.EndpointConnectionError as e:
        if time.monotonic() > deadline:
            sys.exit(f"mlflow/serve.sh: object store {endpoint} unreachable: {e}")
        time.sleep(2)
PY
    fi
    ;;
  *://*) ;;
  *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;;
esac

exec "$MLFLOW_BIN" server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --app-name basic-auth \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "$MLFLOW_WORKERS" \
  "$@"
