//! The Redis side of the result cache: lookups, fills and invalidations through fred, behind
//! a circuit breaker so a missing or slow Redis never fails a query.
//!
//! Coherence rests on versions kept in Redis itself, so any number of pgsplit instances
//! sharing one Redis agree without talking to each other:
//! - each table (and a global epoch) has a version `<counter>:<LSN>`; a committed write bumps
//!   the counter and raises the LSN to the write's commit position (one Lua script per key);
//! - an entry stores the versions read *before* its query ran and is served only while they
//!   are still current, so a fill racing a write can only store an entry that never matches;
//! - the lookup hands the highest LSN among those versions to the router, which fills only
//!   from a replica that has replayed that far (or the primary): a lagging replica cannot put
//!   data older than an acknowledged write back under the new version.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use tracing::{info, warn};

use super::entry::{decode_entry, encode_entry, fresh_version, lsn_hex, version_key, version_lsn};
use crate::config::CacheConfig;

/// Raise a version: bump its counter (or start a missing one at a random value) and keep the
/// highest commit LSN. LSNs are fixed-width upper-case hex, so string order is numeric order.
const BUMP_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
local lsn = ARGV[1]
local n = nil
if cur then
  local sep = string.find(cur, ':', 1, true)
  if sep then
    n = tonumber(string.sub(cur, 1, sep - 1))
    local old = string.sub(cur, sep + 1)
    if old > lsn then lsn = old end
  end
end
if n then n = n + 1 else n = tonumber(ARGV[2]) end
redis.call('SET', KEYS[1], string.format('%d:%s', n, lsn))
return n
"#;

/// How often a tripped breaker tries Redis again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Reconnect forever, soon at first (a client's first connection goes through the policy
/// too: Redis is usually there at once), then every 500 ms at most.
fn reconnect_policy() -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new_exponential(0, 10, 500, 2);
    policy.set_jitter(10);
    policy
}

/// The answer to a lookup.
pub enum Lookup {
    /// The stored RowDescription / DataRow / CommandComplete frames.
    Hit(Bytes),
    /// Run the query (only where `floor_lsn` is replayed) and offer the answer to `store`.
    Miss(Fill),
    /// Redis is unavailable: run the query, store nothing.
    Bypass,
}

/// A pending fill: where it goes and the versions it was looked up under.
pub struct Fill {
    key: String,
    versions: String,
    /// The highest commit position among the guarding versions.
    pub floor_lsn: u64,
}

/// Counters for SHOW CACHE and the metrics endpoint.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    /// Answers larger than `max_entry_bytes`, not stored.
    pub too_large: AtomicU64,
    /// Version bumps sent (one per committed writing transaction).
    pub invalidations: AtomicU64,
    /// Redis calls that failed or timed out.
    pub errors: AtomicU64,
    /// Lookups skipped because the breaker was open.
    pub bypassed: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub stores: u64,
    pub too_large: u64,
    pub invalidations: u64,
    pub errors: u64,
    pub bypassed: u64,
    pub redis_available: bool,
}

/// The best-known commit position of the primary, for bumps whose own position is unknown.
pub type LsnSource = Box<dyn Fn() -> u64 + Send + Sync>;

pub struct ResultCache {
    pool: Pool,
    prefix: String,
    timeout: Duration,
    /// Breaker open: Redis failed; lookups and fills are skipped until a probe succeeds.
    open: AtomicBool,
    probing: AtomicBool,
    /// The log has said Redis is unavailable since it last answered (once per outage,
    /// also one that begins before it ever answered).
    outage_told: AtomicBool,
    /// A write was not recorded in Redis while the breaker was open: everything cached may
    /// be stale, so the epoch is bumped before the cache is used again.
    missed_writes: AtomicBool,
    /// The highest commit position among those writes: the epoch bump carries it, so that
    /// no replica behind them fills the cache afterwards.
    missed_lsn: AtomicU64,
    lsn_source: LsnSource,
    pub stats: CacheStats,
}

type RedisResult<T> = std::result::Result<T, String>;

impl ResultCache {
    /// Build the client and start connecting in the background. The cache stays bypassed
    /// until Redis answered once.
    pub fn connect(config: &CacheConfig, lsn_source: LsnSource) -> RedisResult<Arc<ResultCache>> {
        let mut redis_config = Config::from_url(&config.redis_url).map_err(|e| e.to_string())?;
        // Without this, a first connection that fails (Redis not up yet, or slow to accept)
        // is never retried, and the cache stays bypassed for the life of the process.
        redis_config.fail_fast = false;
        let timeout = config.timeout();
        let pool = Builder::from_config(redis_config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_millis(500));
                c.internal_command_timeout = timeout.max(Duration::from_millis(500));
                // A command is sent once: retrying after a reconnect could land a fill or
                // a bump long after the fact.
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(reconnect_policy())
            .build_pool(2)
            .map_err(|e| e.to_string())?;
        let cache = Arc::new(ResultCache {
            pool,
            prefix: config.key_prefix.clone(),
            timeout,
            open: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            outage_told: AtomicBool::new(false),
            missed_writes: AtomicBool::new(false),
            missed_lsn: AtomicU64::new(0),
            lsn_source,
            stats: CacheStats::default(),
        });
        cache.pool.connect_pool();
        cache.start_probe();
        Ok(cache)
    }

