# PostgreSQL 15 from Debian, for docker/compose.local.yaml: where the postgres image cannot be pulled (the
# tests' machines), the same server built on the local base. Takes the official image's POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB and /docker-entrypoint-initdb.d/*.sql.
ARG BASE_IMAGE=codetune-base:bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data   # a new volume takes this owner
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
