//! A client request decoded for routing: one simple Query, one FunctionCall, or the
//! extended-protocol messages up to a Sync (or a Flush), with every statement name resolved
//! to the session's [`Statement`]. Decoded once; sent to a backend once or, on a retry,
//! again to another.

use std::collections::HashMap;
use std::sync::Arc;

use super::state::Statement;
use crate::error::Result;
use crate::protocol::{
    BindNames, Frame, ParseMsg, Target, decode_target, query_sql, tag, validate_execute,
};
use crate::router::{Classification, ClassifyCache};

/// One frontend message of a request, decoded as far as routing and renaming need.
#[derive(Debug, Clone)]
pub enum Item {
    Query {
        frame: Frame,
        class: Arc<Classification>,
    },
    FunctionCall(Frame),
    Parse(Arc<Statement>),
    /// `stmt` is `None` for a name the session does not know (an SQL-level PREPARE, or an
    /// error the server will report).
    Bind {
        frame: Frame,
        stmt: Option<Arc<Statement>>,
    },
    DescribeStatement {
        frame: Frame,
        stmt: Option<Arc<Statement>>,
    },
    CloseStatement {
        frame: Frame,
        name: String,
        known: bool,
    },
    /// Execute, Describe portal, Close portal: forwarded as they are.
    Portal(Frame),
    Sync,
    Flush,
    /// A Sync the proxy adds itself (never decoded from the client).
    HiddenSync,
}

impl Item {
    pub fn is_execute(&self) -> bool {
        matches!(self, Item::Portal(f) if f.tag == tag::EXECUTE)
    }

    /// The classification of what this item parses or executes, for routing.
    pub fn class(&self) -> Option<&Arc<Classification>> {
        match self {
            Item::Query { class, .. } => Some(class),
            Item::Parse(s) => Some(&s.class),
            Item::Bind { stmt: Some(s), .. } | Item::DescribeStatement { stmt: Some(s), .. } => {
                Some(&s.class)
            }
            _ => None,
        }
    }
}

/// Decode one extended-protocol (or Query/FunctionCall) frame. `local` holds the statements
/// parsed earlier in the same batch, which shadow the session's.
pub fn decode(
    frame: Frame,
    classify: &ClassifyCache,
    session: &HashMap<String, Arc<Statement>>,
    local: &mut HashMap<String, Arc<Statement>>,
) -> Result<Item> {
    let lookup = |name: &str, local: &HashMap<String, Arc<Statement>>| {
        local.get(name).or_else(|| session.get(name)).cloned()
    };
    Ok(match frame.tag {
        tag::QUERY => {
            let class = classify.get(&query_sql(&frame.body)?);
            Item::Query { frame, class }
        }
        tag::FUNCTION_CALL => Item::FunctionCall(frame),
        tag::PARSE => {
            let parse = ParseMsg::decode(&frame.body)?;
            let class = classify.get(&parse.sql);
            let stmt = Arc::new(Statement::new(parse, class));
            local.insert(stmt.parse.name.clone(), stmt.clone());
            Item::Parse(stmt)
        }
        tag::BIND => {
            let stmt = lookup(BindNames::decode(&frame.body)?.statement, local);
            Item::Bind { frame, stmt }
        }
        tag::DESCRIBE => match decode_target(&frame.body, "Describe")? {
            Target::Statement(name) => {
                let stmt = lookup(name, local);
                Item::DescribeStatement { frame, stmt }
            }
            Target::Portal(_) => Item::Portal(frame),
        },
        tag::CLOSE => match decode_target(&frame.body, "Close")? {
            Target::Statement(name) => {
                let name = name.to_owned();
                let known = local.remove(&name).is_some() | session.contains_key(&name);
                Item::CloseStatement { frame, name, known }
            }
            Target::Portal(_) => Item::Portal(frame),
        },
        tag::EXECUTE => {
            validate_execute(&frame.body)?;
            Item::Portal(frame)
        }
        tag::SYNC => Item::Sync,
        tag::FLUSH => Item::Flush,
        other => {
            return Err(crate::error::Error::Protocol(format!(
                "invalid frontend message type {}",
                other as char
            )));
        }
    })
}
