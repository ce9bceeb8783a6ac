//! The startup phase of a client connection: SSL/GSSENC negotiation (declined for now),
//! cancel requests, the StartupMessage, and authentication against `[[users]]`.
//! Nothing here opens a backend connection: that happens only after authentication.

use std::sync::Arc;

use bytes::Buf;

use super::client::ClientConn;
use crate::auth::{Binding, ScramError, ScramExchange, ScramSecret, UserSecret, md5_response_ok};
use crate::config::{AuthMethod, PoolMode};
use crate::error::{Error, Result};
use crate::protocol::{self, StartupPacket, decode_startup, tag};
use crate::state::{Runtime, UserEntry};

/// What a new connection turned out to be.
pub enum Opening {
    Cancel {
        pid: i32,
        secret: i32,
    },
    Login(Login),
    /// The admin user, authenticated, asking for the admin console (with the login it
    /// authenticated as, which a reload may remove or change).
    Admin(Arc<UserEntry>),
}

/// An authenticated client.
pub struct Login {
    pub user: Arc<UserEntry>,
    pub database: String,
    /// Startup parameters other than user and database, passed on to every backend.
    pub params: Vec<(String, String)>,
}

/// Read startup packets until a StartupMessage or a CancelRequest arrives. An SSLRequest
/// is answered with a TLS handshake when `tls` is configured, else declined; a GSSENCRequest
/// is declined. As PostgreSQL, each may come once (in either order), and neither once TLS
/// is up: a repeated one is read as a startup packet of an unknown protocol version.
async fn read_startup(
    client: &mut ClientConn,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<StartupPacket> {
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        if let Some(p) = decode_startup(&mut client.buf)? {
            match p {
                StartupPacket::Ssl | StartupPacket::GssEnc => {
                    let (done, code) = match p {
                        StartupPacket::Ssl => (&mut ssl_done, protocol::SSL_REQUEST_CODE),
                        _ => (&mut gss_done, protocol::GSSENC_REQUEST_CODE),
                    };
                    if std::mem::replace(done, true) {
                        return Err(Error::Startup(
                            protocol::StartupError::UnsupportedProtocol {
                                major: (code >> 16) as u16,
                                minor: (code & 0xffff) as u16,
                            },
                        ));
                    }
                    if !client.buf.is_empty() {
                        // Bytes after an SSLRequest before our answer: a man-in-the-middle
                        // tell (CVE-2021-23214); refuse like PostgreSQL does.
                        return Err(Error::Protocol(
                            "received unencrypted data after SSL request".into(),
                        ));
                    }
                    match tls.filter(|_| matches!(p, StartupPacket::Ssl) && !client.is_tls()) {
                        Some(acceptor) => {
                            client.write(b"S").await?;
                            client.start_tls(acceptor).await?;
                            (ssl_done, gss_done) = (true, true);
                        }
                        None => client.write(b"N").await?,
                    }
                }
                other => return Ok(other),
            }
        } else {
            client.fill().await?;
        }
    }
}

/// The longest name PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_NAME_BYTES: usize = 63;

/// A user or database name cut as the server cuts it at login (at a character boundary):
/// the same client then reaches the same role and database, and a made-up name of
/// kilobytes cannot key a pool.
fn truncate_name(mut name: String) -> String {
    if name.len() > MAX_NAME_BYTES {
        let mut end = MAX_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

pub async fn open(client: &mut ClientConn, runtime: &Runtime, over_limit: bool) -> Result<Opening> {
    let (minor, params) =
        match read_startup(client, runtime.tls.as_ref().map(|t| &t.acceptor)).await? {
            StartupPacket::Cancel { pid, secret } => return Ok(Opening::Cancel { pid, secret }),
            StartupPacket::Startup { minor, params } => (minor, params),
            StartupPacket::Ssl | StartupPacket::GssEnc => unreachable!("handled in read_startup"),
        };
    let unsupported: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if minor > 0 || !unsupported.is_empty() {
        client
            .send(&[protocol::negotiate_protocol_version(
                protocol::PROTOCOL_3_0,
                &unsupported,
            )])
            .await?;
    }
    // Past `max_client_connections` only the admin console opens (within the as many
    // again that may log in to be refused), as PostgreSQL reserves connections for
    // superusers: that is when an operator needs SHOW CLIENTS.
    if over_limit && !asks_for_admin(&params, runtime) {
        return Err(Error::TooManyClients);
    }
    if runtime.config.proxy.tls_required && !client.is_tls() {
        return Err(Error::AuthRejected(
            "pgsplit requires TLS: connect with sslmode=require or stronger".into(),
        ));
    }
    let mut user_name = None;
    let mut database = None;
    let mut rest = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user_name = Some(v),
            "database" => database = Some(v),
            // An ordinary connection (libpq sends `replication=false` for `replication=0`):
            // nothing to pass on.
            "replication" if postgres_bool(&v) == Some(false) => {}
            "replication" => {
                return Err(Error::Unsupported(
                    "replication connections are not supported by pgsplit".into(),
                ));
            }
            _ if k.starts_with("_pq_.") => {}
            _ => rest.push((k, v)),
        }
    }
    let user_name = user_name
        .filter(|u| !u.is_empty())
        .map(truncate_name)
        .ok_or_else(|| {
            Error::AuthRejected("no PostgreSQL user name specified in startup packet".into())
        })?;
    let database = database
        .filter(|d| !d.is_empty())
        .map(truncate_name)
        .unwrap_or_else(|| user_name.clone());
    if database == crate::admin::DATABASE
        && let Some(admin) = runtime
            .admin
            .as_ref()
            .filter(|a| a.config.name == user_name)
    {
        authenticate(client, runtime, admin).await?;
        return Ok(Opening::Admin(admin.clone()));
    }
    let Some(user) = runtime.users.get(&user_name).cloned() else {
        return Err(refuse_unknown(client, runtime, user_name).await);
    };
    authenticate(client, runtime, &user).await?;
    // Session mode hands `options` to the server, which judges them; transaction mode
    // replays only the settings in them, so it refuses what the server would.
    if runtime.config.proxy.pool_mode == PoolMode::Transaction
        && let Some(refusal) = super::state::options_refusal(&rest)
    {
        return Err(Error::InvalidOptions(refusal));
    }
    Ok(Opening::Login(Login {
        user,
        database,
        params: rest,
    }))
}