    pub fn is_bypassed(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            hits: get(&s.hits),
            misses: get(&s.misses),
            stores: get(&s.stores),
            too_large: get(&s.too_large),
            invalidations: get(&s.invalidations),
            errors: get(&s.errors),
            bypassed: get(&s.bypassed),
            redis_available: !self.is_bypassed(),
        }
    }

    /// Look up `key`, guarded by the versions of `tables` and the global epoch.
    pub async fn lookup(self: &Arc<Self>, key: String, tables: &[String]) -> Lookup {
        if self.is_bypassed() {
            self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
            return Lookup::Bypass;
        }
        match self.timed(self.fetch(&key, tables)).await {
            Ok((entry, versions, floor_lsn)) => {
                if let Some(frames) = entry.and_then(|e| decode_entry(e, &versions)) {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Hit(frames);
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(Fill {
                    key,
                    versions,
                    floor_lsn,
                })
            }
            Err(e) => {
                self.trip(&e);
                Lookup::Bypass
            }
        }
    }

    /// The entry and the current versions (joined), in one round trip when every version
    /// exists.
    async fn fetch(
        &self,
        key: &str,
        tables: &[String],
    ) -> RedisResult<(Option<Bytes>, String, u64)> {
        let client = self.pool.next();
        let version_keys: Vec<String> = std::iter::once(None)
            .chain(tables.iter().map(|t| Some(t.as_str())))
            .map(|t| version_key(&self.prefix, t))
            .collect();
        let mut values: Vec<Value> = if client.is_clustered() {
            // The keys live on different slots: one GET each, pipelined.
            Box::pin(get_pipelined(client, key, &version_keys)).await?
        } else {
            // One MGET is one command through the client instead of one per key (each costs
            // a trip through its router task).
            let keys: Vec<&str> = std::iter::once(key)
                .chain(version_keys.iter().map(String::as_str))
                .collect();
            // Boxed on its own line: the client's future is large (about 5 KB), and only
            // the box stays in this one's state across the wait.
            let mget = Box::pin(client.mget(keys));
            mget.await.map_err(err)?
        };
        if values.len() != version_keys.len() + 1 {
            return Err("unexpected reply to the lookup".into());
        }
        let versions_raw = values.split_off(1);
        let entry: Option<Bytes> = values.pop().and_then(|v| v.convert().ok());
        let mut versions = Vec::with_capacity(version_keys.len());
        for (k, v) in version_keys.iter().zip(versions_raw) {
            let v: Option<String> = v.convert().map_err(err)?;
            let v = match v.filter(|v| version_lsn(v).is_some()) {
                Some(v) => v,
                // Missing (never written, or lost to a flush or eviction): start it at a
                // random counter that no stored entry carries. Boxed: rare, and its futures
                // would enlarge every lookup's.
                None => Box::pin(start_version(client, k, (self.lsn_source)())).await?,
            };
            versions.push(v);
        }
        let floor = versions
            .iter()
            .filter_map(|v| version_lsn(v))
            .max()
            .unwrap_or(0);
        Ok((entry, versions.join(","), floor))
    }

    /// Store an answer; a failure only costs the entry.
    pub async fn store(self: &Arc<Self>, fill: Fill, frames: &[u8], ttl: Duration) {
        if self.is_bypassed() {
            return;
        }
        let value = encode_entry(&fill.versions, frames);
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let client = self.pool.next();
        let set = client.set::<(), _, _>(fill.key, value, Some(Expiration::PX(ms)), None, false);
        match self.timed(async { set.await.map_err(err) }).await {
            Ok(()) => {
                self.stats.stores.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.trip(&e),
        }
    }

    /// A write committed at `lsn`: bump the versions of `tables`, or the global epoch when
    /// the write cannot be attributed to tables. Returns once Redis has them (or gave up).
    pub async fn invalidate(self: &Arc<Self>, tables: &[String], everything: bool, lsn: u64) {
        if self.is_bypassed() {
            self.note_missed(lsn);
            if self.is_bypassed() {
                return;
            }
            // Reopened meanwhile: the probe may have looked before this write was noted.
        }
        let keys: Vec<String> = if everything {
            vec![version_key(&self.prefix, None)]
        } else {
            tables
                .iter()
                .map(|t| version_key(&self.prefix, Some(t)))
                .collect()
        };
        let mut bumped = self.timed(self.bump(&keys, lsn)).await;
        if bumped.is_err() {
            // Once more before giving up: a bump that did not land leaves every other
            // instance sharing this Redis serving what the write outdated, until this
            // one's probe gets through. (Had the first landed after all, the second only
            // invalidates once more.)
            bumped = self.timed(self.bump(&keys, lsn)).await;
        }
        match bumped {
            Ok(()) => {
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.note_missed(lsn);
                self.trip(&e);
            }
        }
    }

    fn note_missed(&self, lsn: u64) {
        self.missed_lsn.fetch_max(lsn, Ordering::Relaxed);
        self.missed_writes.store(true, Ordering::Relaxed);
    }

    /// If writes went unrecorded, bump the epoch at the highest position among them (or
    /// the primary's last known one, if higher). False if Redis failed.
    async fn bump_missed(&self) -> bool {
        if !self.missed_writes.swap(false, Ordering::Relaxed) {
            return true;
        }
        let lsn = self
            .missed_lsn
            .swap(0, Ordering::Relaxed)
            .max((self.lsn_source)());
        match self
            .timed(self.bump(&[version_key(&self.prefix, None)], lsn))
            .await
        {
            Ok(()) => {
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.note_missed(lsn);
                tracing::debug!(error = %e, "epoch bump after a redis outage failed");
                false
            }
        }
    }

    async fn bump(&self, keys: &[String], lsn: u64) -> RedisResult<()> {
        let client = self.pool.next();
        let lsn = lsn_hex(lsn);
        // One script per key: in Redis Cluster each version lives on its own slot.
        for k in keys {
            let start = fresh_version(0);
            let start = start.split(':').next().unwrap_or("1").to_owned();
            let _: i64 = client
                .eval(BUMP_SCRIPT, k.as_str(), vec![lsn.clone(), start])
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    async fn timed<T>(&self, f: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", self.timeout.as_millis())))
    }

    /// Redis failed: bypass the cache until a probe succeeds.
    fn trip(self: &Arc<Self>, error: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if !self.open.swap(true, Ordering::Relaxed)
            && !self.outage_told.swap(true, Ordering::Relaxed)
        {
            warn!(%error, "redis unavailable: result cache bypassed until it answers again");
        }
        self.start_probe();
    }

    fn start_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        // The probe holds only a weak reference: a cache dropped with its configuration
        // stops probing.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(cache) = weak.upgrade() else { return };
                if cache.try_recover().await {
                    cache.probing.store(false, Ordering::Relaxed);
                    // A failure while the probe finished tripped the breaker again and
                    // left the probing to this task (which was still running): go on.
                    if !cache.open.load(Ordering::Relaxed)
                        || cache.probing.swap(true, Ordering::Relaxed)
                    {
                        return;
                    }
                    continue;
                }
                drop(cache);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
    }

    /// One probe: PING, then (if writes went unrecorded meanwhile) bump the epoch, so
    /// nothing filled before them is served again.
    async fn try_recover(self: &Arc<Self>) -> bool {
        let client = self.pool.next();
        // Not on any query's path: the probe may wait longer than a lookup, e.g. for the
        // first connection to come up.
        let patience = self.timeout.max(PROBE_INTERVAL);
        let options = Options {
            timeout: Some(patience),
            ..Options::default()
        };
        let patient = client.with_options(&options);
        let ping = tokio::time::timeout(patience, patient.ping::<String>(None));
        if let Err(e) = ping
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(err))
        {
            if self.outage_told.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, "redis probe failed");
            } else {
                warn!(error = %e, "redis unavailable: result cache bypassed until it answers");
            }
            return false;
        }
        // Writes noted while a bump was on its way bump again: no lookup may find what
        // they outdated once the cache is open.
        while self.missed_writes.load(Ordering::Relaxed) {
            if !self.bump_missed().await {
                return false;
            }
        }
        // Before the breaker closes: a failure after that is a new outage, to be told.
        self.outage_told.store(false, Ordering::Relaxed);
        if self.open.swap(false, Ordering::Relaxed) {
            info!("redis answers: result cache in use");
        }
        // A write noted between the last look and the reopening (another worker thread):
        // it saw the cache bypassed and left it to this probe; writes after the reopening
        // bump their own tables.
        if !self.bump_missed().await {
            self.open.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }
}

fn err(e: fred::error::Error) -> String {
    e.to_string()
}

/// GET the entry and every version key in one pipeline (Redis Cluster: different slots).
async fn get_pipelined(
    client: &Client,
    key: &str,
    version_keys: &[String],
) -> RedisResult<Vec<Value>> {
    let pipe = client.pipeline();
    let _: () = pipe.get(key).await.map_err(err)?;
    for k in version_keys {
        let _: () = pipe.get(k.as_str()).await.map_err(err)?;
    }
    pipe.all().await.map_err(err)
}

/// Create a missing version key (unless another instance just did) and read it back.
async fn start_version(client: &Client, k: &str, lsn: u64) -> RedisResult<String> {
    let _: Option<String> = client
        .set(k, fresh_version(lsn), None, Some(SetOptions::NX), false)
        .await
        .map_err(err)?;
    let v: Option<String> = client.get(k).await.map_err(err)?;
    v.ok_or_else(|| "a version vanished while it was created".into())
}
