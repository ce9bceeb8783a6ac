//! Live configuration reload: on SIGHUP, on a change of the file, and on the admin console's
//! RELOAD. The new file is parsed and validated whole; an invalid one changes nothing. A
//! valid one becomes the runtime new sessions start with and running sessions switch to at
//! their next idle point, so no client is dropped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::state::{Runtime, Shared, lock};

/// The path reloads read `given` from: absolute (the working directory may change), but
/// through its symlinks, which a deployment may swap (a Kubernetes ConfigMap relinks its
/// `..data`, a release switch relinks `current`), deleting the old target.
pub fn config_path(given: &Path) -> std::path::PathBuf {
    std::path::absolute(given).unwrap_or_else(|_| given.to_owned())
}

/// Reload from the file the proxy was started with. Returns the summary of what changed.
pub fn reload(shared: &Arc<Shared>) -> Result<String, String> {
    // One reload at a time, from reading the file to recording the outcome: the file
    // watcher and RELOAD racing could otherwise apply an older file over a newer one, or
    // record the older one's outcome last. (A lock of its own: metrics and SHOW CONFIG
    // read the status meanwhile.)
    let _one_at_a_time = lock(&shared.reloading);
    // Read before it is applied: a change made meanwhile differs from this, and the file
    // watcher reloads once more.
    let read = shared.config_path.get().and_then(|p| file_digest(p));
    let result = shared
        .config_path
        .get()
        .ok_or_else(|| "the proxy was started without a config file".to_owned())
        .and_then(|path| apply_file(shared, path));
    let mut status = lock(&shared.reload);
    if read.is_some() {
        status.last_read = read;
    }
    match &result {
        Ok(summary) => {
            status.applied += 1;
            status.last_applied_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            status.last_error = None;
            status.last_summary = Some(summary.clone());
            info!(changes = %summary, "configuration reloaded");
        }
        Err(e) => {
            status.failed += 1;
            status.last_error = Some(e.clone());
            warn!(error = %e, "configuration reload rejected; the running configuration stays");
        }
    }
    result
}

fn apply_file(shared: &Arc<Shared>, path: &Path) -> Result<String, String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    let old = shared.runtime.load_full();
    let summary = describe_changes(&old.config, &config);
    keep_restart_only(&mut config, &old.config);
    let log_changed = old.config.proxy.log != config.proxy.log;
    let runtime = Runtime::new_reusing(config, Some(&old)).map_err(|e| e.to_string())?;
    if log_changed && let Some(apply) = shared.log_filter.get() {
        apply(&runtime.config.proxy.log).map_err(|e| format!("proxy.log: {e}"))?;
    }
    // A replica banned before a reload dropped it is banned still when one brings it back.
    {
        let bans = lock(&shared.banned);
        for r in runtime.backends.replicas.iter() {
            if bans.contains(&r.address()) {
                r.health.set_banned(true);
            }
        }
    }
    let rules_changed = old.config.cache.rules != runtime.config.cache.rules;
    // Before it is installed (a pool it made first would get a fresh set of places), and
    // once nothing can fail any more.
    runtime.take_over_pools(&old);
    shared.runtime.store(Arc::new(runtime));
    crate::server::restart_health_checkers(shared);
    if rules_changed
        && let Some(cache) = shared.cache.clone()
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        // Writes made while a rule was absent bumped nothing for its tables: entries it
        // stored before could otherwise come back to life when it returns.
        let lsn = shared.runtime.load().backends.primary.health.lsn();
        rt.spawn(async move { cache.invalidate(&[], true, lsn).await });
    }
    Ok(summary)
}

/// The running values of what only a restart applies: a reload reports them "not
/// applied", so nothing may use the new ones meanwhile (new sessions took a new pool_mode,
/// and a new cache key prefix split entries from their versions).
fn keep_restart_only(config: &mut Config, running: &Config) {
    let (p, r) = (&mut config.proxy, &running.proxy);
    p.listen = r.listen;
    p.pool_mode = r.pool_mode;
    p.metrics_listen = r.metrics_listen;
    p.max_client_connections = r.max_client_connections;
    p.worker_threads = r.worker_threads;
    let rules = std::mem::take(&mut config.cache.rules);
    let (ttl, max_entry) = (config.cache.default_ttl_s, config.cache.max_entry_bytes);
    config.cache = running.cache.clone();
    config.cache.rules = rules;
    config.cache.default_ttl_s = ttl;
    config.cache.max_entry_bytes = max_entry;
}

