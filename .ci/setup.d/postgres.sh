#!/usr/bin/env bash
# PostgreSQL for tests/test_tracking_server.py: the MLflow server's backend store in the test, as in
# the compose stack. Installs the Debian packages, starts the default cluster (no systemd needed) and
# creates a login role allowed to create databases (each test run makes its own throwaway ones).
# Idempotent: a second run changes nothing. Run as root on Debian.
# Role, password and port match the tests' default CXR_TEST_POSTGRES_URI
# (postgresql://cxr_test:cxr_test@127.0.0.1:5432/cxr_test); override with CXR_PG_* here and that there.
set -euo pipefail

PG_USER="${CXR_PG_USER:-cxr_test}"
PG_PASSWORD="${CXR_PG_PASSWORD:-cxr_test}"
PG_DB="${CXR_PG_DB:-cxr_test}"

if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# newest installed server version; its "main" cluster (the Debian package creates it; recreate if absent)
PG_VERSION="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf "%f\n" | sort -V | tail -n 1)"
if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main"' | grep -q .; then
  pg_createcluster "$PG_VERSION" main --port 5432 >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  pg_ctlcluster "$PG_VERSION" main start
fi

# wait until it accepts connections (a fresh start takes a moment)
for _ in $(seq 1 30); do
  if runuser -u postgres -- pg_isready -q -h /var/run/postgresql; then break; fi
  sleep 1
done
runuser -u postgres -- pg_isready -h /var/run/postgresql

psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA -h /var/run/postgresql "$@"; }

if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '${PG_USER}'")" != "1" ]; then
  psql_admin -c "CREATE ROLE \"${PG_USER}\" LOGIN CREATEDB PASSWORD '${PG_PASSWORD}'"
else
  psql_admin -c "ALTER ROLE \"${PG_USER}\" LOGIN CREATEDB PASSWORD '${PG_PASSWORD}'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '${PG_DB}'")" != "1" ]; then
  psql_admin -c "CREATE DATABASE \"${PG_DB}\" OWNER \"${PG_USER}\""
fi

# the same check the tests make: a password login over TCP on 127.0.0.1
PGPASSWORD="$PG_PASSWORD" psql -qtA -h 127.0.0.1 -U "$PG_USER" -d "$PG_DB" -c "SELECT 1" >/dev/null
echo "PostgreSQL $PG_VERSION ready: postgresql://${PG_USER}:***@127.0.0.1:5432/${PG_DB}"
