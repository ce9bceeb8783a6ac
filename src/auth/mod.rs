//! Client authentication, server side: the secrets derived from `[[users]]` and the
//! SCRAM-SHA-256 and md5 exchanges.
//!
//! Pure: the session feeds it the client's messages and writes what it returns. Secrets are
//! derived once per configuration (a key derivation per connection would cost milliseconds
//! of CPU), so a login costs a few HMACs.

mod scram;

use md5::{Digest, Md5};

pub use scram::{Binding, ScramError, ScramExchange, ScramSecret, salt_key};

use crate::config::{AuthMethod, Config, UserConfig};

/// What the proxy keeps to check one user's password.
#[derive(Clone)]
pub enum UserSecret {
    /// Boxed: two prepared HMAC keys make it ~400 bytes.
    Scram(Box<ScramSecret>),
    /// `md5(password || username)` as 32 hex digits (PostgreSQL's stored form, minus "md5").
    Md5(String),
    Trust,
}

impl std::fmt::Debug for UserSecret {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSecret::Scram(_) => f.write_str("Scram(..)"),
            UserSecret::Md5(_) => f.write_str("Md5(..)"),
            UserSecret::Trust => f.write_str("Trust"),
        }
    }
}

impl UserSecret {
    /// Derive the secret for a configured user; `None` when the config cannot support its
    /// method (validation rejects such configs first).
    pub fn for_user(
        cfg: &Config,
        user: &UserConfig,
        salt_key: &ring::hmac::Key,
    ) -> Option<UserSecret> {
        let method = user.auth_method.unwrap_or(cfg.proxy.auth_method);
        match method {
            AuthMethod::Trust => Some(UserSecret::Trust),
            AuthMethod::ScramSha256 => {
                let p = user.password.as_deref()?;
                let secret = if p.starts_with("SCRAM-SHA-256$") {
                    ScramSecret::parse(p)?
                } else {
                    ScramSecret::from_password(p, &scram::user_salt(salt_key, &user.name))
                };
                Some(UserSecret::Scram(Box::new(secret)))
            }
            AuthMethod::Md5 => {
                let p = user.password.as_deref()?;
                let hex = match p.strip_prefix("md5") {
                    Some(h) if crate::config::is_verifier(p) => h.to_ascii_lowercase(),
                    _ => md5_hex(&[p.as_bytes(), user.name.as_bytes()]),
                };
                Some(UserSecret::Md5(hex))
            }
        }
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    crate::hex::hex(&h.finalize())
}

/// Check an md5 PasswordMessage payload (`"md5" + md5(hex_secret || salt)`, NUL-terminated).
pub fn md5_response_ok(stored_hex: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let response = response.strip_suffix(&[0]).unwrap_or(response);
    let Some(hex) = response.strip_prefix(b"md5") else {
        return false;
    };
    constant_time_eq(md5_hex(&[stored_hex.as_bytes(), &salt]).as_bytes(), hex)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_libpq() {
        // What libpq sends for user "md5user", password "md5_pw", salt 01 02 03 04.
        let salt = [1, 2, 3, 4];
        let stored = md5_hex(&[b"md5_pw", b"md5user"]);
        let client = postgres_protocol::authentication::md5_hash(b"md5user", b"md5_pw", salt);
        assert!(md5_response_ok(&stored, salt, client.as_bytes()));
        let mut with_nul = client.clone().into_bytes();
        with_nul.push(0);
        assert!(md5_response_ok(&stored, salt, &with_nul));
        let wrong = postgres_protocol::authentication::md5_hash(b"md5user", b"nope", salt);
        assert!(!md5_response_ok(&stored, salt, wrong.as_bytes()));
        assert!(
            !md5_response_ok(&stored, salt, &client.as_bytes()[3..]),
            "the right digest without its md5 prefix"
        );
        assert!(!md5_response_ok(&stored, salt, b""));
    }

    #[test]
    fn md5_secret_from_a_stored_hash() {
        let cfg = Config::from_toml(
            r#"
            [proxy]
            auth_method = "md5"
            [[users]]
            name = "u"
            password = "md5AABBCCDDEEFF00112233445566778899"
            [primary]
            host = "h"
        "#,
        )
        .unwrap();
        match UserSecret::for_user(&cfg, &cfg.users[0], scram::salt_key()) {
            Some(UserSecret::Md5(h)) => assert_eq!(h, "aabbccddeeff00112233445566778899"),
            other => panic!("{other:?}"),
        }
    }
}
