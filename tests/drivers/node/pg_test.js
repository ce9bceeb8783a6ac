// node-postgres (`pg`) through pgsplit: simple queries, parameterized queries (unnamed
// extended protocol), named prepared queries ({name, text, values}), pg-cursor (Execute with
// a row limit + Flush, PortalSuspended, then more Executes), transactions, errors.
// DRV_* environment variables: see tests/drivers/python/common.py.
'use strict';
process.noDeprecation = true; // "client.query() when the client is already executing a query": on purpose below

const { Client } = require('pg');
const Cursor = require('pg-cursor');

const env = process.env;
const READ_PORTS = new Set(env.DRV_READ_PORTS.split(',').map(Number));
const PRIMARY_PORT = Number(env.DRV_PRIMARY_PORT);
const UNICODE = 'h\u00e9llo \u2713 \u65e5\u672c\u8a9e \u{1F389} \u00df';
const BYTES = Buffer.from([0, 1, 2, 127, 128, 254, 255, 92, 120, 48, 48, 39, 34]);
const NUMERIC = '12345678901234567890.123456789';
const TS = new Date(Date.UTC(2024, 1, 29, 23, 59, 58, 123));

let checks = 0;
const failed = [];
function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
  checks++;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function poll(fn, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      if (e.code !== '42P01') throw e; // the table may not have replicated yet
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not seen within ${timeoutMs} ms (last: ${last})`);
    await sleep(50);
  }
}
const sameSet = (a, b) => a.size === b.size && [...a].every((x) => b.has(x));
// fn() runs one plain read and resolves to inet_server_port(). Passes once 8 reads in a row
// show exactly READ_PORTS; retried for up to 5 s (a proxy with read-your-writes keeps a
// session's reads on the primary until the replicas replayed its writes).
async function checkReadPorts(fn, what) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const seen = new Set();
    for (let i = 0; i < 8; i++) seen.add(Number(await fn()));
    if (sameSet(seen, READ_PORTS)) {
      checks++;
      return;
    }
    check(Date.now() < deadline, `${what}: reads went to ${[...seen]}, expected all of ${[...READ_PORTS]}`);
    await sleep(200);
  }
}
function checkTxPorts(ports, what) {
  const seen = new Set(ports);
  check(seen.size === 1 && seen.has(PRIMARY_PORT), `${what}: went to ${[...seen]}, expected only the primary ${PRIMARY_PORT}`);
}
function withTimeout(p, what, ms = 5000) {
  let timer;
  const t = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms); });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
async function section(name, fn) {
  try {
    await fn();
  } catch (e) {
    console.error(`FAILED section '${name}':`, e);
    failed.push(name);
  }
}

function connect(extra = {}) {
  return new Client({
    host: env.DRV_HOST || '127.0.0.1', port: Number(env.DRV_PORT), user: env.DRV_USER || 'app',
    password: env.DRV_PASSWORD || 'app_pw', database: env.DRV_DB || 'appdb', ...extra,
  });
}

async function port(c, q) {
  return Number((await c.query(q || 'SELECT inet_server_port() AS p')).rows[0].p);
}

async function main() {
  const c = connect({ application_name: 'drv_pg' });
  await c.connect();
  const t = `drv_pg_${process.pid}_${Math.floor(Math.random() * 1e9)}`;

  await section('write and read', async () => {
    check((await c.query('SELECT current_user AS u')).rows[0].u === (env.DRV_USER || 'app'), 'current_user');
    check((await c.query("SELECT current_setting('application_name') AS a")).rows[0].a === 'drv_pg', 'startup application_name');
    await c.query(`CREATE TABLE ${t} (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)`);
    for (let i = 1; i <= 10; i++) {
      const r = await c.query(`INSERT INTO ${t} VALUES ($1, $2, $3, $4, $5, $6)`, [i, `row ${i} ${UNICODE}`, NUMERIC, TS, BYTES, null]);
      check(r.rowCount === 1, 'insert rowCount');
    }
    const rows = await poll(async () => {
      const r = await c.query(`SELECT id, name, n, ts, b, note FROM ${t} ORDER BY id`);
      return r.rows.length === 10 ? r.rows : null;
    }, 'inserted rows');
    rows.forEach((r, k) => {
      const i = k + 1;
      check(r.id === i && r.name === `row ${i} ${UNICODE}`, `row ${i} name ${r.name}`);
      check(r.n === NUMERIC, `row ${i} numeric ${r.n}`);
      check(r.ts.getTime() === TS.getTime(), `row ${i} timestamptz ${r.ts}`);
      check(Buffer.compare(r.b, BYTES) === 0, `row ${i} bytea`);
      check(r.note === null, `row ${i} NULL`);
    });
  });

  await section('round trip', async () => {
    const r = (await c.query('SELECT $1::text AS a, $2::text AS b, $3::numeric AS n, $4::timestamptz AS ts, $5::bytea AS by, $6::int AS i',
      [null, UNICODE, NUMERIC, TS, BYTES, 42])).rows[0];
    check(r.a === null && r.b === UNICODE && r.n === NUMERIC && r.ts.getTime() === TS.getTime() &&
      Buffer.compare(r.by, BYTES) === 0 && r.i === 42, 'parameter round trip ' + JSON.stringify(r));
    // Several statements in one simple Query.
    const multi = await c.query('SELECT 1 AS x; SELECT 2 AS y');
    check(Array.isArray(multi) && multi[0].rows[0].x === 1 && multi[1].rows[0].y === 2, 'multi-statement query');
  });

  await section('routing', async () => {
    await checkReadPorts(() => port(c), 'simple-query reads');
    await checkReadPorts(() => port(c, { text: 'SELECT inet_server_port() + $1 AS p', values: [0] }), 'parameterized reads');
    await c.query('BEGIN');
    const tx = [];
    for (let i = 0; i < 3; i++) tx.push(await port(c));
    for (let i = 0; i < 3; i++) tx.push(await port(c, { text: 'SELECT inet_server_port() + $1 AS p', values: [0] }));
    await c.query(`UPDATE ${t} SET note = $1 WHERE id = $2`, ['tx', 1]);
    check((await c.query(`SELECT note FROM ${t} WHERE id = 1`)).rows[0].note === 'tx', 'read own write in a transaction');
    await c.query('COMMIT');
    checkTxPorts(tx, 'BEGIN ... COMMIT');
  });

  await section('errors', async () => {
    for (const q of ['SELEC 1', { text: 'SELEC $1', values: [1] }, { name: 'drv_bad', text: 'SELEC $1', values: [1] }]) {
      let err = null;
      try { await c.query(q); } catch (e) { err = e; }
      check(err && err.code === '42601', `syntax error code ${err && err.code}`);
      check((await c.query('SELECT $1::int AS v', [5])).rows[0].v === 5, 'usable after syntax error');
    }
    await c.query('BEGIN');
    let err = null;
    try { await c.query(`INSERT INTO ${t} (id) VALUES ($1)`, [1]); } catch (e) { err = e; }
    check(err && err.code === '23505', 'unique violation');
    err = null;
    try { await c.query('SELECT 1'); } catch (e) { err = e; }
    check(err && err.code === '25P02', 'aborted transaction');
    await c.query('ROLLBACK');
    check((await c.query('SELECT 1 AS v')).rows[0].v === 1, 'usable after rollback');
  });

  await section('settings', async () => {
    await c.query('SET search_path TO drv_nowhere, public');
    await c.query("SET application_name = 'drv_pg_set'");
    for (let i = 0; i < 6; i++) {
      const r = (await c.query("SELECT current_setting('search_path') AS sp, current_setting($1) AS app", ['application_name'])).rows[0];
      check(r.sp === 'drv_nowhere, public', 'search_path ' + r.sp);
      check(r.app === 'drv_pg_set', 'application_name ' + r.app);
    }
    check(Number((await c.query(`SELECT count(*) AS n FROM ${t}`)).rows[0].n) === 10, 'unqualified table');
    await c.query('RESET search_path');
  });

  await section('named prepared queries', async () => {
    // The first use sends Parse(name) + Bind + Describe + Execute + Sync, later ones only
    // Bind + Describe + Execute + Sync with the same statement name.
    const byId = (k) => ({ name: 'drv_by_id', text: `SELECT name, inet_server_port() AS p FROM ${t} WHERE id = $1`, values: [k] });
    for (let i = 0; i < 40; i++) {
      const k = 1 + (i % 10);
      const r = await c.query(byId(k));
      check(r.rows[0].name === `row ${k} ${UNICODE}`, `named query use ${i}`);
    }
    await checkReadPorts(async () => (await c.query(byId(1))).rows[0].p, 'named query');
    // A named write statement, reused.
    for (let i = 11; i <= 20; i++) {
      const r = await c.query({ name: 'drv_ins', text: `INSERT INTO ${t} (id, name) VALUES ($1, $2) RETURNING inet_server_port() AS p`, values: [i, 'n' + i] });
      check(Number(r.rows[0].p) === PRIMARY_PORT, 'named insert on the primary');
    }
    await poll(async () => Number((await c.query({ name: 'drv_count', text: `SELECT count(*) AS n FROM ${t}` })).rows[0].n) === 20, 'named inserts');
    // rowMode array and binary result format.
    const arr = await c.query({ text: 'SELECT 1 AS a, $1::text AS b', values: [UNICODE], rowMode: 'array' });
    check(arr.rows[0][0] === 1 && arr.rows[0][1] === UNICODE, 'rowMode array');
    const bin = await c.query({ text: 'SELECT $1::int4 AS v', values: [7], binary: true });
    check(Buffer.isBuffer(bin.rows[0].v) || bin.rows[0].v === 7, 'binary result');
  });

  await section('pipelined queries', async () => {
    // pg queues queries client-side; several in flight at once must come back in order.
    const ps = [];
    for (let i = 0; i < 20; i++) ps.push(c.query('SELECT $1::int AS v', [i]));
    const vs = (await Promise.all(ps)).map((r) => r.rows[0].v);
    check(JSON.stringify(vs) === JSON.stringify([...Array(20).keys()]), 'queued queries ' + vs);
  });

  await section('cursor', async () => {
    // pg-cursor: Parse/Bind/Describe/Flush and, without waiting for the answer, Execute(rows=N)
    // + Flush; after each PortalSuspended another Execute + Flush; Close + Sync at the end.
    // Its own connection: a hang here must not block the rest.
    const c = connect();
    c.on('error', () => {});
    await c.connect();
    try {
      const cur = c.query(new Cursor(`SELECT id FROM ${t} WHERE id <= $1 ORDER BY id`, [20]));
      const ids = [];
      for (;;) {
        const rows = await withTimeout(cur.read(3), 'cursor read');
        if (rows.length === 0) break;
        ids.push(...rows.map((r) => r.id));
      }
      await cur.close();
      check(JSON.stringify(ids) === JSON.stringify([...Array(20).keys()].map((i) => i + 1)), 'cursor rows ' + ids);
      check((await c.query('SELECT 2 AS v')).rows[0].v === 2, 'usable after cursor');
      // A cursor closed early.
      const cur2 = c.query(new Cursor(`SELECT id FROM ${t} ORDER BY id`));
      const first = await withTimeout(cur2.read(2), 'cursor read');
      await cur2.close();
      check(first.length === 2 && first[0].id === 1, 'early-closed cursor');
      await checkReadPorts(() => port(c), 'reads after cursors');
      await c.end();
    } catch (e) {
      c.connection.stream.destroy(); // it may hold a lock on the table
      throw e;
    }
  });

  await section('cursor, messages in one packet', async () => {
    // The same, with the socket corked so that both Flush-ended batches arrive in one
    // segment, as they do whenever the proxy reads late (a loaded machine): deterministic.
    const c2 = connect();
    c2.on('error', () => {});
    await c2.connect();
    try {
      for (let k = 0; k < 3; k++) {
        c2.connection.stream.cork();
        const cur = c2.query(new Cursor(`SELECT id FROM ${t} WHERE id <= $1 ORDER BY id`, [5]));
        const p = cur.read(10);
        process.nextTick(() => c2.connection.stream.uncork());
        const rows = await withTimeout(p, 'corked cursor read');
        await withTimeout(cur.close(), 'cursor close');
        check(JSON.stringify(rows.map((r) => r.id)) === '[1,2,3,4,5]', 'corked cursor rows');
      }
      check((await withTimeout(c2.query('SELECT 3 AS v'), 'query after cursor')).rows[0].v === 3, 'usable after corked cursor');
      await c2.end();
    } catch (e) {
      c2.connection.stream.destroy();
      throw e;
    }
  });

  await c.query(`DROP TABLE ${t}`);
  await c.end();
  if (failed.length) {
    console.log(`pg: ${checks} checks passed, FAILED sections: ${failed.join(', ')}`);
    process.exit(1);
  }
  console.log(`pg: ${checks} checks passed`);
  process.exit(0); // a connection left hanging by a failed section must not keep us alive
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
