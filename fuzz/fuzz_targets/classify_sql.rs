//! The SQL classifier, its shape cache, the result cache's normalization and rules, and the
//! admin console's command parser, on arbitrary text.
//!
//! Input: SQL text; a NUL (which no Query or Parse text can hold) separates an optional
//! second text that warms the classification cache first. Seeds are real statements.
//!
//! Runs on a thread with the stack a session has on a multi-threaded runtime: sqlparser
//! recurses on its input, and a stack overflow would take the proxy down.
//!
//! Checks: no panic, no stack overflow; the classifier's contract (what is not understood
//! goes to the primary; nothing classified as a replica read writes); a configured primary
//! function only makes routing more conservative; the shape cache (one classification per
//! text shape, literals masked) answers what classifying the text itself answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsplit::router::{
    Classification, ClassifyCache, Target, TxAccess, TxEffect, classify, classify_with,
};
use pgsplit_fuzz::{SESSION_STACK, on_stack};

fn contract(sql: &str, c: &Classification) {
    match (c.parsed, c.begins_tx) {
        // A transaction start in modes sqlparser does not read writes nothing; a read-only
        // one may run on a replica.
        (false, Some(TxAccess::ReadWrite)) => {
            assert_eq!(c.target, Target::Primary, "{sql:?}");
        }
        (false, None) => {
            assert_eq!(
                c.target,
                Target::Primary,
                "unparsed but not primary: {sql:?}"
            );
            assert!(c.writes_unknown, "{sql:?}");
        }
        _ => {}
    }
    if c.target == Target::Replica {
        assert!(
            c.tables_written.is_empty() && !c.writes_unknown,
            "a replica read that writes: {sql:?} {c:?}"
        );
        assert_ne!(c.begins_tx, Some(TxAccess::ReadWrite), "{sql:?}");
        assert!(!c.may_write(), "{sql:?}");
    }
    // The proxy queues its own query behind a request only on these promises.
    if !c.parsed || c.begins_tx.is_some() {
        assert_eq!(c.tx_effect, TxEffect::Other, "{sql:?} {c:?}");
    }
    if c.tx_effect == TxEffect::Ends {
        assert_eq!(c.statement_count, 1, "{sql:?}");
        assert_eq!(c.target, Target::Primary, "{sql:?}");
    }
    if pgsplit::cache::cacheable(c) {
        assert_eq!(c.target, Target::Replica, "{sql:?}");
    }
}

fn check(first: String, warm: Option<String>) {
    let direct = classify(&first);
    contract(&first, &direct);

    // A function the config forces to the primary can only move statements there.
    let extra = vec!["fuzz_bump".to_owned(), "count".to_owned()];
    let with_extra = classify_with(&first, &extra);
    contract(&first, &with_extra);
    if direct.target == Target::Primary {
        assert_eq!(with_extra.target, Target::Primary, "{first:?}");
    }

    let cache = ClassifyCache::new(1024, Vec::new());
    if let Some(w) = &warm {
        contract(w, &cache.get(w));
    }
    let cached = cache.get(&first);
    assert_eq!(
        *cached, direct,
        "the shape cache answers differently for {first:?} (warmed with {warm:?})"
    );
    // A replica's 25006 teaches the cache that the text writes (kept texts only).
    if first.len() <= pgsplit::memo::MAX_MEMO_SQL {
        cache.learn_write(&first);
        assert_eq!(cache.get(&first).target, Target::Primary, "{first:?}");
    }

    if let Some(n) = pgsplit::cache::normalize(&first) {
        let _ = pgsplit::cache::normalize(&n);
    }
    let _ = pgsplit::admin::parse(&first);
}

fn cache_rules(first: &str, rule: &str) {
    let config = pgsplit::config::Config::from_toml(&format!(
        "[[users]]\nname = \"u\"\npassword = \"p\"\n[primary]\nhost = \"h\"\n\
         [cache]\nenabled = true\n[[cache.rules]]\ntable = \"t\"\n[[cache.rules]]\nquery = {}\n",
        toml::Value::String(rule.to_owned())
    ));
    if let Ok(config) = config {
        let rules = pgsplit::cache::CacheRules::new(&config.cache);
        let c = classify(first);
        if let Some(plan) = rules.plan(first, &c) {
            assert!(pgsplit::cache::cacheable(&c));
            assert!(
                plan.tables.windows(2).all(|w| w[0] < w[1]),
                "sorted, unique"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |&b| b == 0);
    let first = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let warm = parts
        .next()
        .map(|w| String::from_utf8_lossy(w).into_owned());
    on_stack(SESSION_STACK, move || {
        if let Some(w) = &warm {
            cache_rules(&first, w);
        }
        check(first, warm);
    });
});
