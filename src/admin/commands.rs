//! Admin console commands: parsing (pure) and the answers, built from the proxy's state.

use std::sync::Arc;
use std::time::SystemTime;

use crate::backend::Backend;
use crate::state::{Shared, lock};
use crate::stats::ClientState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowBackends,
    ShowPools,
    ShowClients,
    ShowStats,
    ShowCache,
    ShowConfig,
    ShowVersion,
    ShowHelp,
    Reload,
    Reconnect,
    Ban(String),
    Unban(String),
    /// No statement at all (`;`, or a keepalive's empty query).
    Empty,
}

/// A command that failed: the SQLSTATE it is reported with, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// A table (columns and text rows) or, without columns, just a command tag.
#[derive(Debug, Default)]
pub struct Reply {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
    pub notice: Option<String>,
}

const HELP: &[(&str, &str)] = &[
    (
        "SHOW BACKENDS",
        "servers: role, health, lag, in rotation, why not",
    ),
    ("SHOW POOLS", "server connection pools: size, in use, idle"),
    ("SHOW CLIENTS", "connected clients and what they are doing"),
    (
        "SHOW STATS",
        "queries, transactions, errors, retries, latency per route",
    ),
    ("SHOW CACHE", "result cache counters and Redis state"),
    (
        "SHOW CONFIG",
        "the running configuration and the last reload",
    ),
    ("SHOW VERSION", "pgsplit's version"),
    ("RELOAD", "read the config file again and apply it"),
    (
        "RECONNECT",
        "replace every server connection once it is free (role changes apply)",
    ),
    (
        "BAN <backend>",
        "take a replica out of rotation (name or host:port)",
    ),
    ("UNBAN <backend>", "put it back"),
];

/// Parse one console statement (case-insensitive, a trailing `;` allowed).
pub fn parse(sql: &str) -> Result<Command, String> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    Ok(match upper.as_slice() {
        [] => Command::Empty,
        ["SHOW", "BACKENDS"] | ["SHOW", "SERVERS"] => Command::ShowBackends,
        ["SHOW", "POOLS"] => Command::ShowPools,
        ["SHOW", "CLIENTS"] => Command::ShowClients,
        ["SHOW", "STATS"] => Command::ShowStats,
        ["SHOW", "CACHE"] => Command::ShowCache,
        ["SHOW", "CONFIG"] => Command::ShowConfig,
        ["SHOW", "VERSION"] => Command::ShowVersion,
        ["SHOW", "HELP"] | ["HELP"] => Command::ShowHelp,
        ["RELOAD"] => Command::Reload,
        ["RECONNECT"] => Command::Reconnect,
        ["BAN", _] => Command::Ban(words[1].to_owned()),
        ["UNBAN", _] => Command::Unban(words[1].to_owned()),
        _ => {
            return Err(format!(
                "unknown admin command {text:?}; try SHOW HELP ({})",
                HELP.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
            ));
        }
    })
}

pub async fn run(shared: &Arc<Shared>, cmd: Command) -> Result<Reply, Failure> {
    Ok(match cmd {
        Command::ShowBackends => show_backends(shared),
        Command::ShowPools => show_pools(shared),
        Command::ShowClients => show_clients(shared),
        Command::ShowStats => show_stats(shared),
        Command::ShowCache => show_cache(shared),
        Command::ShowConfig => show_config(shared),
        Command::ShowVersion => table(
            &["version"],
            vec![vec![format!("pgsplit {}", env!("CARGO_PKG_VERSION"))]],
        ),
        Command::ShowHelp => table(
            &["command", "description"],
            HELP.iter()
                .map(|(c, d)| vec![c.to_string(), d.to_string()])
                .collect(),
        ),
        Command::Reload => {
            let summary = crate::reload::reload(shared).map_err(|e| Failure::new("F0000", e))?;
            Reply {
                tag: "RELOAD".into(),
                notice: Some(format!("configuration reloaded: {summary}")),
                ..Reply::default()
            }
        }
        Command::Reconnect => {
            let pools = shared.runtime.load().pools();
            for pool in &pools {
                pool.reconnect();
            }
            Reply {
                tag: "RECONNECT".into(),
                notice: Some(format!(
                    "{} pool(s): idle server connections closed, the others close when free",
                    pools.len()
                )),
                ..Reply::default()
            }
        }
        Command::Ban(name) => ban(shared, &name, true)?,
        Command::Unban(name) => ban(shared, &name, false)?,
        Command::Empty => Reply::default(),
    })
}

