#!/usr/bin/env bash
# What the official postgres image does on start, in short: a first start creates the cluster, the user,
# the database and runs /docker-entrypoint-initdb.d/*.sql; every start then runs the server.
set -euo pipefail
export PGPASSWORD="$POSTGRES_PASSWORD"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # UTF-8: a cluster in SQL_ASCII hands psycopg bytes for text, which SQLAlchemy (MLflow, Optuna) cannot read.
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=<(echo "$POSTGRES_PASSWORD") -A scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 > /dev/null
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start > /dev/null
    psql -h /tmp -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$POSTGRES_DB\""
    for script in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$script" ] && psql -h /tmp -U "$POSTGRES_USER" -d postgres -q -f "$script"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses="${POSTGRES_LISTEN:-*}" -k /var/run/postgresql
