//! Table-driven tests for `classify`.
//!
//! Each row is `(sql, spec)`. The spec is strict: whatever it does not mention must be
//! false / empty / `None`, and `statement_count` must be 1 unless `n=` says otherwise.
//!
//! Spec words: `R` / `P` target; `?` = the unparsed fallback (`P wu vol unparsed`);
//! `ro` / `rw` begins_tx; `pin`; `wu` (writes_unknown); `vol`; `unparsed`; `n=N`;
//! `r=a,b` tables read; `w=a,b` tables written; session ops in order: `set=name`,
//! `reset=name`, `resetall`, `discardall`, `dealloc=name`, `deallocall`.

use super::super::{Classification, SessionOp, Target, TxAccess, TxEffect};
use super::{classify, classify_with};

#[rustfmt::skip]
const CASES: &[(&str, &str)] = &[
    // Plain reads.
    ("SELECT 1", "R"),
    ("select 1", "R"),
    ("SELECT * FROM albums", "R r=albums"),
    ("SELECT id, title FROM albums WHERE id = $1", "R r=albums"),
    ("SELECT * FROM public.albums", "R r=public.albums"),
    ("SELECT * FROM Albums", "R r=albums"),
    (r#"SELECT * FROM "Albums""#, "R r=Albums"),
    (r#"SELECT * FROM "Public"."Albums" a"#, "R r=Public.Albums"),
    ("SELECT a.id, s.title FROM albums a JOIN songs s ON s.album_id = a.id", "R r=albums,songs"),
    ("SELECT * FROM t1 LEFT JOIN t2 USING (id) CROSS JOIN t3 NATURAL JOIN t1", "R r=t1,t2,t3"),
    ("SELECT * FROM albums WHERE id IN (SELECT album_id FROM songs WHERE len > 300)", "R r=albums,songs"),
    ("SELECT (SELECT max(id) FROM songs), a.* FROM albums a", "R r=songs,albums"),
    ("SELECT * FROM albums a WHERE EXISTS (SELECT 1 FROM songs s WHERE s.album_id = a.id)", "R r=albums,songs"),
    ("SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.id = t.id) s", "R r=t,u"),
    ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC NULLS LAST", "R r=t"),
    ("SELECT count(*), sum(x), avg(x), min(x), max(x) FROM t GROUP BY y HAVING count(*) > 1", "R r=t"),
    ("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t", "R r=t"),
    ("SELECT lower(name), upper(name), coalesce(a, b), length(c) FROM t", "R r=t"),
    ("SELECT json_build_object('id', id), jsonb_agg(x) FROM t GROUP BY id", "R r=t"),
    ("SELECT j->>'a', j #> '{a,b}', arr[1:2], j @> '{}' FROM t", "R r=t"),
    ("SELECT * FROM t WHERE x = ANY($1) AND y IS DISTINCT FROM $2", "R r=t"),
    ("SELECT * FROM t ORDER BY id LIMIT 10 OFFSET 20", "R r=t"),
    ("SELECT * FROM t FETCH FIRST 5 ROWS ONLY", "R r=t"),
    ("SELECT * FROM ONLY t", "R r=t"),
    ("SELECT a FROM t UNION SELECT a FROM u EXCEPT SELECT a FROM v", "R r=t,u,v"),
    ("VALUES (1, 'a'), (2, 'b')", "R"),
    ("SELECT * FROM (VALUES (1)) v(a)", "R"),
    ("TABLE albums", "R r=albums"),
    ("table public.albums ORDER BY 1 LIMIT 2", "R r=public.albums"),
    ("SELECT 1 UNION TABLE t", "R r=t"),
    ("WITH x AS (SELECT 1) SELECT 1 UNION TABLE x", "R"),
    ("SELECT * FROM generate_series(1, 10) g", "R"),
    ("SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY", "R"),
    ("SELECT CAST(a AS int), a::text, EXTRACT(year FROM d) FROM t", "R r=t"),
    ("SELECT 'it''s', E'a\\nb', $$dollar$$, $q$x$q$", "R"),
    ("SELECT t.id FROM t WHERE t.name LIKE 'a%' AND t.x BETWEEN 1 AND 2", "R r=t"),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", "R vol r=t"),
    ("SELECT * FROM pg_stat_statements ORDER BY calls DESC", "P vol r=pg_stat_statements"),
    ("SELECT * FROM public.pg_stat_statements", "P vol r=public.pg_stat_statements"),
    ("SELECT n_live_tup FROM pg_catalog.pg_stat_user_tables", "P vol r=pg_catalog.pg_stat_user_tables"),
    ("SELECT * FROM pg_statio_user_tables", "P vol r=pg_statio_user_tables"),
    // A standby's sequence values are those the primary logged ahead.
    ("SELECT last_value FROM pg_catalog.pg_sequences WHERE sequencename = 's'", "P vol r=pg_catalog.pg_sequences"),
    ("SELECT pg_sequence_last_value('s'::regclass)", "P vol"),
    // Importable only where it was exported: read-only blocks that share one start there.
    ("SELECT pg_export_snapshot()", "P vol"),
    // The planner's statistics are the replicated catalog's.
    ("SELECT * FROM pg_stats WHERE tablename = 't'", "R r=pg_stats"),
    ("SELECT * FROM pg_catalog.pg_tables", "R r=pg_catalog.pg_tables"),
    ("SELECT version()", "R"),
    ("SELECT * FROM t WHERE b OPERATOR(pg_catalog.~) 'x'", "R r=t"),
    // CTEs: their names are not tables.
    ("WITH x AS (SELECT * FROM t) SELECT * FROM x JOIN x y ON true", "R r=t"),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r", "R"),
    ("WITH x AS MATERIALIZED (SELECT * FROM t) SELECT * FROM x, u", "R r=t,u"),
    ("WITH t AS (SELECT 1) SELECT * FROM (WITH u AS (SELECT 2) SELECT * FROM u, t) s, u", "R r=u"),
    // A CTE's body sees only the CTEs before it: the inner name is the table of that name.
    ("WITH t AS (SELECT * FROM t WHERE id = 1) SELECT * FROM t JOIN u USING (id)", "R r=t,u"),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b", "R r=b"),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", "R"),
    ("WITH x AS (WITH x AS (SELECT * FROM x) SELECT * FROM x) SELECT * FROM x", "R r=x"),
    ("WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "R"),
    // Volatile reads stay on replicas but must never be cached.
    ("SELECT now()", "R vol"),
    ("SELECT CURRENT_TIMESTAMP", "R vol"),
    ("SELECT current_date, localtimestamp", "R vol"),
    ("SELECT * FROM t WHERE ts > now() - interval '1 hour'", "R vol r=t"),
    ("SELECT random()", "R vol"),
    ("SELECT gen_random_uuid()", "R vol"),
    ("SELECT clock_timestamp(), statement_timestamp()", "R vol"),
    ("SELECT pg_sleep(1)", "R vol"),
    ("SELECT pg_backend_pid(), inet_server_port()", "R vol"),
    ("SELECT my_func(1)", "R vol"),
    ("SELECT * FROM my_func(1) AS f", "R vol"),
    ("SELECT app.lower(x) FROM t", "R vol r=t"),
    (r#"SELECT "Lower"(x) FROM t"#, "R vol r=t"),
    ("SELECT pg_catalog.lower(x) FROM t", "R r=t"),
    ("SELECT 'now'::timestamptz", "R vol"),
    ("SELECT current_setting('server_version_num')::int", "R vol"),
    ("VALUES (now())", "R vol"),
    // A new sample each time, unless seeded.
    ("SELECT * FROM t TABLESAMPLE BERNOULLI (10)", "R vol r=t"),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10) REPEATABLE (42)", "R r=t"),
    // Locking reads.
    ("SELECT * FROM t FOR UPDATE", "P r=t"),
    ("SELECT * FROM t WHERE id = 1 FOR SHARE NOWAIT", "P r=t"),
    ("SELECT * FROM t FOR UPDATE OF t SKIP LOCKED", "P r=t"),
    ("SELECT * FROM t LIMIT 1 FOR UPDATE", "P r=t"),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", "P r=t"),
    ("SELECT * FROM t FOR NO KEY UPDATE", "?"),
    ("SELECT * FROM t FOR KEY SHARE", "?"),
    // SELECT INTO creates a table.
    ("SELECT * INTO newt FROM t", "P r=t w=newt"),
    ("SELECT * INTO TEMP newt FROM t", "P pin r=t w=newt"),
    ("SELECT * INTO TEMPORARY TABLE newt FROM t", "P pin r=t w=newt"),
    ("SELECT * INTO UNLOGGED archive.newt FROM t", "P r=t w=archive.newt"),
    // Primary-only functions, anywhere in the statement.
    ("SELECT nextval('s')", "P wu vol"),
    ("SELECT pg_catalog.nextval('s')", "P wu vol"),
    ("select NEXTVAL('s')", "P wu vol"),
    ("SELECT setval('s', 10)", "P wu vol"),
    ("SELECT currval('s')", "P vol"),
    ("SELECT lastval()", "P vol"),
    ("SELECT * FROM nextval('s')", "P wu vol"),
    ("SELECT id, nextval('s') FROM t", "P wu vol r=t"),
    ("SELECT * FROM t WHERE id IN (SELECT lo_import('/x'))", "P wu vol r=t"),
    ("SELECT lo_unlink(1)", "P wu vol"),
    ("SELECT txid_current()", "P wu vol"),
    ("SELECT pg_current_xact_id()", "P wu vol"),
    ("SELECT txid_current_if_assigned()", "P vol"),
    ("SELECT pg_notify('chan', 'x')", "P wu vol"),
    ("SELECT pg_current_wal_lsn()", "P vol"),
    ("SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()", "P vol"),
    ("SELECT pg_switch_wal()", "P wu vol"),
    ("SELECT pg_terminate_backend(123)", "P wu vol"),
    ("SELECT pg_cancel_backend(123)", "P wu vol"),
    ("SELECT pg_reload_conf()", "P wu vol"),
    ("SELECT pg_stat_reset()", "P wu vol"),
    ("SELECT pg_stat_reset_shared('bgwriter')", "P wu vol"),
    ("SELECT dblink_exec('conn', 'DELETE FROM t')", "P wu vol"),
    ("SELECT pg_create_restore_point('x')", "P wu vol"),
    // A Unicode-escaped name is not the name sqlparser reads: nothing is guessed.
    (r#"SELECT U&"\0070g_advisory_lock"(8)"#, "? pin"),
    (r#"select u&"set\005fconfig"('search_path', 'evil', false)"#, "? pin"),
    // Session-changing calls in what sqlparser cannot read pin the session.
    ("SELECT set_config('search_path', 'evil', false), 1 BETWEEN SYMMETRIC 2 AND 0", "? pin"),
    ("SELECT pg_advisory_lock(1), 1 BETWEEN SYMMETRIC 2 AND 0", "? pin"),
    ("SELECT now(), 1 BETWEEN SYMMETRIC 2 AND 0", "?"),
    ("SELECT * INTO TEMP x FROM t WHERE id BETWEEN SYMMETRIC 1 AND 10", "? pin"),
    ("CREATE TABLE pg_temp.x (LIKE y INCLUDING ALL)", "? pin"),
    // A quoted "temp" is a name, not the keyword.
    (r#"SELECT "temp" FROM t WHERE id BETWEEN SYMMETRIC 1 AND 10"#, "?"),
    ("SELECT dblink_connect('c', 'x'), 1 BETWEEN SYMMETRIC 2 AND 0", "? pin"),
    // A standby runs node functions as its own: pg_promote there promotes it.
    ("SELECT pg_promote()", "P wu vol"),
    ("SELECT pg_wal_replay_pause()", "P wu vol"),
    ("SELECT pg_create_physical_replication_slot('s1')", "P wu vol"),
    ("SELECT * FROM pg_create_logical_replication_slot('s', 'pgoutput')", "P wu vol"),
    ("SELECT pg_drop_replication_slot('s')", "P wu vol"),
    ("SELECT pg_logical_emit_message(true, 'outbox', 'x')", "P wu vol"),
    ("SELECT * FROM pg_logical_slot_get_changes('s', NULL, NULL)", "P wu vol"),
    ("SELECT pg_replication_origin_create('o')", "P wu vol"),
    ("SELECT pg_stat_statements_reset()", "P wu vol"),
    ("SELECT * FROM t ORDER BY nextval('s')", "P wu vol r=t"),
    ("SELECT CASE WHEN x THEN nextval('s') END FROM t", "P wu vol r=t"),
    ("SELECT count(*) FILTER (WHERE nextval('s') > 0) FROM t", "P wu vol r=t"),
    ("SELECT * FROM t JOIN u ON u.id = nextval('s')", "P wu vol r=t,u"),
    ("SELECT * FROM t LIMIT nextval('s')", "P wu vol r=t"),
    ("WITH x AS (SELECT nextval('s')) SELECT * FROM x", "P wu vol"),
    // Advisory locks and set_config.
    ("SELECT pg_advisory_lock(42)", "P pin vol"),
    ("SELECT pg_advisory_lock_shared(42)", "P pin vol"),
    ("SELECT pg_try_advisory_lock(1, 2)", "P pin vol"),
    ("SELECT pg_try_advisory_lock_shared(1)", "P pin vol"),
    ("SELECT pg_advisory_xact_lock(42)", "P vol"),
    ("SELECT pg_try_advisory_xact_lock_shared(42)", "P vol"),
    ("SELECT pg_advisory_unlock(42)", "P vol"),
    ("SELECT pg_advisory_unlock_all()", "P vol"),
    ("SELECT 1 WHERE EXISTS (SELECT pg_advisory_lock(1))", "P pin vol"),
    ("SELECT set_config('app.user', '42', false)", "P vol rb=app.user"),
    ("SELECT set_config('JIT', $1, false)", "P vol rb=jit"),
    ("SELECT set_config(current_user || '.x', '1', false)", "P pin vol"),
    ("SELECT set_config('app.user', $1, $2)", "P vol rb=app.user"),
    ("SELECT set_config('app.user', '42', true)", "P vol"),
    // Node-identity probes and per-node views.
    ("SELECT pg_is_in_recovery()", "P vol"),
    ("select pg_catalog.pg_is_in_recovery()", "P vol"),
    ("SHOW transaction_read_only", "P vol"),
    ("SHOW default_transaction_read_only", "P vol"),
    ("show IN_HOT_STANDBY", "P vol"),
    ("SHOW pool_nodes", "P vol"),
    ("SELECT current_setting('transaction_read_only')", "P vol"),
    ("SELECT current_setting('IN_HOT_STANDBY')", "P vol"),
    ("SELECT current_setting($1)", "R vol"),
    ("SELECT current_setting('transaction_read_only'::text)", "P vol"),
    ("SELECT current_setting(('in_hot_standby'))", "P vol"),
    ("SELECT current_setting($$in_hot_standby$$)", "P vol"),
    ("SELECT current_setting(E'transaction_read_only')", "P vol"),
    ("SELECT * FROM pg_stat_activity", "P vol r=pg_stat_activity"),
    ("SELECT * FROM pg_catalog.pg_locks WHERE locktype = 'advisory'", "P vol r=pg_catalog.pg_locks"),
    ("SHOW transaction_isolation", "R vol"),
    ("SHOW search_path", "R vol"),
    ("SHOW ALL", "R vol"),
    ("SHOW TIME ZONE", "R vol"),
    // EXPLAIN: only ANALYZE executes.
    ("EXPLAIN SELECT * FROM t", "R vol"),
    ("EXPLAIN (FORMAT JSON) SELECT 1", "R vol"),
    ("EXPLAIN ANALYZE SELECT * FROM t", "R vol r=t"),
    ("EXPLAIN INSERT INTO t VALUES (1)", "R vol"),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "P vol w=t"),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t", "P vol w=t"),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", "R vol"),
    ("EXPLAIN (ANALYSE) DELETE FROM t", "P vol w=t"),
    ("EXPLAIN (ANALYSE, COSTS off) SELECT pg_advisory_lock(7)", "P pin vol"),
    ("EXPLAIN (ANALYZE TRUE) SELECT nextval('s')", "P wu vol"),
    // DML.
    ("INSERT INTO t (a) VALUES (1)", "P w=t"),
    (r#"INSERT INTO "Users" (a) VALUES (1) RETURNING id"#, "P w=Users"),
    ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = excluded.a", "P w=t"),
    ("INSERT INTO archive SELECT * FROM t WHERE old", "P r=t w=archive"),
    ("INSERT INTO t DEFAULT VALUES", "P w=t"),
    ("INSERT INTO t VALUES (nextval('s'), now())", "P wu vol w=t"),
    ("UPDATE t SET a = 1 WHERE id = 2", "P w=t"),
    ("UPDATE public.t AS x SET a = u.a FROM u WHERE x.id = u.id", "P r=u w=public.t"),
    ("UPDATE t SET a = set_config('a', 'b', false)", "P vol w=t rb=a"),
    ("DELETE FROM t WHERE id = 1", "P w=t"),
    ("DELETE FROM t USING u WHERE t.id = u.id", "P r=u w=t"),
    ("DELETE FROM ONLY t", "P w=t"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)", "P r=s w=t"),
    // Data-modifying CTEs.
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "P w=t"),
    ("WITH w AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM w JOIN u USING (id)", "P r=u w=t"),
    ("WITH w AS (INSERT INTO log SELECT * FROM t RETURNING *) DELETE FROM q WHERE id IN (SELECT id FROM w)", "P r=t w=log,q"),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", "P w=t"),
    // COPY.
    ("COPY t FROM STDIN", "P w=t"),
    ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", "P w=t"),
    ("COPY t FROM '/tmp/x.csv'", "P w=t"),
    ("COPY public.t TO STDOUT", "R r=public.t"),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH CSV HEADER", "R r=t"),
    ("COPY t TO '/tmp/x.csv'", "P r=t"),
    ("COPY t TO PROGRAM 'gzip > /tmp/x.gz'", "P r=t"),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "P w=t"),
    ("COPY (SELECT nextval('s')) TO STDOUT", "P wu vol"),
    // psql-style inline data after `COPY ... FROM STDIN;`: on the wire it would be SQL.
    ("COPY t FROM STDIN;\nDELETE FROM u", "? pin"),
    ("COPY t FROM STDIN; DELETE FROM u", "P n=2 w=t,u"),
    ("COPY t FROM STDIN;\n-- just a comment\n", "P w=t"),
    // DDL and utility statements.
    ("CREATE TABLE t (id serial PRIMARY KEY, name text)", "P w=t"),
    ("CREATE TABLE IF NOT EXISTS public.t (a int DEFAULT nextval('s'))", "P wu vol w=public.t"),
    ("CREATE TABLE x AS SELECT * FROM y", "P r=y w=x"),
    ("CREATE UNLOGGED TABLE x (a int)", "P w=x"),
    ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM t", "P r=t w=mv"),
    ("CREATE OR REPLACE VIEW v AS SELECT a FROM t", "P r=t w=v"),
    ("ALTER TABLE t ADD COLUMN c int", "P w=t"),
    // A dropped table may be a partition, a renamed one may shadow another, a table taken
    // out of its parent changes the parent's reads: unknown writes (the commit can no
    // longer tell which tables changed).
    ("DROP TABLE t", "P wu w=t"),
    ("DROP TABLE IF EXISTS a, b CASCADE", "P wu w=a,b"),
    ("DROP VIEW v", "P wu w=v"),
    ("DROP TABLE IF EXISTS pg_temp.scratch", "P w=pg_temp.scratch"),
    ("DROP MATERIALIZED VIEW mv", "P wu w=mv"),
    ("ALTER TABLE s.x RENAME TO t", "P wu w=s.x"),
    ("ALTER TABLE child NO INHERIT parent", "P wu w=child"),
    ("ALTER TABLE child INHERIT parent", "P w=child"),
    ("DROP INDEX i", "P w=i"),
    ("DROP FUNCTION f", "P wu vol"),
    ("TRUNCATE t, u", "P w=t,u"),
    ("TRUNCATE TABLE ONLY t RESTART IDENTITY CASCADE", "P wu w=t"),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", "P r=t w=t"),
    ("CREATE SEQUENCE s", "P w=s"),
    ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", "P w=mv"),
    ("CREATE SCHEMA s", "P wu vol"),
    ("CREATE EXTENSION IF NOT EXISTS pgcrypto", "P wu vol"),
    ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "P wu vol"),
    ("CREATE TYPE mood AS ENUM ('a', 'b')", "P wu vol"),
    ("CREATE ROLE bob LOGIN", "P wu vol"),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", "P wu vol"),
    ("COMMENT ON TABLE t IS 'x'", "P w=pg_catalog.pg_description"),
    ("GRANT SELECT ON t TO bob", "P wu vol"),
    ("REVOKE ALL ON t FROM bob", "P wu vol"),
    ("VACUUM", "P"),
    ("VACUUM FULL t", "P"),
    ("ANALYZE t", "P r=t"),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "P r=t"),
    ("CALL proc(1)", "P wu vol"),
    ("NOTIFY chan, 'payload'", "P"),
    // Texts sqlparser splits into statements unlike the server: a SET hidden in what it
    // takes for one string must not run on a replica's pooled connection.
    ("SELECT 1 >/* ' */ 0; SET search_path = evil, public; SELECT ' AS a, ' AS b --'", "? pin"),
    ("SELECT $€$, '$€$ AS x; SET search_path = evil, public; SELECT ' AS y --'", "? pin"),
    ("SELECT $a€$, '$a€$ AS x; SET search_path = evil, public; SELECT ' AS y --'", "? pin"),
    ("SELECT '{}'::jsonb ?-- '\n' AS k, '; SET search_path = evil, public; SELECT ' AS b --'", "? pin"),
    // ... and what only looks like them stays a read.
    ("SELECT '$€', 'a<!--b', data->>'k', 1 - -2 FROM t -- note", "R r=t"),
    ("SELECT data #>> '{a,b}' FROM t /* a - b */ WHERE x @> '{}'", "R r=t"),
    ("SELECT E'\u{FFFD}\\'; SET search_path = evil, public; SELECT ' AS b --'", "? pin"),
    // PostgreSQL that sqlparser 0.64 cannot parse: the conservative fallback.
    ("DO $$ BEGIN PERFORM 1; END $$", "?"),
    ("CHECKPOINT", "?"),
    ("CLUSTER t USING idx", "?"),
    ("REINDEX TABLE t", "?"),
    ("VACUUM (VERBOSE, ANALYZE) t", "?"),
    ("ALTER SYSTEM SET work_mem = '64MB'", "?"),
    ("SECURITY LABEL FOR selinux ON TABLE t IS 'x'", "?"),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO public", "?"),
    ("CREATE PUBLICATION p FOR ALL TABLES", "?"),
    ("CREATE STATISTICS s ON a, b FROM t", "?"),
    ("ALTER SEQUENCE s RESTART WITH 1", "?"),
    ("CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()", "?"),
    ("REASSIGN OWNED BY a TO b", "?"),
    ("SELECT xmlelement(name foo, 'bar')", "?"),
    ("SELECT t.*::text FROM t", "?"),
    ("SELECT * FROM t WHERE c BETWEEN SYMMETRIC 1 AND 2", "?"),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2)) AS x(a)", "?"),
    ("MOVE NEXT FROM c", "?"),
    ("FETCH 10 c", "?"),
    ("DELETE FROM t WHERE CURRENT OF c", "?"),
    ("PREPARE TRANSACTION 'tx1'", "?"),
    ("COMMIT PREPARED 'tx1'", "?"),
    ("ROLLBACK PREPARED 'tx1'", "?"),
    ("SELECT 'unterminated", "? pin"),
    ("SELEC 1", "?"),
    ("SELECT 1 END", "?"),
    ("SELECT * FROM t WHERE a = 1 END; DROP TABLE t", "? n=2 w=t"),
    // Transaction control.
    ("BEGIN", "P rw"),
    ("begin work", "P rw"),
    ("BEGIN TRANSACTION", "P rw"),
    ("BEGIN READ WRITE", "P rw"),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ", "P rw"),
    ("START TRANSACTION", "P rw"),
    ("START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE", "P rw"),
    ("BEGIN READ ONLY", "R ro"),
    ("BEGIN TRANSACTION READ ONLY", "R ro"),
    ("START TRANSACTION READ ONLY", "R ro"),
    ("START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE READ", "R ro"),
    ("begin isolation level repeatable read read only", "R ro"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", "P rw"),
    ("START TRANSACTION READ ONLY, READ WRITE", "P rw"),
    // Modes sqlparser does not read: still a transaction start that writes nothing.
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", "P rw unparsed"),
    ("BEGIN READ ONLY DEFERRABLE", "R ro unparsed"),
    // SERIALIZABLE or READ WRITE anywhere, not only in the first words.
    ("START TRANSACTION READ ONLY, DEFERRABLE, ISOLATION LEVEL SERIALIZABLE", "P rw unparsed"),
    ("START TRANSACTION READ ONLY, NOT DEFERRABLE", "R ro unparsed"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", "P rw unparsed"),
    ("BEGIN READ ONLY DEFERRABLE; DELETE FROM t", "P ro unparsed w=t n=2"),
    ("BEGIN READ ONLY; DELETE FROM t", "P ro w=t n=2"),
    ("COMMIT", "P"),
    ("COMMIT WORK", "P"),
    ("COMMIT AND CHAIN", "P"),
    ("END", "P"),
    ("END TRANSACTION", "P"),
    ("ROLLBACK", "P"),
    ("ABORT", "P"),
    ("ROLLBACK TO SAVEPOINT s1", "P"),
    ("ROLLBACK TO s1", "P"),
    ("SAVEPOINT s1", "P"),
    ("RELEASE SAVEPOINT s1", "P"),
    ("RELEASE s1", "P"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "P"),
    ("SET TRANSACTION READ ONLY", "P"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", "?"),
    // SET / RESET / DISCARD / DEALLOCATE.
    ("SET search_path TO a, b", "P set=search_path"),
    (r#"SET search_path = "$user", public"#, "P set=search_path"),
    ("SET SESSION search_path TO a", "P set=search_path"),
    ("SET LOCAL search_path TO a", "P"),
    ("SET TIME ZONE 'UTC'", "P set=timezone"),
    // DEFAULT (and a time zone's LOCAL) is a RESET: the login's value, not the server's.
    ("SET TIME ZONE LOCAL", "P reset=timezone"),
    ("SET TIME ZONE DEFAULT", "P reset=timezone"),
    ("set time zone default", "P reset=timezone"),
    ("SET statement_timeout TO DEFAULT", "P reset=statement_timeout"),
    ("SET SESSION statement_timeout = default", "P reset=statement_timeout"),
    ("SET datestyle TO DEFAULT", "P reset=datestyle"),
    ("SET search_path TO 'default'", "P set=search_path"),
    (r#"SET search_path TO "default""#, "P set=search_path"),
    ("SET LOCAL statement_timeout TO DEFAULT", "P"),
    ("SET TIME ZONE 'local'", "P set=timezone"),
    ("SET LOCAL TIME ZONE 'UTC'", "P"),
    ("SET timezone = 'Europe/Paris'", "P set=timezone"),
    (r#"SET "TimeZone" TO 'UTC'"#, "P set=timezone"),
    ("SET SCHEMA 'app'", "? set=search_path"),
    ("SET NAMES 'UTF8'", "P set=client_encoding"),
    ("SET ROLE admin", "P set=role"),
    ("SET ROLE NONE", "P set=role"),
    ("SET LOCAL ROLE admin", "P"),
    ("SET SESSION AUTHORIZATION bob", "P set=session_authorization"),
    ("SET SESSION AUTHORIZATION DEFAULT", "P set=session_authorization"),
    ("SET LOCAL SESSION AUTHORIZATION bob", "?"),
    ("SET application_name = 'my app'", "P set=application_name"),
    // One half of a DateStyle keeps the other: the whole value is read back.
    ("SET DateStyle TO 'ISO, MDY'", "P rb=datestyle"),
    // Reset later in the same text: nothing of it to read back.
    ("SET datestyle = 'ISO'; RESET datestyle", "P reset=datestyle n=2"),
    ("SET datestyle = 'ISO'; RESET ALL", "P resetall n=2"),
    ("RESET datestyle; SET datestyle = 'ISO'", "P reset=datestyle rb=datestyle n=2"),
    ("SET pgsplit.route = 'primary'", "P set=pgsplit.route"),
    ("SET XML OPTION DOCUMENT", "? set=xmloption"),
    ("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE", "P set=timezone"),
    ("SET SESSION ROLE admin", "P set=role"),
    ("SET search_path TO DEFAULT", "P reset=search_path"),
    ("SET x.y TO -1", "P set=x.y"),
    ("SET LOCAL statement_timeout = '1s'", "P"),
    ("SET transaction_read_only = on", "P"),
    // A serializable default sends the session's reads to the primary while it is in
    // force (the session follows it): no pin, which would last.
    ("SET default_transaction_isolation = 'serializable'", "P set=default_transaction_isolation"),
    ("SET default_transaction_isolation = 'repeatable read'", "P set=default_transaction_isolation"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "P set=default_transaction_read_only"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
     "P set=default_transaction_isolation set=default_transaction_read_only"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY DEFERRABLE", "? pin"),
    ("SET a = 1, b = 2", "P pin"),
    ("SET standard_conforming_strings = off", "P pin set=standard_conforming_strings"),
    ("SET standard_conforming_strings TO 'on'", "P set=standard_conforming_strings"),
    ("SET standard_conforming_strings = f", "P pin set=standard_conforming_strings"),
    ("SET standard_conforming_strings = 'of'", "P pin set=standard_conforming_strings"),
    ("SET standard_conforming_strings TO \"off\"", "P pin set=standard_conforming_strings"),
    ("SET standard_conforming_strings = n", "P pin set=standard_conforming_strings"),
    ("SET standard_conforming_strings = tr", "P set=standard_conforming_strings"),
    ("SET standard_conforming_strings = DEFAULT", "P reset=standard_conforming_strings"),
    ("RESET search_path", "P reset=search_path"),
    (r#"RESET "TimeZone""#, "P reset=timezone"),
    ("RESET ALL", "P resetall"),
    ("RESET ROLE", "P reset=role"),
    ("RESET SESSION AUTHORIZATION", "P reset=session_authorization"),
    ("RESET TIME ZONE", "? reset=timezone"),
    ("DISCARD ALL", "P discardall"),
    ("DISCARD PLANS", "P"),
    ("DISCARD SEQUENCES", "P"),
    ("DISCARD TEMP", "P"),
    ("DISCARD TEMPORARY", "P"),
    ("DEALLOCATE foo", "P dealloc=foo"),
    ("DEALLOCATE PREPARE Foo", "P dealloc=foo"),
    (r#"DEALLOCATE "S_1""#, "P dealloc=S_1"),
    (r#"DEALLOCATE "ALL""#, "P dealloc=ALL"),
    ("DEALLOCATE ALL", "P deallocall"),
    ("DEALLOCATE PREPARE ALL", "P deallocall"),
    // Session-bound statements pin the session to its primary connection.
    ("CREATE TEMP TABLE x (a int)", "P pin w=x"),
    ("CREATE TEMPORARY TABLE x AS SELECT * FROM t", "P pin r=t w=x"),
    ("CREATE LOCAL TEMP TABLE x (a int) ON COMMIT DROP", "P pin w=x"),
    ("CREATE GLOBAL TEMPORARY TABLE x (a int)", "P pin w=x"),
    ("CREATE TABLE pg_temp.x (a int)", "P pin w=pg_temp.x"),
    ("CREATE TEMP VIEW v AS SELECT 1", "P pin w=v"),
    ("CREATE TEMP SEQUENCE s", "P pin w=s"),
    ("CREATE TEMP TABLE x (LIKE y INCLUDING ALL)", "? pin"),
    ("SELECT * FROM pg_temp.foo", "P pin r=pg_temp.foo"),
    ("INSERT INTO mydb.pg_temp_3.foo VALUES (1)", "P pin w=mydb.pg_temp_3.foo"),
    ("SELECT * FROM ÄLBUMS", "R r=Älbums"),
    ("LISTEN chan", "P pin"),
    (r#"LISTEN "Chan""#, "P pin"),
    ("UNLISTEN *", "P"),
    ("UNLISTEN chan", "P"),
    (r#"UNLISTEN "Chan""#, "P"),
    (
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
        "P n=4 vol resetall",
    ),
    ("PREPARE q AS SELECT 1", "P pin"),
    ("PREPARE q (int, text) AS SELECT * FROM t WHERE id = $1", "P pin"),
    ("PREPARE q AS SELECT * FROM t FOR NO KEY UPDATE", "? pin"),
    ("EXECUTE q(1, 'a')", "P wu vol"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", "P pin vol r=t"),
    ("DECLARE c CURSOR FOR SELECT * FROM t", "R vol r=t"),
    ("DECLARE c BINARY NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1", "R vol"),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", "P vol r=t"),
    ("FETCH NEXT FROM c", "P vol"),
    ("CLOSE c", "P"),
    ("LOAD 'auto_explain'", "P pin"),
    // Multi-statement strings.
    ("SELECT 1; SELECT 2", "R n=2"),
    ("SELECT * FROM a; SELECT * FROM b;", "R n=2 r=a,b"),
    ("SELECT 1;;SELECT 2;", "R n=2"),
    ("SELECT * FROM t; DELETE FROM u", "P n=2 r=t w=u"),
    ("BEGIN; UPDATE t SET a = 1; COMMIT", "P n=3 rw w=t"),
    ("BEGIN READ ONLY; SELECT * FROM t; COMMIT", "P n=3 ro r=t"),
    ("BEGIN; BEGIN READ ONLY", "P n=2 rw"),
    ("SET search_path TO app; SELECT * FROM t", "P n=2 r=t set=search_path"),
    ("SET a = 1; RESET b; DISCARD ALL; DEALLOCATE ALL", "P n=4 set=a reset=b discardall deallocall"),
    ("SELECT nextval('s'); SELECT 1", "P n=2 wu vol"),
    ("SET XML OPTION CONTENT; SELECT 1", "? n=2 set=xmloption"),
    ("SELECT 1; SET SCHEMA 'x'; SELECT 2", "? n=3 set=search_path"),
    ("BEGIN; SET LOCAL x = 1; SET y TO 2; COMMIT", "P n=4 rw set=y"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SET x = 1",
     "P n=2 wu vol set=x"),
    ("LISTEN a; SELECT 1", "P n=2 pin"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END END; DROP TABLE t", "? pin"),
    // Comments, odd formatting, empty queries.
    ("", "R n=0"),
    ("   \n\t ", "R n=0"),
    ("-- just a comment", "R n=0"),
    ("/* only */", "R n=0"),
    (";", "R n=0"),
    (";;  ;", "R n=0"),
    ("SELECT 1 -- trailing comment", "R"),
    ("/* leading */ SELECT * FROM t", "R r=t"),
    ("SELECT /* inline */ * FROM /* x */ t", "R r=t"),
    ("SELECT 1 /* c /* nested */ still */ + 1", "R"),
    ("\n\n  SeLeCt\t*\nFROM\r\n  t  ;  \n", "R r=t"),
    ("-- c\nDELETE FROM t -- c2\n;", "P w=t"),
    ("/* SELECT */ DELETE FROM t", "P w=t"),
    ("SELECT '/* not a comment */', '-- nor this'", "R"),
    (r#"SELECT 1 AS "--""#, "R"),
    ("SELECT ';' AS semi; DELETE FROM t", "P n=2 w=t"),
    ("SELECT $$;$$; SELECT 2", "R n=2"),
    ("  BEGIN  READ  ONLY  ;", "R ro"),
    ("/*x*/SET/*y*/search_path/*z*/TO/*w*/a", "P set=search_path"),
];

#[derive(Debug, PartialEq)]
struct Expected {
    target: Target,
    begins_tx: Option<TxAccess>,
    pins_session: bool,
    session_ops: Vec<String>,
    read_back: Vec<String>,
    tables_read: Vec<String>,
    tables_written: Vec<String>,
    writes_unknown: bool,
    volatile: bool,
    statement_count: usize,
    parsed: bool,
}

fn names(list: &str) -> Vec<String> {
    list.split(',').map(str::to_owned).collect()
}

fn parse_spec(spec: &str) -> Result<Expected, String> {
    let mut e = Expected {
        target: Target::Replica,
        begins_tx: None,
        pins_session: false,
        session_ops: Vec::new(),
        read_back: Vec::new(),
        tables_read: Vec::new(),
        tables_written: Vec::new(),
        writes_unknown: false,
        volatile: false,
        statement_count: 1,
        parsed: true,
    };
    for word in spec.split_whitespace() {
        match word.split_once('=') {
            None => match word {
                "R" => e.target = Target::Replica,
                "P" => e.target = Target::Primary,
                "?" => {
                    e.target = Target::Primary;
                    e.writes_unknown = true;
                    e.volatile = true;
                    e.parsed = false;
                }
                "ro" => e.begins_tx = Some(TxAccess::ReadOnly),
                "rw" => e.begins_tx = Some(TxAccess::ReadWrite),
                "pin" => e.pins_session = true,
                "wu" => e.writes_unknown = true,
                "vol" => e.volatile = true,
                "unparsed" => e.parsed = false,
                "resetall" | "discardall" | "deallocall" => e.session_ops.push(word.to_owned()),
                _ => return Err(format!("bad spec word {word:?}")),
            },
            Some(("n", n)) => e.statement_count = n.parse().map_err(|_| format!("bad n {n:?}"))?,
            Some(("r", list)) => e.tables_read = names(list),
            Some(("w", list)) => e.tables_written = names(list),
            Some(("rb", list)) => e.read_back = names(list),
            Some(("set" | "reset" | "dealloc", _)) => e.session_ops.push(word.to_owned()),
            _ => return Err(format!("bad spec word {word:?}")),
        }
    }
    Ok(e)
}

/// The spec-word form of a session op (its replay SQL is checked separately).
fn op_word(op: &SessionOp) -> String {
    match op {
        SessionOp::Set { name, .. } => format!("set={name}"),
        SessionOp::Reset { name } => format!("reset={name}"),
        SessionOp::ResetAll => "resetall".to_owned(),
        SessionOp::DiscardAll => "discardall".to_owned(),
        SessionOp::Deallocate { name } => format!("dealloc={name}"),
        SessionOp::DeallocateAll => "deallocall".to_owned(),
    }
}

fn actual(c: &Classification) -> Expected {
    Expected {
        target: c.target,
        begins_tx: c.begins_tx,
        pins_session: c.pins_session,
        session_ops: c.session_ops.iter().map(op_word).collect(),
        read_back: c.read_back.clone(),
        tables_read: c.tables_read.clone(),
        tables_written: c.tables_written.clone(),
        writes_unknown: c.writes_unknown,
        volatile: c.volatile,
        statement_count: c.statement_count,
        parsed: c.parsed,
    }
}

#[test]
fn table() {
    assert!(CASES.len() >= 170, "only {} rows", CASES.len());
    let mut failures = Vec::new();
    for (sql, spec) in CASES {
        match parse_spec(spec) {
            Err(e) => failures.push(format!("{sql:?}: {e}")),
            Ok(want) => {
                let got = actual(&classify(sql));
                if got != want {
                    failures.push(format!("{sql:?}\n    want {want:?}\n    got  {got:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn surrounding_comments_whitespace_and_semicolons_change_nothing() {
    let mut failures = Vec::new();
    for (sql, _) in CASES {
        let wrapped = format!("/* lead */\n\t {sql} ;\n-- tail\n");
        if classify(&wrapped) != classify(sql) {
            failures.push(format!("{sql:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "decision changed for:\n{}",
        failures.join("\n")
    );
}

/// Every recorded SET must replay to exactly itself.
#[test]
fn set_ops_replay_to_themselves() {
    let mut failures = Vec::new();
    let extra = SET_TEXT.iter().map(|(sql, _)| *sql);
    for sql in CASES.iter().map(|(sql, _)| *sql).chain(extra) {
        for op in classify(sql).session_ops {
            let SessionOp::Set { sql: replay, .. } = &op else {
                continue;
            };
            let again = classify(replay).session_ops;
            if again != [op.clone()] {
                failures.push(format!("{sql:?}: {op:?} replays as {again:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The exact replay text of SETs: the statement's own source, comments cut out.
#[rustfmt::skip]
const SET_TEXT: &[(&str, &[&str])] = &[
    ("SET search_path TO a, b", &["SET search_path TO a, b"]),
    ("  set   TimeZone   to   'UTC'  ;  ", &["set   TimeZone   to   'UTC'"]),
    ("/* lead */ SET application_name = 'x'; -- tail", &["SET application_name = 'x'"]),
    ("SET search_path TO a -- comment", &["SET search_path TO a"]),
    ("SET a TO 1; SET b = 'x;y'", &["SET a TO 1", "SET b = 'x;y'"]),
    ("/*x*/SET/*y*/search_path/*z*/TO/*w*/a", &["SET search_path TO a"]),
    ("SET x = 'é' /* ü */; SET y = 'ö'", &["SET x = 'é'", "SET y = 'ö'"]),
    ("SELECT 'ä';\nSET\n  search_path\n  TO a", &["SET\n  search_path\n  TO a"]),
    ("SET SCHEMA 'x'", &["SET SCHEMA 'x'"]),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE",
     &["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
       "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"]),
    // A BEGIN ATOMIC body forces a whole-string parse: the replay is sqlparser's Display.
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; set x to 1",
     &["SET x = 1"]),
];

#[test]
fn set_replay_text() {
    for (sql, want) in SET_TEXT {
        let got: Vec<String> = classify(sql)
            .session_ops
            .into_iter()
            .filter_map(|op| match op {
                SessionOp::Set { sql, .. } => Some(sql),
                _ => None,
            })
            .collect();
        assert_eq!(got, *want, "for {sql:?}");
    }
}

/// A prepared statement keeps the parse settings of its Parse: one the transaction changes
/// for itself makes what it prepares differ from the session's statements of that text.
#[test]
fn pins_a_failure_undoes_are_told_from_those_it_does_not() {
    for (sql, undone) in [
        ("CREATE TEMP TABLE t (a int)", true),
        ("CREATE TEMPORARY VIEW v AS SELECT 1", true),
        ("CREATE TEMP SEQUENCE s", true),
        ("LISTEN chan", true),
        ("PREPARE q AS SELECT 1", true),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", true),
        // A session advisory lock taken before an error stays taken.
        ("SELECT pg_advisory_lock(1)", false),
        ("CREATE TEMP TABLE t AS SELECT pg_advisory_lock(1)", false),
        ("LISTEN a; SELECT pg_advisory_lock(1)", false),
        ("LOAD 'auto_explain'", false),
        ("SELECT 1", false),
    ] {
        let c = classify(sql);
        assert!(c.pins_session || !undone, "{sql}");
        assert_eq!(c.pin_undone_by_failure, undone, "{sql}");
    }
}

#[test]
fn each_pin_names_the_kind_of_state_it_pins_for() {
    use super::super::PinKinds as K;
    for (sql, kinds) in [
        ("LISTEN chan", K::LISTEN),
        ("SELECT pg_advisory_lock(1)", K::ADVISORY_LOCK),
        ("SELECT pg_try_advisory_lock_shared(1, 2)", K::ADVISORY_LOCK),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", K::HOLD_CURSOR),
        ("PREPARE q AS SELECT 1", K::PREPARED),
        ("CREATE TEMP TABLE t (a int)", K::TEMP),
        ("SELECT * FROM pg_temp.t", K::TEMP),
        ("SELECT 1 INTO TEMP t", K::TEMP),
        (
            "LISTEN a; SELECT pg_advisory_lock(1)",
            K::LISTEN | K::ADVISORY_LOCK,
        ),
        ("LOAD 'auto_explain'", K::OTHER),
        ("SELECT dblink_connect('x')", K::OTHER),
        // Unreadable: anything.
        ("LISTEN a b c", K::OTHER),
        ("SELECT 1", K::NONE),
    ] {
        let c = classify(sql);
        assert_eq!(c.pins, kinds, "{sql}");
        assert_eq!(c.pins_session, !kinds.is_empty(), "{sql}");
    }
}

#[test]
fn statements_that_take_back_a_kind_of_pinning_state_in_full_say_so() {
    use super::super::PinKinds as K;
    for (sql, kinds) in [
        ("UNLISTEN *", K::LISTEN),
        ("SELECT pg_advisory_unlock_all()", K::ADVISORY_LOCK),
        (
            "select PG_CATALOG.pg_advisory_unlock_all() AS done",
            K::ADVISORY_LOCK,
        ),
        ("CLOSE ALL", K::HOLD_CURSOR),
        ("DEALLOCATE ALL", K::PREPARED),
        ("DEALLOCATE PREPARE ALL", K::PREPARED),
        ("DISCARD TEMP", K::TEMP),
        ("DISCARD ALL", K::ALL),
        (
            "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
            K::ADVISORY_LOCK | K::HOLD_CURSOR | K::LISTEN,
        ),
        // Only some of it, or maybe not at all.
        ("UNLISTEN chan", K::NONE),
        (r#"UNLISTEN "*""#, K::NONE),
        ("SELECT pg_advisory_unlock(1)", K::NONE),
        ("SELECT pg_advisory_unlock_all() WHERE false", K::NONE),
        ("SELECT pg_advisory_unlock_all() FROM t", K::NONE),
        ("SELECT pg_advisory_unlock_all() LIMIT 0", K::NONE),
        (
            "SELECT CASE WHEN false THEN pg_advisory_unlock_all() END",
            K::NONE,
        ),
        (
            "WITH x AS (SELECT 1) SELECT pg_advisory_unlock_all()",
            K::NONE,
        ),
        ("SELECT public.pg_advisory_unlock_all()", K::NONE),
        (r#"SELECT "PG_ADVISORY_UNLOCK_ALL"()"#, K::NONE),
        ("CLOSE c", K::NONE),
        ("DEALLOCATE q", K::NONE),
        (r#"DEALLOCATE "all""#, K::NONE),
        ("DISCARD PLANS", K::NONE),
    ] {
        assert_eq!(classify(sql).unpins, kinds, "{sql}");
    }
}

#[test]
fn a_parse_setting_for_the_transaction_only_is_flagged() {
    for (sql, local) in [
        ("SET LOCAL TIME ZONE 'America/New_York'", true),
        ("SET LOCAL timezone = 'UTC'", true),
        ("SET LOCAL DateStyle TO 'ISO, DMY'", true),
        ("SELECT set_config('TimeZone', 'UTC', true)", true),
        ("SELECT set_config('intervalstyle', 'iso_8601', true)", true),
        // A name not given as a literal may be any setting.
        ("SELECT set_config($1, $2, true)", true),
        ("SET LOCAL search_path = tenant_7", false),
        ("SET LOCAL statement_timeout = 5", false),
        ("SELECT set_config('work_mem', '64MB', true)", false),
        ("SELECT set_config('search_path', 'x', true)", false),
        // For the session: recorded, and the session's statements renamed with it.
        ("SET TIME ZONE 'UTC'", false),
        ("SELECT now()", false),
        // Unreadable text may set anything.
        ("SET LOCAL U&\"d\\0061testyle\" = 'ISO'", true),
    ] {
        assert_eq!(classify(sql).local_parse_setting, local, "{sql}");
    }
}

#[test]
fn a_search_path_for_the_transaction_only_is_flagged() {
    for (sql, local) in [
        ("SET LOCAL search_path = tenant_7", true),
        ("SET LOCAL search_path TO tenant_7, public", true),
        ("SELECT set_config('search_path', 'tenant_7', true)", true),
        // A name not given as a literal may be search_path.
        ("SELECT set_config($1, 'tenant_7', true)", true),
        ("SET search_path = tenant_7", false),
        ("SET LOCAL statement_timeout = 5", false),
        ("SELECT set_config('search_path', 'tenant_7', false)", false),
        ("SELECT set_config('work_mem', '64MB', true)", false),
    ] {
        assert_eq!(classify(sql).local_search_path, local, "{sql}");
    }
}

#[test]
fn configured_primary_functions() {
    let extra = ["app.bump_counter".to_owned(), "Touch".to_owned()];
    for sql in [
        "SELECT app.bump_counter(1)",
        "SELECT touch()",
        "SELECT * FROM t WHERE touch(id)",
    ] {
        let c = classify_with(sql, &extra);
        assert_eq!(
            (c.target, c.writes_unknown, c.volatile),
            (Target::Primary, true, true),
            "{sql}"
        );
        assert_eq!(classify(sql).target, Target::Replica, "{sql}");
    }
    assert_eq!(
        classify_with("SELECT other.bump_counter(1)", &extra).target,
        Target::Replica
    );
}

#[test]
fn known_stable_list_is_sorted() {
    assert!(super::KNOWN_STABLE.windows(2).all(|w| w[0] < w[1]));
    assert!(super::KNOWN_VOLATILE_READS.windows(2).all(|w| w[0] < w[1]));
}

/// Deep or long input gives an answer, not a stack overflow; runs on an explicit 2 MiB stack
/// (a tokio worker's default) in a debug build.
#[test]
fn deep_and_long_input_does_not_overflow() {
    let run = || {
        let parens = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(
            classify(&parens),
            Classification {
                local_parse_setting: false,
                ..Classification::unknown()
            }
        );
        assert!(!classify(&"(".repeat(50_000)).parsed);
        assert!(!classify(&format!("SELECT {}1", "- ".repeat(50_000))).parsed);
        assert!(!classify(&format!("SELECT {}1", "ARRAY[".repeat(5_000))).parsed);
        // Left-deep operator chains are built without sqlparser's recursion check.
        let chain = |n: usize| format!("SELECT 1{}", "::int".repeat(n));
        let c = classify(&chain(9_000));
        assert!(c.parsed && c.target == Target::Replica);
        assert!(!classify(&chain(15_000)).parsed);
        let ors: Vec<String> = (0..8_000).map(|i| format!("id = {i}")).collect();
        let c = classify(&format!("SELECT * FROM t WHERE {}", ors.join(" OR ")));
        assert_eq!((c.target, c.parsed), (Target::Primary, false));
        // Long flat lists are fine.
        let ids: Vec<String> = (0..50_000).map(|i| i.to_string()).collect();
        let c = classify(&format!("SELECT * FROM t WHERE id IN ({})", ids.join(",")));
        assert_eq!(
            (c.target, c.parsed, c.tables_read.clone()),
            (Target::Replica, true, vec!["t".to_owned()])
        );
        let rows: Vec<String> = (0..10_000)
            .map(|i| format!("({i}, 'x{i}', now())"))
            .collect();
        let c = classify(&format!("INSERT INTO t VALUES {}", rows.join(", ")));
        assert_eq!(
            (c.target, c.parsed, c.tables_written.clone()),
            (Target::Primary, true, vec!["t".to_owned()])
        );
        assert_eq!(classify(&"SELECT 1;".repeat(5_000)).statement_count, 5_000);
        // Postfix operators cost one token a level.
        for n in [9_000, 19_999, 25_000] {
            let bangs = " !".repeat(n);
            classify(&format!("SELECT 1{bangs}"));
            classify(&format!("EXPLAIN (ANALYZE 1{bangs}) SELECT 1"));
            classify(&format!("SET standard_conforming_strings = 1{bangs}"));
            classify(&format!("SELECT 1{}", " NOTNULL".repeat(n)));
        }
    };
    let handle = std::thread::Builder::new().stack_size(2 << 20).spawn(run);
    assert!(handle.expect("spawn").join().is_ok());
}

/// Garbage never panics. A tiny xorshift keeps the test deterministic without a dependency.
#[test]
fn garbage_does_not_panic() {
    const PIECES: &[&str] = &[
        "SELECT", "FROM", "WHERE", "(", ")", ";", "'", "\"", "$$", "$1", "--", "/*", "*/", "\n",
        "BEGIN", "SET", "RESET", "TABLE", "COPY", "STDIN", "END", "ATOMIC", "nextval(", ",", "::",
        "OR", "[", "]", "E'\\", "x", "1", "=", "WITH", "INSERT", "INTO", "é", "\u{0}", "DECLARE",
        "CURSOR", "FOR", "UPDATE", "LOCAL", "TO", ".", "pg_temp", "`", "\\", "{",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3_000 {
        let len = next() % 40;
        let mut sql = String::new();
        for _ in 0..len {
            let r = next();
            if r % 5 == 0 {
                sql.push(char::from_u32((r >> 8) as u32 % 0x3000).unwrap_or('?'));
            } else {
                sql.push_str(PIECES[(r >> 8) as usize % PIECES.len()]);
                sql.push(' ');
            }
        }
        let c = classify(&sql);
        assert!(c.parsed || c.target == Target::Primary, "{sql:?}");
    }
}

/// What DISCARD ALL does not undo keeps the session pinned for good, also where sqlparser
/// cannot read the text.
#[test]
fn a_dblink_connection_in_what_cannot_be_read_pins_for_good() {
    for sql in [
        "SELECT dblink_connect('c', 'x'), 1 BETWEEN SYMMETRIC 2 AND 0",
        r#"SELECT U&"dblink\005fconnect"('c', 'x')"#,
    ] {
        let c = classify(sql);
        assert!(c.pins_session && c.pins_for_good, "{sql}");
    }
    assert!(!classify("SELECT pg_advisory_lock(1), 1 BETWEEN SYMMETRIC 2 AND 0").pins_for_good);
    // A library loaded in text sqlparser rejects stays too.
    assert!(classify("LOAD $$auto_explain$$").pins_for_good);
    // An unreadable text that names none of those pins until DISCARD ALL only.
    let c = classify("SELECT 'unterminated");
    assert!(c.pins_session && !c.pins_for_good);
}

#[test]
fn calls_of_functions_that_may_write_are_flagged() {
    for sql in [
        "SELECT my_func(1)",
        "SELECT app.lower('x')",
        "SELECT \"Lower\"('x')",
        "SELECT * FROM t WHERE id = add_audit_row(1)",
    ] {
        assert!(classify(sql).calls_user_functions, "{sql}");
    }
    for sql in [
        "SELECT now(), random(), lower('x'), count(*) FROM t",
        "SELECT pg_catalog.upper('x')",
        "SELECT 1",
        // The SQL-standard spellings of the clock and the session's identity.
        "UPDATE t SET updated_at = CURRENT_TIMESTAMP WHERE id = 1",
        "INSERT INTO t (a, created) VALUES (1, current_date)",
        "SELECT * FROM t WHERE owner = current_user AND d > CURRENT_DATE",
        "SELECT session_user, localtimestamp, current_setting('app.tenant'), age(d) FROM t",
    ] {
        assert!(!classify(sql).calls_user_functions, "{sql}");
    }
}

/// Where a string leaves the transaction state: the proxy sends its own query behind a
/// request only when the connection is surely outside a block afterwards.
#[test]
fn transaction_effect() {
    use TxEffect::{Ends, Neutral, Other};
    let cases: &[(&str, TxEffect)] = &[
        ("COMMIT", Ends),
        ("commit work", Ends),
        ("END", Ends),
        ("END TRANSACTION;", Ends),
        ("ROLLBACK", Ends),
        ("rollback transaction", Ends),
        ("COMMIT AND CHAIN", Other),
        ("COMMIT AND NO CHAIN", Ends),
        ("ROLLBACK AND CHAIN", Other),
        ("ROLLBACK TO SAVEPOINT a", Other),
        ("ROLLBACK TO a", Other),
        ("SAVEPOINT a", Other),
        ("RELEASE SAVEPOINT a", Other),
        ("BEGIN", Other),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", Other),
        ("COMMIT; BEGIN", Other),
        ("INSERT INTO t VALUES (1); COMMIT", Other),
        ("COPY t FROM STDIN", Other),
        ("COPY t TO STDOUT", Other),
        ("COPY (SELECT 1) TO STDOUT", Other),
        ("this is not sql", Other),
        ("INSERT INTO t VALUES (1)", Neutral),
        ("UPDATE t SET a = 1 WHERE id = $1", Neutral),
        ("DELETE FROM t", Neutral),
        ("SELECT 1", Neutral),
        ("INSERT INTO t VALUES (1); UPDATE u SET a = 2", Neutral),
        ("CREATE TABLE t (id int)", Neutral),
        ("", Neutral),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(sql, want)| {
            let got = classify(sql).tx_effect;
            (got != *want).then(|| format!("{sql:?}: want {want:?}, got {got:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(Classification::unknown().tx_effect, Other);
}

#[test]
fn state_discard_all_cannot_reset_pins_for_good() {
    assert!(classify("LOAD 'auto_explain'").pins_for_good);
    assert!(classify("SELECT dblink_connect('c', 'dbname=appdb')").pins_for_good);
    assert!(!classify("SELECT pg_advisory_lock(1)").pins_for_good);
    assert!(!classify("PREPARE p AS SELECT 1").pins_for_good);
}

/// What takes a READ ONLY block to the primary when it comes first in the block: what a
/// standby refuses, or serves unlike the primary. Transaction-local settings and reads do
/// not.
#[test]
fn what_a_standby_refuses_at_the_start_of_a_read_only_block() {
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET TRANSACTION READ WRITE",
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
        "SET LOCAL transaction_isolation = 'serializable'",
        "SET transaction_read_only = off",
        "SELECT pg_export_snapshot()",
        "select pg_catalog.pg_export_snapshot()",
    ] {
        assert!(classify(sql).standby_refuses, "{sql}");
    }
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET TRANSACTION READ ONLY",
        "SET LOCAL statement_timeout = '5s'",
        "SELECT set_config('app.tenant', '7', true)",
        "SET search_path TO public",
        "SAVEPOINT a",
        "COMMIT",
        "SELECT * FROM t",
        "INSERT INTO t VALUES (1)",
    ] {
        assert!(!classify(sql).standby_refuses, "{sql}");
    }
    // Primary only for acting on the transaction: a standby's transaction takes them.
    for sql in [
        "SET LOCAL statement_timeout = '5s'",
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET LOCAL ROLE admin",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "ROLLBACK TO SAVEPOINT a",
        "COMMIT",
    ] {
        assert!(classify(sql).tx_local, "{sql}");
    }
    for sql in [
        "SET search_path TO public",
        "SELECT txid_current()",
        "LISTEN x",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT * FROM t",
    ] {
        assert!(!classify(sql).tx_local, "{sql}");
    }
}

#[test]
fn custom_settings_are_seen_however_they_are_set() {
    for sql in [
        "SET app.tenant = 'a'",
        "SET SESSION app.tenant TO 'a'",
        "SET LOCAL app.tenant = 'a'",
        "RESET app.tenant",
        "SELECT set_config('app.tenant', 'a', false)",
        "SELECT set_config('app.tenant', 'a', true)",
        "SELECT set_config($1, 'a', false)",
        "SELECT set_config('app.' || 'x', 'a', false)",
        "SELECT set_config(setting_name => 'app.t', new_value => '1', is_local => false)",
    ] {
        assert!(classify(sql).outlives_reset, "{sql}");
    }
    for sql in [
        "SET work_mem = '8MB'",
        "SET pgsplit.consistency = 'eventual'",
        "SELECT set_config('work_mem', '8MB', false)",
        "SELECT current_setting('app.tenant', true)",
        "RESET ALL",
    ] {
        assert!(!classify(sql).outlives_reset, "{sql}");
    }
}

#[test]
fn what_a_reset_leaves_is_seen_where_sqlparser_does_not_walk() {
    for sql in [
        "DO $$BEGIN PERFORM set_config('app.tenant', 'a', false); END$$",
        "PREPARE p(text) AS SELECT set_config('app.tenant', $1, false)",
        "EXECUTE q(set_config('app.tenant', 'a', false))",
        "CALL proc(set_config('app.tenant', 'a', false))",
        "SET standard_conforming_strings = off",
        "SET app.tenant = exists",
    ] {
        assert!(classify(sql).outlives_reset, "{sql}");
    }
    for sql in ["PREPARE p AS SELECT 1", "EXECUTE p", "CALL proc(1)"] {
        assert!(!classify(sql).outlives_reset, "{sql}");
    }
}

#[test]
fn common_statements_sqlparser_cannot_read_leave_reuse_alone() {
    for sql in [
        "SET CONSTRAINTS ALL DEFERRED",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * FROM t FOR KEY SHARE",
    ] {
        assert!(!classify(sql).outlives_reset, "{sql}");
    }
    let c = classify("UPDATE pg_settings SET setting = 'off' WHERE name = 'x'");
    assert!(c.outlives_reset && c.pins_session);
}

#[test]
fn ddl_with_a_set_clause_of_a_custom_setting_outlives_a_reset() {
    for sql in [
        "ALTER DATABASE appdb SET app.x = '1'",
        "ALTER ROLE r SET app.x = 1",
        "ALTER ROLE r IN DATABASE d RESET app.x",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.x = '1' AS 'SELECT 1'",
    ] {
        assert!(classify(sql).outlives_reset, "{sql}");
    }
    for sql in [
        "ALTER TABLE s.t SET (fillfactor = 70)",
        "ALTER TABLE t ALTER COLUMN c SET DEFAULT s.f()",
        "ALTER TABLE t SET SCHEMA s2",
        "ALTER ROLE r SET work_mem = '8MB'",
    ] {
        assert!(!classify(sql).outlives_reset, "{sql}");
    }
}