/// A user pgsplit does not know asks for the password the default method would ask a known
/// one, and fails as a wrong password does, so names cannot be probed (PostgreSQL does the
/// same). With `trust` as the default there is no password to ask: refused by name.
async fn refuse_unknown(client: &mut ClientConn, runtime: &Runtime, user_name: String) -> Error {
    let secret = match runtime.config.proxy.auth_method {
        AuthMethod::ScramSha256 => {
            UserSecret::Scram(Box::new(ScramSecret::mock(&user_name, &runtime.salt_key)))
        }
        // No md5 hash matches an empty string's digest of random bytes.
        AuthMethod::Md5 => UserSecret::Md5(format!("{:032x}", rand::random::<u128>())),
        AuthMethod::Trust => {
            return Error::AuthRejected(format!(
                "user \"{user_name}\" is not allowed to connect through pgsplit"
            ));
        }
    };
    let mock = UserEntry {
        config: crate::config::UserConfig {
            name: user_name.clone(),
            password: None,
            auth_method: None,
            server_user: None,
            server_password: None,
        },
        secret,
    };
    match authenticate(client, runtime, &mock).await {
        Err(e) => e,
        Ok(()) => Error::BadPassword(user_name),
    }
}

async fn authenticate(client: &mut ClientConn, runtime: &Runtime, user: &UserEntry) -> Result<()> {
    let name = &user.config.name;
    match &user.secret {
        UserSecret::Trust => Ok(()),
        UserSecret::Md5(stored) => {
            let salt: [u8; 4] = rand::random();
            client.send(&[protocol::auth_md5(salt)]).await?;
            let f = password_frame(client).await?;
            let response = password_packet(&f)?;
            if md5_response_ok(stored, salt, response) {
                Ok(())
            } else {
                tracing::debug!(user = %name, method = "md5", "authentication failed");
                Err(Error::BadPassword(name.clone()))
            }
        }
        UserSecret::Scram(secret) => {
            // Over TLS, channel binding is offered too (first, as PostgreSQL lists it): it
            // ties the password proof to this TLS connection, against a man in the middle.
            let end_point = runtime
                .tls
                .as_ref()
                .and_then(|t| t.end_point.as_deref())
                .filter(|_| client.is_tls());
            let offered: &[&str] = match end_point {
                Some(_) => &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
                None => &["SCRAM-SHA-256"],
            };
            client.send(&[protocol::auth_sasl(offered)]).await?;
            let mut first = password_frame(client).await?;
            let (mechanism, data) = sasl_initial(&mut first)?;
            let binding = match (mechanism.as_str(), end_point) {
                ("SCRAM-SHA-256", _) => Binding::NotSelected {
                    offered: end_point.is_some(),
                },
                ("SCRAM-SHA-256-PLUS", Some(data)) => Binding::Selected(data),
                _ => {
                    return Err(Error::Protocol(format!(
                        "client selected an invalid SASL authentication mechanism: {mechanism}"
                    )));
                }
            };
            let nonce: [u8; 18] = rand::random();
            let (exchange, server_first) =
                ScramExchange::client_first(secret, &data, &nonce, binding).map_err(scram_error)?;
            client
                .send(&[protocol::auth_sasl_continue(server_first.as_bytes())])
                .await?;
            let last = password_frame(client).await?;
            match exchange.client_final(&last) {
                Ok(server_final) => {
                    // Goes out with AuthenticationOk and the greeting (or the error that
                    // replaces them): one write and one wakeup of the client less.
                    client.hold(&protocol::auth_sasl_final(server_final.as_bytes()));
                    Ok(())
                }
                Err(ScramError::BadProof) => {
                    tracing::debug!(user = %name, method = "scram-sha-256", "authentication failed");
                    Err(Error::BadPassword(name.clone()))
                }
                Err(e) => Err(scram_error(e)),
            }
        }
    }
}

