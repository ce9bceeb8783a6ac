//! sqlx (runtime-tokio, postgres) through pgsplit: named prepared statements (Parse +
//! Describe + Sync, then Bind + Execute + Sync, cached per connection), binds, fetch_all,
//! transactions, raw (simple-protocol) SQL, errors, settings, a small pool.
//! DRV_* environment variables: see tests/drivers/python/common.py.

use std::collections::BTreeSet;
use std::env;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor, Row};

const UNICODE: &str = "h\u{e9}llo \u{2713} \u{65e5}\u{672c}\u{8a9e} \u{1F389} \u{df}";
const BYTES: &[u8] = &[0, 1, 2, 127, 128, 254, 255, 92, 120, 48, 48, 39, 34];
const NUMERIC: &str = "12345678901234567890.123456789";

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

struct Ctx {
    read_ports: BTreeSet<i32>,
    primary_port: i32,
    checks: usize,
    failed: Vec<String>,
}

macro_rules! check {
    ($ctx:expr, $cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(format!("check failed: {}", format!($($what)+)).into());
        }
        $ctx.checks += 1;
    };
}

fn ts() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 58).unwrap() + chrono::Duration::microseconds(123_456)
}

fn options() -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&env::var("DRV_HOST").unwrap_or_else(|_| "127.0.0.1".into()))
        .port(env::var("DRV_PORT").expect("DRV_PORT").parse().unwrap())
        .username(&env::var("DRV_USER").unwrap_or_else(|_| "app".into()))
        .password(&env::var("DRV_PASSWORD").unwrap_or_else(|_| "app_pw".into()))
        .database(&env::var("DRV_DB").unwrap_or_else(|_| "appdb".into()))
        .ssl_mode(sqlx::postgres::PgSslMode::Disable)
        .application_name("drv_sqlx")
}

async fn port(c: &mut PgConnection) -> Res<i32> {
    Ok(sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(c)
        .await?)
}

