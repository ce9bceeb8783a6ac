//! What a client session remembers so any backend can serve it: recorded settings and
//! prepared statements. Pure data, unit-tested.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::protocol::ParseMsg;
use crate::router::{Classification, SessionOp};

/// A statement the client prepared with the extended protocol.
#[derive(Debug)]
pub struct Statement {
    pub parse: ParseMsg,
    pub class: Arc<Classification>,
    /// Stable hash of SQL text and declared parameter types.
    pub hash: u64,
    /// The name it has on servers: derived from the hash, so equal SQL shares one
    /// server-side statement and two clients' names never collide.
    pub server_name: String,
}

impl Statement {
    pub fn new(parse: ParseMsg, class: Arc<Classification>) -> Statement {
        // DefaultHasher::new() uses fixed keys: the same text hashes alike in every process.
        let mut h = std::hash::DefaultHasher::new();
        parse.sql_raw.hash(&mut h);
        parse.param_types.hash(&mut h);
        let hash = h.finish();
        let server_name = if parse.name.is_empty() {
            String::new()
        } else {
            format!("pgsplit_{hash:016x}")
        };
        Statement {
            parse,
            class,
            hash,
            server_name,
        }
    }
}

/// Settings recorded from SET / RESET / DISCARD, replayed on every backend the session uses.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// GUC name (lower-case) → the SET statement that produced the current value.
    pub values: HashMap<String, String>,
    /// Bumped on every change, so a backend connection can tell cheaply that it is current.
    pub generation: u64,
}

impl Settings {
    /// Apply committed session operations. Returns true when prepared statements must be
    /// forgotten too (DISCARD ALL).
    pub fn apply(&mut self, ops: &[SessionOp]) -> bool {
        let mut discard = false;
        for op in ops {
            match op {
                SessionOp::Set { name, sql } => {
                    self.values.insert(name.clone(), sql.clone());
                }
                SessionOp::Reset { name } => {
                    self.values.remove(name);
                }
                SessionOp::ResetAll => self.values.clear(),
                SessionOp::DiscardAll => {
                    self.values.clear();
                    discard = true;
                }
                SessionOp::Deallocate { .. } | SessionOp::DeallocateAll => continue,
            }
            self.generation += 1;
        }
        discard
    }

    /// The SQL that brings a backend from `current` to these settings, or `None` if it is
    /// already there.
    pub fn diff_sql(&self, current: &HashMap<String, String>) -> Option<String> {
        let mut stmts: Vec<String> = Vec::new();
        for name in current.keys() {
            if !self.values.contains_key(name) {
                stmts.push(reset_sql(name));
            }
        }
        for (name, sql) in &self.values {
            if current.get(name) != Some(sql) {
                stmts.push(sql.clone());
            }
        }
        if stmts.is_empty() {
            None
        } else {
            Some(stmts.join("; "))
        }
    }
}

fn reset_sql(name: &str) -> String {
    match name {
        "session_authorization" => "RESET SESSION AUTHORIZATION".to_owned(),
        // Quoted so names like `pgsplit.consistency` or mixed case survive.
        _ => format!("RESET \"{}\"", name.replace('"', "\"\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, sql: &str) -> SessionOp {
        SessionOp::Set {
            name: name.into(),
            sql: sql.into(),
        }
    }

    #[test]
    fn diff_sets_what_differs_and_resets_what_is_gone() {
        let mut s = Settings::default();
        s.apply(&[
            set("search_path", "SET search_path TO a"),
            set("timezone", "SET TIME ZONE 'UTC'"),
        ]);
        let mut server = HashMap::new();
        let sql = s.diff_sql(&server).unwrap();
        assert!(sql.contains("SET search_path TO a") && sql.contains("SET TIME ZONE 'UTC'"));
        server = s.values.clone();
        assert_eq!(s.diff_sql(&server), None);
        s.apply(&[SessionOp::Reset {
            name: "timezone".into(),
        }]);
        assert_eq!(s.diff_sql(&server).as_deref(), Some("RESET \"timezone\""));
        assert!(s.apply(&[SessionOp::DiscardAll]));
        assert!(s.values.is_empty());
    }

    #[test]
    fn statements_share_server_names_by_text() {
        let c = Arc::new(Classification::unknown());
        let p = |name: &str, sql: &str| ParseMsg {
            name: name.into(),
            sql: sql.into(),
            sql_raw: bytes::Bytes::copy_from_slice(sql.as_bytes()),
            param_types: bytes::Bytes::from_static(&[0, 0]),
        };
        let a = Statement::new(p("a", "select 1"), c.clone());
        let b = Statement::new(p("b", "select 1"), c.clone());
        let d = Statement::new(p("a", "select 2"), c.clone());
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, d.server_name);
        assert_eq!(Statement::new(p("", "select 1"), c).server_name, "");
    }
}
