#!/usr/bin/env bash
# The postgres image's contract, for the stack test's stand-in: on an empty PGDATA, create the cluster
# and the POSTGRES_USER role (password POSTGRES_PASSWORD) owning database POSTGRES_DB; then serve on
# every interface of the container (its network is the compose project's backend network).
set -euo pipefail
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 -U postgres -q --set=u="$POSTGRES_USER" --set=p="$POSTGRES_PASSWORD" \
    --set=d="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"u" LOGIN PASSWORD :'p';
CREATE DATABASE :"d" OWNER :"u";
SQL
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