/// A one-line summary of what differs, naming settings that only a restart applies.
pub fn describe_changes(old: &Config, new: &Config) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    // List entries by what they are, not by their place in the list: dropping the first of
    // two replicas is one replica removed, not the first one's port changed and the second
    // removed.
    let map = |c: &Config, mask| {
        // Once per configuration, not per key: thousands of users would make it quadratic.
        let ids = LISTS.map(|(list, _)| identities(c, list));
        c.flattened_with(mask)
            .into_iter()
            .map(|(k, v)| (by_identity(&ids, k), v))
            .collect::<BTreeMap<_, _>>()
    };
    let (before, after) = (map(old, true), map(new, true));
    let (raw_before, raw_after) = (map(old, false), map(new, false));
    let mut changed = Vec::new();
    // Entries removed or added whole: one line each, not one per setting.
    let mut whole = Vec::new();
    for (list, label) in LISTS {
        let ids = |c: &Config| identities(c, list).into_iter().collect::<BTreeSet<_>>();
        let (was, is) = (ids(old), ids(new));
        for id in was.difference(&is) {
            changed.push(format!("{label} {id} removed"));
            whole.push(format!("{list}[{id}]."));
        }
        for id in is.difference(&was) {
            changed.push(format!("{label} {id} added"));
            whole.push(format!("{list}[{id}]."));
        }
    }
    let gone_or_new = |key: &str| whole.iter().any(|p| key.starts_with(p.as_str()));
    let mut restart = Vec::new();
    for key in raw_before
        .keys()
        .chain(raw_after.keys().filter(|k| !raw_before.contains_key(*k)))
    {
        if raw_before.get(key) == raw_after.get(key) || gone_or_new(key) {
            continue;
        }
        if needs_restart(key) {
            restart.push(key.clone());
            continue;
        }
        changed.push(match (before.get(key), after.get(key)) {
            // A secret (a password, one inside a URL): said to change, not shown.
            (Some(b), Some(a)) if b == a => format!("{key}: changed"),
            (Some(b), Some(a)) => format!("{key}: {b} -> {a}"),
            (None, Some(a)) => format!("{key}: added {a}"),
            (Some(b), None) => format!("{key}: removed {b}"),
            (None, None) => continue,
        });
    }
    let mut out = if changed.is_empty() {
        "no change".to_owned()
    } else {
        changed.join("; ")
    };
    if !restart.is_empty() {
        out.push_str(&format!(
            "; needs a restart to take effect (not applied): {}",
            restart.join(", ")
        ));
    }
    out
}

/// The lists of a configuration whose entries the change summary names by identity, and
/// what it calls an entry.
const LISTS: [(&str, &str); 3] = [
    ("replicas", "replica"),
    ("users", "user"),
    ("cache.rules", "cache rule"),
];

/// What tells the entries of `list` apart: a replica's address, a user's name, a cache
/// rule's query or table.
fn identities(c: &Config, list: &str) -> Vec<String> {
    match list {
        "replicas" => c.replicas.iter().map(|r| r.address()).collect(),
        "users" => c.users.iter().map(|u| u.name.clone()).collect(),
        _ => c
            .cache
            .rules
            .iter()
            .map(|r| match (&r.query, &r.table) {
                (Some(q), _) => format!("query {q:?}"),
                (None, Some(t)) => format!("table {t}"),
                (None, None) => String::new(),
            })
            .collect(),
    }
}

