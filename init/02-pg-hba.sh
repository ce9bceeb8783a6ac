#!/bin/sh
# Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d).
# Client authentication for the compose network: the replicas stream WAL as `replicator`,
# pgsplit logs in as the application roles; both with SCRAM-SHA-256. The replicas get this
# file with their pg_basebackup copy.
set -eu

cat >>"$PGDATA/pg_hba.conf" <<'HBA'

# ---- pgsplit init/02-pg-hba.sh ----
host    replication  replicator  all  scram-sha-256
host    all          all         all  scram-sha-256
HBA
