-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as
-- POSTGRES_USER (admin, superuser) in POSTGRES_DB (appdb). The same roles as scripts/cluster.
SET password_encryption = 'scram-sha-256';

-- Streaming replication: replica.sh clones the primary and streams WAL as this role.
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator_password';
-- One physical slot per replica: the primary keeps the WAL a replica has not received yet.
SELECT pg_create_physical_replication_slot('replica1_slot');
SELECT pg_create_physical_replication_slot('replica2_slot');

-- The application's role owns the application database (and so its public schema).
CREATE ROLE app LOGIN PASSWORD 'app_pw';
ALTER DATABASE appdb OWNER TO app;

-- Per-node statement counts: which node ran which query (shared_preload_libraries is set
-- on every node in docker-compose.yaml).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