/// Runs `sql` (one plain read returning inet_server_port() as its last column, with `$1` bound
/// to 1 if it has a parameter) until 8 runs in a row show exactly the read ports; retried for
/// up to 5 s (a proxy with read-your-writes keeps a session's reads on the primary until the
/// replicas replayed its writes).
async fn check_read_ports(ctx: &mut Ctx, c: &mut PgConnection, sql: &str, what: &str) -> Res {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            let q = sqlx::query(sql);
            let q = if sql.contains("$1") { q.bind(1i32) } else { q };
            let row = q.fetch_one(&mut *c).await?;
            seen.insert(row.get::<i32, _>(row.len() - 1));
        }
        if seen == ctx.read_ports {
            ctx.checks += 1;
            return Ok(());
        }
        check!(
            ctx,
            Instant::now() < deadline,
            "{what}: reads went to {seen:?}, expected all of {:?}",
            ctx.read_ports
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn write_and_read(ctx: &mut Ctx, c: &mut PgConnection, t: &str) -> Res {
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *c)
        .await?;
    check!(
        ctx,
        user == env::var("DRV_USER").unwrap_or_else(|_| "app".into()),
        "current_user {user}"
    );
    let app: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(&mut *c)
        .await?;
    check!(ctx, app == "drv_sqlx", "startup application_name {app}");
    c.execute(&*format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)"
    ))
    .await?;
    let insert = format!("INSERT INTO {t} VALUES ($1, $2, $3::numeric, $4, $5, $6)");
    for i in 1..=10i32 {
        let r = sqlx::query(&insert)
            .bind(i)
            .bind(format!("row {i} {UNICODE}"))
            .bind(NUMERIC)
            .bind(ts())
            .bind(BYTES)
            .bind(None::<String>)
            .execute(&mut *c)
            .await?;
        check!(ctx, r.rows_affected() == 1, "rows_affected");
    }
    let select =
        format!("SELECT id, name, n::text, ts, b, note FROM {t} WHERE id <= $1 ORDER BY id");
    let deadline = Instant::now() + Duration::from_secs(5);
    let rows = loop {
        match sqlx::query(&select).bind(10i32).fetch_all(&mut *c).await {
            Ok(rows) if rows.len() == 10 => break rows,
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            return Err("inserted rows not seen within 5 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (k, r) in rows.iter().enumerate() {
        let i = k as i32 + 1;
        check!(ctx, r.get::<i32, _>(0) == i, "row {i} id");
        check!(
            ctx,
            r.get::<String, _>(1) == format!("row {i} {UNICODE}"),
            "row {i} name"
        );
        check!(ctx, r.get::<String, _>(2) == NUMERIC, "row {i} numeric");
        check!(
            ctx,
            r.get::<DateTime<Utc>, _>(3) == ts(),
            "row {i} timestamptz"
        );
        check!(ctx, r.get::<Vec<u8>, _>(4) == BYTES, "row {i} bytea");
        check!(ctx, r.get::<Option<String>, _>(5).is_none(), "row {i} NULL");
    }
    Ok(())
}

async fn round_trip(ctx: &mut Ctx, c: &mut PgConnection) -> Res {
    for _ in 0..3 {
        let r = sqlx::query(
            "SELECT $1::text, $2::text, ($3::numeric)::text, $4::timestamptz, $5::bytea, $6::int8",
        )
        .bind(None::<String>)
        .bind(UNICODE)
        .bind(NUMERIC)
        .bind(ts())
        .bind(BYTES)
        .bind(1i64 << 40)
        .fetch_one(&mut *c)
        .await?;
        check!(ctx, r.get::<Option<String>, _>(0).is_none(), "NULL");
        check!(ctx, r.get::<String, _>(1) == UNICODE, "unicode");
        check!(ctx, r.get::<String, _>(2) == NUMERIC, "numeric");
        check!(ctx, r.get::<DateTime<Utc>, _>(3) == ts(), "timestamptz");
        check!(ctx, r.get::<Vec<u8>, _>(4) == BYTES, "bytea");
        check!(ctx, r.get::<i64, _>(5) == 1i64 << 40, "int8");
    }
    // Simple protocol, several statements.
    let n = sqlx::raw_sql("SELECT 1; SELECT 2, 3")
        .fetch_all(&mut *c)
        .await?
        .len();
    check!(ctx, n == 2, "raw_sql rows {n}");
    Ok(())
}

async fn routing(ctx: &mut Ctx, c: &mut PgConnection, t: &str) -> Res {
    check_read_ports(ctx, c, "SELECT inet_server_port()", "reads").await?;
    let mut tx = c.begin().await?;
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(
            sqlx::query_scalar::<_, i32>("SELECT inet_server_port()")
                .fetch_one(&mut *tx)
                .await?,
        );
    }
    sqlx::query(&format!("UPDATE {t} SET note = $1 WHERE id = $2"))
        .bind("tx")
        .bind(1i32)
        .execute(&mut *tx)
        .await?;
    let note: Option<String> = sqlx::query_scalar(&format!("SELECT note FROM {t} WHERE id = 1"))
        .fetch_one(&mut *tx)
        .await?;
    check!(
        ctx,
        note.as_deref() == Some("tx"),
        "read own write in a transaction"
    );
    tx.commit().await?;
    check!(
        ctx,
        seen == BTreeSet::from([ctx.primary_port]),
        "transaction went to {seen:?}"
    );
    let mut tx = c.begin().await?;
    sqlx::query(&format!("UPDATE {t} SET note = 'rolled back' WHERE id = 2"))
        .execute(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(())
}

async fn errors(ctx: &mut Ctx, c: &mut PgConnection) -> Res {
    for sql in ["SELEC 1", "SELEC $1"] {
        let q = sqlx::query(sql);
        let q = if sql.contains('$') { q.bind(1i32) } else { q };
        match q.fetch_all(&mut *c).await {
            Err(sqlx::Error::Database(e)) => {
                check!(
                    ctx,
                    e.code().as_deref() == Some("42601"),
                    "code {:?}",
                    e.code()
                );
            }
            other => return Err(format!("syntax error not reported: {other:?}").into()),
        }
        check!(ctx, port(c).await? > 0, "usable after error");
    }
    match sqlx::raw_sql("SELEC 1").execute(&mut *c).await {
        Err(sqlx::Error::Database(e)) => {
            check!(
                ctx,
                e.code().as_deref() == Some("42601"),
                "raw code {:?}",
                e.code()
            );
        }
        other => return Err(format!("raw syntax error not reported: {other:?}").into()),
    }
    check!(ctx, port(c).await? > 0, "usable after raw error");
    Ok(())
}

async fn settings(ctx: &mut Ctx, c: &mut PgConnection, t: &str) -> Res {
    c.execute("SET search_path TO drv_nowhere, public").await?;
    c.execute("SET application_name = 'drv_sqlx_set'").await?;
    for _ in 0..6 {
        let (sp, app): (String, String) =
            sqlx::query_as("SELECT current_setting('search_path'), current_setting($1)")
                .bind("application_name")
                .fetch_one(&mut *c)
                .await?;
        check!(ctx, sp == "drv_nowhere, public", "search_path {sp}");
        check!(ctx, app == "drv_sqlx_set", "application_name {app}");
    }
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
        .fetch_one(&mut *c)
        .await?;
    check!(ctx, n == 10, "unqualified table {n}");
    c.execute("RESET search_path").await?;
    Ok(())
}

async fn prepared(ctx: &mut Ctx, c: &mut PgConnection, t: &str) -> Res {
    let sql = format!("SELECT name, inet_server_port() FROM {t} WHERE id = $1");
    sqlx::query(&sql).bind(1i32).fetch_one(&mut *c).await?;
    for i in 0..50 {
        let k = 1 + i % 10;
        let r = sqlx::query(&sql).bind(k).fetch_one(&mut *c).await?;
        check!(
            ctx,
            r.get::<String, _>(0) == format!("row {k} {UNICODE}"),
            "use {i}"
        );
    }
    check_read_ports(ctx, c, &sql, "prepared statement").await?;
    Ok(())
}

async fn pool(ctx: &mut Ctx, t: &str) -> Res {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options())
        .await?;
    for i in 0..10i32 {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t} WHERE id > $1"))
            .bind(i)
            .fetch_one(&pool)
            .await?;
        check!(ctx, n == i64::from(10 - i), "pool query {i}: {n}");
    }
    pool.close().await;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut ctx = Ctx {
        read_ports: env::var("DRV_READ_PORTS")
            .expect("DRV_READ_PORTS")
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect(),
        primary_port: env::var("DRV_PRIMARY_PORT")
            .expect("DRV_PRIMARY_PORT")
            .parse()
            .unwrap(),
        checks: 0,
        failed: Vec::new(),
    };
    let t = format!(
        "drv_sqlx_{}_{}",
        std::process::id(),
        Utc::now().timestamp_subsec_nanos()
    );
    let mut c = PgConnection::connect_with(&options())
        .await
        .expect("connect");

    macro_rules! section {
        ($name:expr, $e:expr) => {
            if let Err(e) = $e.await {
                eprintln!("FAILED section '{}': {e}", $name);
                ctx.failed.push($name.to_string());
            }
        };
    }
    section!("write and read", write_and_read(&mut ctx, &mut c, &t));
    section!("round trip", round_trip(&mut ctx, &mut c));
    section!("routing", routing(&mut ctx, &mut c, &t));
    section!("errors", errors(&mut ctx, &mut c));
    section!("settings", settings(&mut ctx, &mut c, &t));
    section!("prepared", prepared(&mut ctx, &mut c, &t));
    section!("pool", pool(&mut ctx, &t));

    let _ = c.execute(&*format!("DROP TABLE {t}")).await;
    let _ = c.close().await;
    if ctx.failed.is_empty() {
        println!("sqlx: {} checks passed", ctx.checks);
    } else {
        println!(
            "sqlx: {} checks passed, FAILED sections: {}",
            ctx.checks,
            ctx.failed.join(", ")
        );
        std::process::exit(1);
    }
}