fn table(columns: &[&'static str], rows: Vec<Vec<String>>) -> Reply {
    Reply {
        columns: columns.to_vec(),
        rows: rows
            .into_iter()
            .map(|r| r.into_iter().map(Some).collect())
            .collect(),
        ..Reply::default()
    }
}

fn all_backends(shared: &Shared) -> Vec<(String, Arc<crate::state::Runtime>, usize)> {
    let rt = shared.runtime.load_full();
    let n = 1 + rt.backends.replicas.len();
    (0..n)
        .map(|i| {
            let b = backend_at(&rt, i);
            (b.name(), rt.clone(), i)
        })
        .collect()
}

fn backend_at(rt: &crate::state::Runtime, i: usize) -> &Backend {
    if i == 0 {
        &rt.backends.primary
    } else {
        &rt.backends.replicas[i - 1]
    }
}

fn show_backends(shared: &Shared) -> Reply {
    let rows = all_backends(shared)
        .into_iter()
        .map(|(name, rt, i)| {
            let b = backend_at(&rt, i);
            let h = &b.health;
            let configured = if i == 0 { "primary" } else { "replica" };
            let reason = if h.banned() {
                "banned by an operator".to_owned()
            } else {
                h.reason()
            };
            vec![
                name,
                b.address(),
                configured.to_owned(),
                format!("{:?}", h.role()).to_lowercase(),
                h.healthy().to_string(),
                b.in_rotation().to_string(),
                h.lag_bytes().map_or(String::new(), |l| l.to_string()),
                h.replay_age_ms().map_or(String::new(), |l| l.to_string()),
                if i == 0 {
                    String::new()
                } else {
                    b.config.weight.to_string()
                },
                reason,
            ]
        })
        .collect();
    table(
        &[
            "name",
            "address",
            "configured_as",
            "role",
            "healthy",
            "in_rotation",
            "lag_bytes",
            "replay_age_ms",
            "weight",
            "reason",
        ],
        rows,
    )
}

fn show_pools(shared: &Shared) -> Reply {
    let rt = shared.runtime.load_full();
    let mut rows: Vec<Vec<String>> = rt
        .pools()
        .iter()
        .map(|p| {
            let (in_use, idle) = p.counts();
            vec![
                p.name().to_owned(),
                p.user().to_owned(),
                p.database().to_owned(),
                p.size().to_string(),
                in_use.to_string(),
                idle.to_string(),
            ]
        })
        .collect();
    rows.sort();
    table(
        &["backend", "user", "database", "size", "in_use", "idle"],
        rows,
    )
}

fn show_clients(shared: &Shared) -> Reply {
    let rt = shared.runtime.load_full();
    let now = SystemTime::now();
    let rows = shared
        .stats
        .clients
        .list()
        .into_iter()
        .map(|(id, c)| {
            let state = match c.state() {
                ClientState::Idle => "idle",
                ClientState::Active => "active",
                ClientState::InTransaction => "in transaction",
            };
            let backend = c
                .backend()
                .and_then(|b| rt.backends.get(crate::backend::BackendId(b)))
                .map_or(String::new(), |b| b.name());
            let secs = now
                .duration_since(c.connected_at)
                .map_or(0, |d| d.as_secs());
            vec![
                id.to_string(),
                c.peer.to_string(),
                c.user.clone(),
                c.database.clone(),
                state.to_owned(),
                backend,
                c.queries
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
                secs.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "peer",
            "user",
            "database",
            "state",
            "backend",
            "queries",
            "connected_s",
        ],
        rows,
    )
}

fn show_stats(shared: &Shared) -> Reply {
    let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
    let rows = shared
        .stats
        .snapshot()
        .into_iter()
        .map(|r| {
            let q = |p: f64| {
                if r.latency.is_empty() {
                    String::new()
                } else {
                    ms(r.latency.value_at_quantile(p))
                }
            };
            vec![
                r.route.name().to_owned(),
                r.queries.to_string(),
                r.transactions.to_string(),
                r.errors.to_string(),
                r.retries.to_string(),
                q(0.50),
                q(0.95),
                q(0.99),
            ]
        })
        .collect();
    table(
        &[
            "route",
            "queries",
            "transactions",
            "errors",
            "retries",
            "p50_ms",
            "p95_ms",
            "p99_ms",
        ],
        rows,
    )
}

fn show_cache(shared: &Shared) -> Reply {
    let mut rows = vec![vec![
        "enabled".to_owned(),
        shared.cache.is_some().to_string(),
    ]];
    if let Some(c) = &shared.cache {
        let s = c.snapshot();
        let state = if s.redis_available {
            "in use"
        } else {
            "bypassed (redis unavailable)"
        };
        rows.push(vec!["state".into(), state.into()]);
        for (k, v) in [
            ("hits", s.hits),
            ("misses", s.misses),
            ("stores", s.stores),
            ("too_large", s.too_large),
            ("invalidations", s.invalidations),
            ("errors", s.errors),
            ("bypassed", s.bypassed),
        ] {
            rows.push(vec![k.into(), v.to_string()]);
        }
    }
    let rules = shared.runtime.load().config.cache.rules.len();
    rows.push(vec!["rules".into(), rules.to_string()]);
    table(&["name", "value"], rows)
}

fn show_config(shared: &Shared) -> Reply {
    let rt = shared.runtime.load_full();
    let mut rows: Vec<Vec<String>> = rt
        .config
        .flattened()
        .into_iter()
        .map(|(k, v)| vec![k, v])
        .collect();
    let status = lock(&shared.reload).clone();
    let path = shared
        .config_path
        .get()
        .map_or(String::new(), |p| p.display().to_string());
    rows.push(vec!["reload.config_file".into(), path]);
    rows.push(vec!["reload.applied".into(), status.applied.to_string()]);
    rows.push(vec!["reload.failed".into(), status.failed.to_string()]);
    rows.push(vec![
        "reload.last_error".into(),
        status.last_error.unwrap_or_default(),
    ]);
    rows.push(vec![
        "reload.last_changes".into(),
        status.last_summary.unwrap_or_default(),
    ]);
    table(&["name", "value"], rows)
}

fn ban(shared: &Shared, name: &str, banned: bool) -> Result<Reply, Failure> {
    let rt = shared.runtime.load_full();
    let primary = &rt.backends.primary;
    let b = if [primary.name(), primary.address()].contains(&name.to_owned()) {
        if banned {
            return Err(Failure::new(
                "55000",
                "the primary cannot be banned: writes have nowhere else to go",
            ));
        }
        // A ban follows the server's address across reloads: a replica banned, promoted and
        // made the primary by a reload must be released here.
        primary
    } else {
        rt.backends
            .replicas
            .iter()
            .find(|b| b.name() == name || b.address() == name)
            .ok_or_else(|| {
                Failure::new(
                    "42704",
                    format!("no replica named {name:?} (see SHOW BACKENDS)"),
                )
            })?
    };
    // Under the lock a reload takes to ban replicas it brings back: a reload meanwhile
    // cannot ban again what this UNBAN released.
    let mut bans = crate::state::lock(&shared.banned);
    b.health.set_banned(banned);
    if banned {
        bans.insert(b.address());
    } else {
        bans.remove(&b.address());
    }
    drop(bans);
    tracing::info!(backend = %b.name(), banned, "operator changed rotation");
    Ok(Reply {
        tag: if banned { "BAN" } else { "UNBAN" }.into(),
        ..Reply::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse("show backends;").unwrap(), Command::ShowBackends);
        assert_eq!(parse("  SHOW   Stats ").unwrap(), Command::ShowStats);
        assert_eq!(parse("reload").unwrap(), Command::Reload);
        assert_eq!(parse("Reconnect;").unwrap(), Command::Reconnect);
        assert_eq!(
            parse("ban Replica1").unwrap(),
            Command::Ban("Replica1".into())
        );
        assert_eq!(
            parse("UNBAN 127.0.0.1:5433;").unwrap(),
            Command::Unban("127.0.0.1:5433".into())
        );
        let e = parse("SELECT 1").unwrap_err();
        assert!(e.contains("SHOW HELP"), "{e}");
        assert!(parse("BAN").is_err());
        assert_eq!(parse(" ; ").unwrap(), Command::Empty);
        assert_eq!(parse("").unwrap(), Command::Empty);
    }
}