/// The startup parameters name the admin user and the admin console's database.
fn asks_for_admin(params: &[(String, String)], runtime: &Runtime) -> bool {
    let Some(admin) = &runtime.admin else {
        return false;
    };
    let value = |k: &str| params.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
    let user = value("user").map(|u| truncate_name(u.clone()));
    let database = value("database")
        .filter(|d| !d.is_empty())
        .map(|d| truncate_name(d.clone()));
    user.as_deref() == Some(admin.config.name.as_str())
        && database.or(user).as_deref() == Some(crate::admin::DATABASE)
}

/// A SCRAM failure as the server reports it: a binding that does not match, or a client
/// that says the server offered none, is an authorization failure (28000, a man in the
/// middle's tell); every other one but a wrong password a protocol violation (08P01),
/// channel-binding data after choosing plain SCRAM-SHA-256 included.
fn scram_error(e: ScramError) -> Error {
    match e {
        ScramError::ChannelBindingDowngrade | ScramError::ChannelBindingCheck => {
            Error::AuthRejected(e.to_string())
        }
        _ => Error::Protocol(e.to_string()),
    }
}

async fn password_frame(client: &mut ClientConn) -> Result<bytes::Bytes> {
    let f = client.read_frame().await?;
    if f.tag != tag::PASSWORD {
        return Err(Error::Protocol(format!(
            "expected password response, got message type {}",
            f.tag
        )));
    }
    Ok(f.body)
}

/// The response of a PasswordMessage, checked as PostgreSQL checks one: one string, its
/// NUL the message's last byte.
fn password_packet(body: &[u8]) -> Result<&[u8]> {
    match body.split_last() {
        Some((0, text)) if !text.contains(&0) => Ok(text),
        _ => Err(Error::Protocol("invalid password packet size".into())),
    }
}

/// SASLInitialResponse: mechanism name, then an Int32 length (-1: none) and the data.
fn sasl_initial(body: &mut bytes::Bytes) -> Result<(String, Vec<u8>)> {
    let bad = || Error::Protocol("malformed SASLInitialResponse".into());
    let nul = body.iter().position(|&c| c == 0).ok_or_else(bad)?;
    let mechanism = String::from_utf8_lossy(&body[..nul]).into_owned();
    body.advance(nul + 1);
    if body.len() < 4 {
        return Err(bad());
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(bad());
    }
    Ok((mechanism, body.to_vec()))
}

/// A boolean as PostgreSQL's `parse_bool` reads it: any case, and any prefix of true,
/// false, yes, no (and of on / off from two letters), or 1 / 0.
fn postgres_bool(v: &str) -> Option<bool> {
    let v = v.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || v == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL reports a binding that fails, or a downgrade, as 28000, and the rest of
    /// the malformed exchanges as 08P01.
    #[test]
    fn scram_failures_carry_the_servers_sqlstates() {
        let code = |e: ScramError| scram_error(e).to_error_response(protocol::Severity::Fatal);
        let sqlstate =
            |f: crate::protocol::Frame| crate::protocol::ErrorFields::parse(&f.body).code;
        for e in [
            ScramError::ChannelBindingCheck,
            ScramError::ChannelBindingDowngrade,
        ] {
            assert_eq!(sqlstate(code(e)), "28000");
        }
        for e in [ScramError::ChannelBinding, ScramError::NoChannelBinding] {
            assert_eq!(sqlstate(code(e)), "08P01");
        }
    }

    #[test]
    fn names_are_cut_like_the_servers_at_a_character_boundary() {
        assert_eq!(truncate_name("app".into()), "app");
        assert_eq!(truncate_name("a".repeat(100)), "a".repeat(63));
        // 'é' is two bytes: 62 + 2 would be 64, so it goes whole.
        let name = format!("{}é", "a".repeat(62));
        assert_eq!(truncate_name(name), "a".repeat(62));
    }

    #[test]
    fn booleans_read_as_postgresql_reads_them() {
        for v in ["false", "F", "fal", "no", "N", "off", "OF", "0"] {
            assert_eq!(postgres_bool(v), Some(false), "{v}");
        }
        for v in ["true", "t", "Yes", "y", "on", "1"] {
            assert_eq!(postgres_bool(v), Some(true), "{v}");
        }
        for v in ["database", "o", "", "2", "falsey", "offf"] {
            assert_eq!(postgres_bool(v), None, "{v}");
        }
    }
}
