//! Which statements may be cached, and for how long: the `[[cache.rules]]` whitelist applied
//! to a statement's text and classification.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::normalize;
use crate::config::CacheConfig;
use crate::memo::SqlMemo;
use crate::router::{Classification, classify};

/// What the cache needs about one cacheable statement.
#[derive(Debug, PartialEq, Eq)]
pub struct CachePlan {
    /// The normalized text: part of the key, so formatting does not split entries.
    pub normalized: String,
    pub ttl: Duration,
    /// The tables whose versions guard the entry (see [`version_name`]), sorted.
    pub tables: Vec<String>,
}

pub struct CacheRules {
    queries: HashMap<String, Duration>,
    tables: HashMap<String, Duration>,
    default_ttl: Duration,
    /// Every table a cached entry can depend on: writes to other tables need no
    /// invalidation.
    guarded: HashSet<String>,
    /// Per SQL text: its plan, or `None` when it is not cacheable.
    memo: SqlMemo<Option<Arc<CachePlan>>>,
}

impl CacheRules {
    pub fn new(config: &CacheConfig) -> CacheRules {
        let default_ttl = Duration::from_secs(config.default_ttl_s);
        let mut queries = HashMap::new();
        let mut tables = HashMap::new();
        let mut guarded = HashSet::new();
        for r in &config.rules {
            let ttl = r.ttl_s.map_or(default_ttl, Duration::from_secs);
            if let Some(q) = &r.query
                && let Some(n) = normalize(q)
            {
                queries.entry(n).or_insert(ttl);
                guarded.extend(classify(q).tables_read.iter().map(|t| version_name(t)));
            }
            if let Some(t) = &r.table {
                let name = rule_table_name(t);
                guarded.insert(name.clone());
                tables.entry(name).or_insert(ttl);
            }
        }
        CacheRules {
            queries,
            tables,
            default_ttl,
            guarded,
            memo: SqlMemo::new(8192),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty() && self.tables.is_empty()
    }

    /// Whether a cached entry can depend on this table (by version name).
    pub fn guards(&self, table: &str) -> bool {
        self.guarded.contains(table)
    }

    /// The plan for `sql` if a rule whitelists it and its classification allows caching.
    pub fn plan(&self, sql: &str, class: &Classification) -> Option<Arc<CachePlan>> {
        if !cacheable(class) {
            return None;
        }
        self.memo
            .get_or_insert_with(sql, || self.make_plan(sql, class).map(Arc::new))
    }

    fn make_plan(&self, sql: &str, class: &Classification) -> Option<CachePlan> {
        let normalized = normalize(sql)?;
        let mut tables: Vec<String> = class.tables_read.iter().map(|t| version_name(t)).collect();
        tables.sort();
        tables.dedup();
        let ttl = match self.queries.get(&normalized) {
            Some(ttl) => *ttl,
            None if !tables.is_empty() => tables
                .iter()
                .map(|t| self.tables.get(t).copied())
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .min()
                .unwrap_or(self.default_ttl),
            None => return None,
        };
        Some(CachePlan {
            normalized,
            ttl,
            tables,
        })
    }
}

/// A single plain read with nothing volatile in it: the only statements a cached answer can
/// stand in for.
pub fn cacheable(class: &Classification) -> bool {
    class.is_plain_read()
        && class.parsed
        && !class.volatile
        && !class.writes_unknown
        && class.begins_tx.is_none()
        && class.statement_count == 1
}

/// The name a table's version counter goes by: the bare table name without its schema.
/// `public.albums` and `albums` (whatever the search_path) share one counter, so a write
/// through either spelling invalidates reads through both; tables of the same name in
/// different schemas share it too, which only invalidates more than needed.
pub fn version_name(table: &str) -> String {
    let bare = table.rsplit('.').next().unwrap_or(table);
    bare.replace(['{', '}'], "")
}

/// A table named in a rule, spelled as the classifier reports tables: unquoted names fold
/// to lower case.
fn rule_table_name(name: &str) -> String {
    let bare = name.trim().rsplit('.').next().unwrap_or(name).trim();
    match bare.strip_prefix('"').and_then(|b| b.strip_suffix('"')) {
        Some(quoted) => version_name(quoted),
        None => version_name(&bare.to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRule;
    use crate::router::classify;

    fn rules(list: &[(&str, &str, Option<u64>)]) -> CacheRules {
        CacheRules::new(&CacheConfig {
            default_ttl_s: 60,
            rules: list
                .iter()
                .map(|(kind, v, ttl)| CacheRule {
                    query: (*kind == "query").then(|| v.to_string()),
                    table: (*kind == "table").then(|| v.to_string()),
                    ttl_s: *ttl,
                })
                .collect(),
            ..CacheConfig::default()
        })
    }

    fn plan(r: &CacheRules, sql: &str) -> Option<Arc<CachePlan>> {
        r.plan(sql, &classify(sql))
    }

    #[test]
    fn query_rules_match_the_normalized_text() {
        let r = rules(&[(
            "query",
            "SELECT id, title FROM albums WHERE id = $1",
            Some(120),
        )]);
        let p = plan(&r, "select id,title from ALBUMS where id=$1").unwrap();
        assert_eq!(p.ttl, Duration::from_secs(120));
        assert_eq!(p.tables, vec!["albums".to_string()]);
        assert!(plan(&r, "SELECT id, title FROM albums WHERE id = $2").is_none());
        assert!(r.guards("albums") && !r.guards("songs"));
        assert!(plan(&r, "SELECT id, title FROM albums WHERE id = 1").is_none());
        assert!(plan(&r, "SELECT title FROM albums WHERE id = $1").is_none());
    }

    #[test]
    fn table_rules_need_every_table_whitelisted() {
        let r = rules(&[
            ("table", "songs", None),
            ("table", "Public.Albums", Some(10)),
        ]);
        let p = plan(&r, "SELECT * FROM songs WHERE album_id = $1").unwrap();
        assert_eq!(p.ttl, Duration::from_secs(60));
        let p = plan(
            &r,
            "SELECT * FROM albums a JOIN public.songs s ON s.album_id = a.id",
        )
        .unwrap();
        assert_eq!(p.ttl, Duration::from_secs(10), "the shortest TTL wins");
        assert_eq!(p.tables, vec!["albums".to_string(), "songs".to_string()]);
        assert!(plan(&r, "SELECT * FROM songs JOIN users ON true").is_none());
        assert!(plan(&r, "SELECT 1").is_none(), "no table, no table rule");
        assert!(r.guards("songs") && r.guards("albums") && !r.guards("users"));
    }

    #[test]
    fn only_plain_stable_single_reads_are_cacheable() {
        let r = rules(&[("table", "songs", None), ("query", "SELECT now()", None)]);
        for sql in [
            "SELECT now()",
            "SELECT * FROM songs WHERE created > now()",
            "SELECT random() FROM songs",
            "SELECT nextval('s') FROM songs",
            "SELECT * FROM songs FOR UPDATE",
            "UPDATE songs SET title = 'x'",
            "SELECT * FROM songs; SELECT * FROM songs",
            "BEGIN; SELECT * FROM songs",
            "SELECT my_function(id) FROM songs",
            "SELECT * INTO copy FROM songs",
            "WITH d AS (DELETE FROM songs RETURNING *) SELECT * FROM d",
        ] {
            assert!(plan(&r, sql).is_none(), "{sql}");
        }
        assert!(plan(&r, "SELECT count(*) FROM songs").is_some());
    }

    #[test]
    fn version_names_drop_the_schema() {
        assert_eq!(version_name("public.albums"), "albums");
        assert_eq!(version_name("albums"), "albums");
        assert_eq!(rule_table_name("\"Mixed\""), "Mixed");
        assert_eq!(rule_table_name("S.Mixed"), "mixed");
    }
}
