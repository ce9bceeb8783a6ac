//! The admin console: `psql -U <admin_user> pgsplit` reaches this instead of a server. It
//! speaks the simple query protocol and answers SHOW commands from the proxy's own state.

mod commands;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::protocol::{self, Frame, Severity, TxStatus, query_sql, tag};
use crate::session::client::ClientConn;
use crate::state::{SessionSlot, Shared, UserEntry};

pub use commands::{Command, Failure, Reply, parse, run};

/// The database name that opens the console.
pub const DATABASE: &str = "pgsplit";

/// Serve the console to a client that logged in as `login`. A reload that removes or
/// changes that login ends the console at its next message, as it cuts off ordinary users
/// (rotating a leaked admin password must lock out the sessions open with it).
pub async fn serve(shared: &Arc<Shared>, client: &mut ClientConn, login: &UserEntry) -> Result<()> {
    // Registered like a session, so that a shutdown reaches an idle console too (its cancel
    // key cancels nothing: the console runs no server query).
    let (pid, secret, slot) = shared.sessions.register();
    let result = serve_registered(shared, client, login, pid, secret, &slot).await;
    shared.sessions.unregister(pid);
    result
}

async fn serve_registered(
    shared: &Arc<Shared>,
    client: &mut ClientConn,
    login: &UserEntry,
    pid: i32,
    secret: i32,
    slot: &SessionSlot,
) -> Result<()> {
    let version = format!("15.0 (pgsplit {})", env!("CARGO_PKG_VERSION"));
    let mut hello = vec![protocol::auth_ok()];
    for (k, v) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgsplit admin"),
    ] {
        hello.push(protocol::parameter_status(k, v));
    }
    hello.push(protocol::backend_key_data(pid, secret));
    hello.push(protocol::ready_for_query(TxStatus::Idle));
    client.send(&hello).await?;
    tracing::info!("admin console opened");
    let mut skipping = false;
    loop {
        let f = tokio::select! {
            biased;
            _ = slot.wait_for(&shared.draining) => return Err(Error::ShuttingDown),
            f = client.read_frame() => f?,
        };
        let still_valid = shared
            .runtime
            .load()
            .admin
            .as_ref()
            .is_some_and(|admin| admin.config == login.config);
        if !still_valid {
            tracing::warn!("admin console closed: its login was removed or changed by a reload");
            return Err(Error::AuthRejected(
                "the admin login was removed or changed by a configuration reload".into(),
            ));
        }
        match f.tag {
            // As PostgreSQL, everything but a Sync is skipped after an extended-protocol
            // error (a message of no known type is still refused).
            tag::QUERY | tag::FUNCTION_CALL if skipping => {}
            tag::QUERY => {
                let mut out = match query_sql(&f.body) {
                    Ok(sql) => match parse(&sql) {
                        Ok(cmd) => reply_frames(run(shared, cmd).await),
                        Err(e) => vec![protocol::error_response(Severity::Error, "42601", &e)],
                    },
                    Err(e) => vec![protocol::error_response(
                        Severity::Error,
                        "08P01",
                        &e.to_string(),
                    )],
                };
                out.push(protocol::ready_for_query(TxStatus::Idle));
                client.send(&out).await?;
            }
            tag::FUNCTION_CALL => {
                client
                    .send(&[
                        protocol::error_response(
                            Severity::Error,
                            "0A000",
                            "the admin console calls no functions",
                        ),
                        protocol::ready_for_query(TxStatus::Idle),
                    ])
                    .await?;
            }
            // Leftovers of a COPY: PostgreSQL ignores them outside one.
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
            tag::TERMINATE => return Ok(()),
            tag::SYNC => {
                skipping = false;
                client
                    .send(&[protocol::ready_for_query(TxStatus::Idle)])
                    .await?;
            }
            // Refused at once, as PostgreSQL sends an error the moment it has one: a client
            // that ends its messages with a Flush (asyncpg) waits for an answer before
            // any Sync. The rest up to the Sync is skipped.
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE if !skipping => {
                skipping = true;
                client
                    .send(&[protocol::error_response(
                        Severity::Error,
                        "0A000",
                        "the admin console speaks only the simple query protocol",
                    )])
                    .await?;
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {}
            other => {
                return Err(Error::Protocol(format!(
                    "invalid frontend message type {}",
                    other
                )));
            }
        }
    }
}

fn reply_frames(reply: std::result::Result<Reply, Failure>) -> Vec<Frame> {
    match reply {
        Err(f) => vec![protocol::error_response(
            Severity::Error,
            f.code,
            &f.message,
        )],
        Ok(r) if r.columns.is_empty() && r.tag.is_empty() => vec![protocol::empty_query_response()],
        Ok(r) => {
            let mut out = Vec::with_capacity(r.rows.len() + 3);
            if let Some(notice) = &r.notice {
                out.push(protocol::notice_response(notice));
            }
            if !r.columns.is_empty() {
                out.push(protocol::row_description_text(&r.columns));
                for row in &r.rows {
                    let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
                    out.push(protocol::data_row_text(&values));
                }
            }
            let tag = if r.columns.is_empty() {
                r.tag.clone()
            } else {
                format!("SHOW {}", r.rows.len())
            };
            out.push(protocol::command_complete(&tag));
            out
        }
    }
}
