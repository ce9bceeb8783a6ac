#!/usr/bin/env bash
# Entry point of the replica containers in docker-compose.yaml (image postgres:15).
#
# On first start (empty data directory) it waits until the primary accepts connections, clones
# it with `pg_basebackup -R` (which writes standby.signal and primary_conninfo) over the
# replica's physical replication slot, then runs postgres as a hot standby that streams WAL
# from the primary. Later starts reuse the data directory.
#
# Environment: REPLICA_NAME (replica1, replica2; also the slot prefix and cluster_name),
# PRIMARY_HOST (default primary), PRIMARY_PORT (5432), REPLICATION_USER (replicator),
# REPLICATION_PASSWORD (required), PGDATA (/var/lib/postgresql/data).
set -euo pipefail

: "${REPLICA_NAME:?set REPLICA_NAME}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"
PRIMARY_HOST=${PRIMARY_HOST:-primary}
PRIMARY_PORT=${PRIMARY_PORT:-5432}
REPLICATION_USER=${REPLICATION_USER:-replicator}
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA

# postgres refuses to run as root: prepare the data directory, then start again as postgres.
if [[ $(id -u) -eq 0 ]]; then
	mkdir -p "$PGDATA"
	chown -R postgres:postgres "$PGDATA"
	chmod 700 "$PGDATA"
	exec gosu postgres bash "$0" "$@"
fi

until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER"; do
	echo "replica.sh: waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
	sleep 1
done

if [[ ! -s $PGDATA/PG_VERSION ]]; then
	echo "replica.sh: cloning the primary into $PGDATA"
	# Leftovers of an interrupted clone: pg_basebackup wants an empty directory.
	find "$PGDATA" -mindepth 1 -delete
	PGPASSWORD=$REPLICATION_PASSWORD pg_basebackup \
		-h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" \
		-D "$PGDATA" -Fp -Xs -P -R -S "${REPLICA_NAME}_slot"
	# primary_conninfo carries the password (written by -R); keep the directory private.
	chmod 700 "$PGDATA"
fi

# Settings a hot standby needs at least as high as the primary's are given the same values.
exec postgres -D "$PGDATA" \
	-c hot_standby=on \
	-c cluster_name="$REPLICA_NAME" \
	-c max_wal_senders=10 \
	-c max_replication_slots=10 \
	-c wal_retrieve_retry_interval=1s \
	-c shared_preload_libraries=pg_stat_statements
