//! What the fuzz targets share: the session's pure modules, compiled from the proxy's own
//! source files, and a few checks and helpers.
//!
//! `src/session/request.rs` (frame → `Item` decoding for routing) and `src/session/state.rs`
//! (prepared statements, session settings) are private to `pgsplit::session`. Rather than
//! widen the proxy's module tree for the fuzzer, they are compiled here from the same files:
//! their `crate::error`, `crate::protocol`, `crate::router` and `super::state` paths resolve
//! to the proxy's modules through the imports below, so the code under test is the proxy's
//! own, unchanged.

use pgsplit::{error, protocol, router};

/// `pgsplit::session::request`, compiled from the proxy's source file.
#[path = "../../src/session/request.rs"]
pub mod request;

/// `pgsplit::session::state`, compiled from the proxy's source file.
#[path = "../../src/session/state.rs"]
pub mod state;

/// The stack a session gets on a multi-threaded runtime (tokio's default worker stack).
/// Work that recurses on client input (sqlparser) must fit in it.
pub const SESSION_STACK: usize = 2 << 20;

/// Run `f` on a thread with a stack of `size` bytes (a stack overflow is a crash the
/// fuzzer reports, as it would kill the proxy).
pub fn on_stack<R: Send + 'static>(size: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new()
        .stack_size(size)
        .spawn(f)
        .expect("spawn a fuzz worker thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A frame as it goes on the wire: tag, length (itself included), body.
pub fn wire(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(tag);
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An error the proxy reports to a client must become a well-formed ErrorResponse that
/// carries its SQLSTATE (the one place errors map to SQLSTATEs is `Error::sqlstate`).
pub fn check_error_response(e: &pgsplit::Error) {
    let code = e.sqlstate().to_owned();
    assert!(
        code.len() == 5
            && code
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()),
        "bad SQLSTATE {code:?} for {e}"
    );
    for severity in [protocol::Severity::Error, protocol::Severity::Fatal] {
        let frame = e.to_error_response(severity);
        assert_eq!(frame.tag, protocol::tag::ERROR_RESPONSE);
        let fields = protocol::ErrorFields::parse(&frame.body);
        assert_eq!(fields.code, code, "ErrorResponse carries the SQLSTATE");
    }
    // Mistakes in what a client sent are the client's: the session reports them and the
    // connection's server is not blamed (banned) for it.
    if matches!(
        e,
        error::Error::Frame(_)
            | error::Error::Malformed(_)
            | error::Error::Protocol(_)
            | error::Error::Startup(_)
    ) {
        assert_eq!(e.side(), error::Side::Client, "{e}");
        assert!(matches!(code.as_str(), "08P01" | "0A000"), "{code} for {e}");
    }
}

/// A fresh classification cache, as a runtime builds it.
pub fn classify_cache() -> router::ClassifyCache {
    router::ClassifyCache::new(16_384, Vec::new())
}
