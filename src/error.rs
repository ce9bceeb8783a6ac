//! The proxy's error type, which side of the proxy each error comes from, and the one
//! mapping from errors to ErrorResponse SQLSTATEs.

use crate::backend::BackendError;
use crate::protocol::{self, Frame, FrameError, MalformedMessage, Severity, StartupError};

/// Who is at fault: decides whether the session goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("client closed the connection")]
    ClientGone,
    #[error("client connection failed: {0}")]
    ClientIo(std::io::Error),
    #[error("client took nothing of its result for {0:?} (client_write_timeout_ms)")]
    ClientWriteTimeout(std::time::Duration),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("{0}")]
    Malformed(#[from] MalformedMessage),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
    /// The startup packet's `options` are not what the server would take (42601).
    #[error("{0}")]
    InvalidOptions(String),
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    #[error("{0}")]
    AuthRejected(String),
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("canceling authentication due to timeout")]
    LoginTimeout,
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The server connection failed while the client was in the middle of one of its
    /// messages: nothing more can reach the client that it would not read as part of that
    /// message, so the session ends without a word, as a direct connection would.
    #[error("server connection lost in the middle of a message to the client: {0}")]
    ServerLostMidMessage(BackendError),
    #[error("no server available: {0}")]
    NoServer(String),
    /// pgsplit itself is out of file descriptors (or socket buffers): no server is to blame.
    #[error("pgsplit is out of file descriptors (raise its open-file limit): {0}")]
    OutOfDescriptors(String),
    /// The primary refused the session's settings (its startup parameters, replayed): the
    /// session cannot be served, as PostgreSQL refuses such a login.
    #[error("{}", .0.message)]
    SettingsRefused(crate::protocol::ErrorFields),
    #[error("{0}")]
    PoolTimeout(String),
    #[error("the configured primary is in recovery (read-only); pgsplit refuses to send it writes")]
    PrimaryInRecovery,
    #[error("terminating connection due to administrator command (pgsplit is shutting down)")]
    ShuttingDown,
    /// The client cancelled its request while it waited for a server connection.
    #[error("canceling statement due to user request")]
    Canceled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn side(&self) -> Side {
        match self {
            Error::Backend(_)
            | Error::SettingsRefused(_)
            | Error::ServerLostMidMessage(_)
            | Error::NoServer(_)
            | Error::OutOfDescriptors(_)
            | Error::PoolTimeout(_)
            | Error::PrimaryInRecovery => Side::Backend,
            _ => Side::Client,
        }
    }

    /// SQLSTATE for the client.
    pub fn sqlstate(&self) -> &str {
        match self {
            Error::ClientGone | Error::ClientIo(_) | Error::ClientWriteTimeout(_) => "08006",
            Error::Frame(_) | Error::Malformed(_) | Error::Protocol(_) => "08P01",
            Error::Startup(StartupError::UnsupportedProtocol { .. }) => "0A000",
            Error::Startup(_) => "08P01",
            Error::Unsupported(_) => "0A000",
            Error::InvalidOptions(_) => "42601",
            Error::BadPassword(_) => "28P01",
            Error::AuthRejected(_) => "28000",
            Error::TooManyClients | Error::PoolTimeout(_) => "53300",
            Error::OutOfDescriptors(_) => "53000",
            Error::PrimaryInRecovery => "25006",
            // As PostgreSQL's authentication_timeout.
            Error::LoginTimeout => "57014",
            Error::ShuttingDown => "57P01",
            Error::Canceled => "57014",
            // A server's own refusal keeps its SQLSTATE (e.g. 3D000 unknown database).
            Error::Backend(BackendError::Server(e)) | Error::SettingsRefused(e)
                if !e.code.is_empty() =>
            {
                &e.code
            }
            Error::Backend(BackendError::AuthUnsupported(_)) => "28000",
            Error::Backend(_)
            | Error::SettingsRefused(_)
            | Error::ServerLostMidMessage(_)
            | Error::NoServer(_) => "08006",
        }
    }

    pub fn to_error_response(&self, severity: Severity) -> Frame {
        let message = match self {
            Error::Backend(BackendError::Server(e)) => e.message.clone(),
            other => other.to_string(),
        };
        protocol::error_response(severity, self.sqlstate(), &message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorFields;

    #[test]
    fn sqlstates() {
        assert_eq!(Error::BadPassword("u".into()).sqlstate(), "28P01");
        assert_eq!(Error::TooManyClients.sqlstate(), "53300");
        assert_eq!(Error::LoginTimeout.sqlstate(), "57014");
        let emfile = std::io::Error::from_raw_os_error(24).to_string();
        assert_eq!(Error::OutOfDescriptors(emfile).sqlstate(), "53000");
        assert_eq!(Error::Frame(FrameError::BadLength(1)).sqlstate(), "08P01");
        let server = Error::Backend(BackendError::Server(ErrorFields {
            severity: "FATAL".into(),
            code: "3D000".into(),
            message: "database \"x\" does not exist".into(),
            detail: String::new(),
        }));
        assert_eq!(server.sqlstate(), "3D000");
        let f = server.to_error_response(Severity::Fatal);
        assert_eq!(
            ErrorFields::parse(&f.body).message,
            "database \"x\" does not exist"
        );
    }
}
