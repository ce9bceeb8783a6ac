//! The routing decision: a pure function of a statement's classification and the facts of
//! the session that sends it.

use super::{Classification, Target};

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The connection the open transaction runs on, whatever the statement.
    Transaction,
    Primary,
    /// The next healthy replica.
    Replica,
}

/// What the router needs to know about the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// A transaction block is open (ReadyForQuery said 'T' or 'E').
    pub in_transaction: bool,
    /// The session used something session-bound and stays on the primary.
    pub pinned: bool,
    /// A replica refused the session itself (its default isolation is serializable): its
    /// reads go to the primary, on pooled connections.
    pub replicas_refused: bool,
}

/// Route a request made of the statements in `classes` (one for a simple Query, one per
/// executed or parsed statement of an extended-protocol batch).
pub fn route<'a>(
    classes: impl IntoIterator<Item = &'a Classification>,
    facts: SessionFacts,
) -> Route {
    if facts.in_transaction {
        return Route::Transaction;
    }
    if facts.pinned || facts.replicas_refused {
        return Route::Primary;
    }
    let mut any = false;
    for c in classes {
        any = true;
        if c.target != Target::Replica || c.pins_session {
            return Route::Primary;
        }
    }
    if any { Route::Replica } else { Route::Primary }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{TxAccess, classify};

    fn r(sqls: &[&str], facts: SessionFacts) -> Route {
        let cs: Vec<_> = sqls.iter().map(|s| classify(s)).collect();
        route(&cs, facts)
    }

    #[test]
    fn reads_go_to_replicas_and_everything_else_to_the_primary() {
        let free = SessionFacts::default();
        assert_eq!(r(&["SELECT 1"], free), Route::Replica);
        assert_eq!(r(&["SELECT 1", "SELECT 2"], free), Route::Replica);
        assert_eq!(
            r(&["SELECT 1", "INSERT INTO t VALUES (1)"], free),
            Route::Primary
        );
        assert_eq!(r(&["CREATE TEMP TABLE t (a int)"], free), Route::Primary);
        assert_eq!(r(&["BEGIN"], free), Route::Primary);
        assert_eq!(r(&["not sql at all"], free), Route::Primary);
        assert_eq!(r(&[], free), Route::Primary);
    }

    #[test]
    fn read_only_transactions_may_start_on_a_replica() {
        let c = classify("BEGIN READ ONLY");
        assert_eq!(c.begins_tx, Some(TxAccess::ReadOnly));
        assert_eq!(route([&c], SessionFacts::default()), Route::Replica);
    }

    #[test]
    fn transactions_and_pinned_sessions_override_the_statement() {
        let tx = SessionFacts {
            in_transaction: true,
            ..SessionFacts::default()
        };
        assert_eq!(r(&["SELECT 1"], tx), Route::Transaction);
        let pinned = SessionFacts {
            pinned: true,
            ..SessionFacts::default()
        };
        assert_eq!(r(&["SELECT 1"], pinned), Route::Primary);
        let refused = SessionFacts {
            replicas_refused: true,
            ..SessionFacts::default()
        };
        assert_eq!(r(&["SELECT 1"], refused), Route::Primary);
        assert_eq!(r(&["BEGIN READ ONLY"], refused), Route::Primary);
    }
}