/// `key` of a flattened view, with a list entry's index (`replicas[1].weight`) replaced by
/// its identity (`replicas[127.0.0.1:5433].weight`, `users[app].password`); `ids`: the
/// [`identities`] of each of [`LISTS`], in order.
fn by_identity(ids: &[Vec<String>; 3], key: String) -> String {
    for ((list, _), ids) in LISTS.iter().zip(ids) {
        let Some(rest) = key.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else {
            continue;
        };
        let Some((index, field)) = rest.split_once(']') else {
            return key;
        };
        return match index.parse::<usize>().ok().and_then(|i| ids.get(i)) {
            Some(id) => format!("{list}[{id}]{field}"),
            None => key,
        };
    }
    key
}

/// Settings a running proxy cannot change: its sockets, its pool mode, its Redis client.
fn needs_restart(key: &str) -> bool {
    matches!(
        key,
        "proxy.listen"
            | "proxy.pool_mode"
            | "proxy.metrics_listen"
            | "proxy.max_client_connections"
            | "proxy.worker_threads"
    ) || (key.starts_with("cache.")
        && !key.starts_with("cache.rules")
        && key != "cache.default_ttl_s"
        && key != "cache.max_entry_bytes")
}

/// Reload when the file changes (polled: works on every filesystem and editor, no extra
/// dependency), until `shutdown`.
pub async fn watch_file(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(path) = shared.config_path.get().cloned() else {
        return;
    };
    {
        // What the proxy started from, unless a reload read the file already.
        let mut status = lock(&shared.reload);
        if status.last_read.is_none() {
            status.last_read = file_digest(&path);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(now) = file_digest(&path) else {
            continue;
        };
        if lock(&shared.reload).last_read != Some(now) {
            info!(path = %path.display(), "config file changed");
            let _ = reload(&shared);
        }
    }
}

/// SHA-256 of the file's contents, `None` if it cannot be read.
fn file_digest(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    const BASE: &str = r#"
        [[users]]
        name = "app"
        password = "app_pw"
        [primary]
        host = "127.0.0.1"
        [[replicas]]
        host = "127.0.0.1"
        port = 5433
    "#;

    fn running_port(s: &Shared) -> u16 {
        s.runtime.load().config.replicas[0].port
    }

    /// A proxy's shared state started from a file (BASE) in a new directory, and a writer
    /// of that file (write-then-rename, as editors and config managers do).
    fn file_proxy() -> (tempfile::TempDir, impl Fn(&str), Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, BASE).unwrap();
        let shared = Shared::new(Runtime::new(Config::load(&path).unwrap()).unwrap());
        shared.config_path.set(path.clone()).unwrap();
        let write = move |text: &str| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        (dir, write, shared)
    }

    /// A RELOAD (or SIGHUP) of a changed file, then the file changed back before the
    /// watcher's next poll: the watcher compares the file with what the last reload read,
    /// not with its own last poll (which saw the same text as now), and reloads it.
    #[tokio::test]
    async fn the_watcher_reloads_a_file_changed_back_after_a_reload() {
        let (_dir, write, shared) = file_proxy();
        let version = |i: u32| BASE.replace("port = 5433", &format!("port = {}", 21000 + i));
        write(&version(0));
        reload(&shared).unwrap();
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(watch_file(shared.clone(), stop.clone()));
        // Its first poll (at once) has seen version 0.
        tokio::time::sleep(Duration::from_millis(200)).await;
        write(&version(1));
        reload(&shared).unwrap();
        assert_eq!(running_port(&shared), 21001);
        write(&version(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while running_port(&shared) != 21000 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        watcher.await.unwrap();
        assert_eq!(running_port(&shared), 21000, "what the file says now");
    }

    /// The file watcher and RELOAD can run at once. Whatever the interleaving, once both
    /// are done the proxy runs what the file says now, and the status agrees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_reloads_never_leave_an_older_file_applied() {
        let (_dir, write, shared) = file_proxy();
        let version = |i: u32| BASE.replace("port = 5433", &format!("port = {}", 20000 + i));
        write(&version(0));
        reload(&shared).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for i in 1..=100 {
            let racer = {
                let (shared, rt) = (shared.clone(), tokio::runtime::Handle::current());
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let _in_runtime = rt.enter();
                    while !stop.load(Ordering::Relaxed) {
                        let _ = reload(&shared);
                        // Lets the test thread in: std's mutex is not fair.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            };
            std::thread::sleep(Duration::from_millis(1));
            write(&version(i));
            reload(&shared).unwrap();
            stop.store(true, Ordering::Relaxed);
            racer.join().unwrap();
            stop.store(false, Ordering::Relaxed);
            assert_eq!(running_port(&shared), 20000 + i as u16, "round {i}");
        }
        // A rejected file after a good one: the error is what stays recorded.
        write(&(version(101) + "\n[routing]\nno_such_key = 1\n"));
        let racer = {
            let (shared, rt) = (shared.clone(), tokio::runtime::Handle::current());
            std::thread::spawn(move || {
                let _in_runtime = rt.enter();
                reload(&shared)
            })
        };
        assert!(reload(&shared).is_err());
        assert!(racer.join().unwrap().is_err());
        assert!(lock(&shared.reload).last_error.is_some());
        assert_eq!(running_port(&shared), 20100);
    }

    #[test]
    fn summaries_name_changes_and_restart_settings() {
        let old = Config::from_toml(BASE).unwrap();
        assert_eq!(describe_changes(&old, &old), "no change");
        let text = BASE.replace("port = 5433", "port = 5433\nweight = 3")
            + "\n[proxy]\nlisten = \"127.0.0.1:7000\"\n";
        let new = Config::from_toml(&text).unwrap();
        let s = describe_changes(&old, &new);
        assert!(s.contains("replicas[127.0.0.1:5433].weight: 1 -> 3"), "{s}");
        // Replicas by address: dropping the first of two is that one removed.
        let two = BASE.to_owned() + "[[replicas]]\nhost = \"127.0.0.1\"\nport = 5434\n";
        let two = Config::from_toml(&two).unwrap();
        let second_only = BASE.replace("port = 5433", "port = 5434");
        let second_only = Config::from_toml(&second_only).unwrap();
        for (from, to, says) in [
            (&two, &second_only, "replica 127.0.0.1:5433 removed"),
            (&second_only, &two, "replica 127.0.0.1:5433 added"),
        ] {
            assert_eq!(describe_changes(from, to), says);
        }
        assert!(
            s.contains("needs a restart") && s.contains("proxy.listen"),
            "{s}"
        );
        let pw = Config::from_toml(&BASE.replace("app_pw", "other")).unwrap();
        let s = describe_changes(&old, &pw);
        assert!(s.contains("users[app].password: changed"), "{s}");
        // Users and cache rules by name and text, whole ones on one line.
        let more = BASE.replace(
            "[primary]",
            "[[users]]\nname = \"web\"\npassword = \"w\"\n[primary]",
        ) + "[cache]\n[[cache.rules]]\ntable = \"albums\"\n";
        let more = Config::from_toml(&more).unwrap();
        for (from, to, says) in [
            (&old, &more, "user web added; cache rule table albums added"),
            (
                &more,
                &old,
                "user web removed; cache rule table albums removed",
            ),
        ] {
            assert_eq!(describe_changes(from, to), says);
        }
        assert!(
            !describe_changes(&old, &pw).contains("other"),
            "no secrets in logs"
        );
        // Other secrets too: applied, so said to change; a Redis password needs a restart.
        let with = |admin: &str, health: &str, redis: &str| {
            let text = format!(
                "[proxy]\nadmin_user = \"pgsplit\"\nadmin_password = \"{admin}\"\n\
                 [health]\npassword = \"{health}\"\n\
                 [cache]\nredis_url = \"redis://u:{redis}@127.0.0.1:6379\"\n{BASE}"
            );
            Config::from_toml(&text).unwrap()
        };
        let old = with("a1", "h1", "r1");
        let s = describe_changes(&old, &with("a2", "h2", "r1"));
        assert_eq!(s, "health.password: changed; proxy.admin_password: changed");
        let s = describe_changes(&old, &with("a1", "h1", "r2"));
        assert_eq!(
            s,
            "no change; needs a restart to take effect (not applied): cache.redis_url"
        );
        assert!(!s.contains("r2") && !s.contains("h2"), "no secrets in logs");
    }
}
