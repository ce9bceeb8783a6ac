//! SCRAM-SHA-256 (RFC 5802 / 7677), server side, as PostgreSQL speaks it: over TLS also
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (RFC 5929); the user name
//! inside SCRAM is ignored (the startup packet's user counts).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac};

/// A stored SCRAM-SHA-256 verifier: what a server needs, never the password itself. The two
/// HMAC keys are set up once here rather than at every login: each setup hashes two blocks.
#[derive(Clone)]
pub struct ScramSecret {
    /// `,s=<salt>,i=<iterations>`: the end of every server-first message, made once.
    salt_and_iterations: String,
    stored_key: [u8; 32],
    /// Keyed with StoredKey: signs the AuthMessage into the ClientSignature.
    client_signer: hmac::Key,
    /// Keyed with ServerKey: signs the AuthMessage into the ServerSignature.
    server_signer: hmac::Key,
}

impl ScramSecret {
    /// Parse `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt_b64) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations = iterations.parse().ok().filter(|&i: &u32| i > 0)?;
        B64.decode(salt_b64).ok().filter(|s| !s.is_empty())?;
        let stored_key: [u8; 32] = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key: [u8; 32] = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramSecret::new(
            iterations, salt_b64, stored_key, server_key,
        ))
    }

    fn new(iterations: u32, salt_b64: &str, stored_key: [u8; 32], server_key: [u8; 32]) -> Self {
        ScramSecret {
            salt_and_iterations: salt_and_iterations(salt_b64, iterations),
            stored_key,
            client_signer: hmac::Key::new(hmac::HMAC_SHA256, &stored_key),
            server_signer: hmac::Key::new(hmac::HMAC_SHA256, &server_key),
        }
    }

    /// The secret for a plain password in the configuration, salted with [`user_salt`]:
    /// the same user shows the same salt across reloads and restarts, as a stored verifier
    /// does, and as an unknown user's [`mock`](Self::mock) does.
    pub fn from_password(password: &str, salt: &[u8; 16]) -> ScramSecret {
        // SASLprep, as libpq applies it before hashing; a password it refuses is used as
        // is (libpq and the server do the same).
        let prepared = stringprep::saslprep(password).unwrap_or(password.into());
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(ITERATIONS).expect("non-zero"),
            salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let mut stored_key = [0u8; 32];
        stored_key.copy_from_slice(digest::digest(&digest::SHA256, client_key.as_ref()).as_ref());
        let mut server_key = [0u8; 32];
        server_key.copy_from_slice(hmac::sign(&key, b"Server Key").as_ref());
        ScramSecret::new(ITERATIONS, &B64.encode(salt), stored_key, server_key)
    }

    /// A secret no password matches, for a user that does not exist: the client goes through
    /// the same exchange and fails the same way, so probing cannot tell unknown users from
    /// wrong passwords (PostgreSQL's mock authentication). The salt is made from the name as
    /// a configured user's is, so it too stays the same across reloads and restarts.
    /// Its keys are made once per process, like a real user's once per configuration, so an
    /// unknown user's login does no extra hashing that timing could reveal.
    pub fn mock(user: &str, salt_key: &hmac::Key) -> ScramSecret {
        static MOCK: std::sync::OnceLock<ScramSecret> = std::sync::OnceLock::new();
        let mock =
            MOCK.get_or_init(|| ScramSecret::new(ITERATIONS, "", rand::random(), rand::random()));
        let salt_b64 = B64.encode(user_salt(salt_key, user));
        ScramSecret {
            salt_and_iterations: salt_and_iterations(&salt_b64, ITERATIONS),
            stored_key: mock.stored_key,
            client_signer: mock.client_signer.clone(),
            server_signer: mock.server_signer.clone(),
        }
    }
}

/// PostgreSQL's default iteration count, which most real verifiers carry too.
const ITERATIONS: u32 = 4096;

/// The salt of a user whose salt pgsplit chooses (a plain password in the configuration, or
/// a user that does not exist): the name keyed with [`salt_key`].
pub fn user_salt(salt_key: &hmac::Key, user: &str) -> [u8; 16] {
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&hmac::sign(salt_key, user.as_bytes()).as_ref()[..16]);
    salt
}

/// The key of [`user_salt`]: random, made once per process. Not derived from the
/// configured passwords: anyone can ask for a name's salt, and a key made from them would
/// let a guess be checked offline with a few hashes. So these salts stay the same across
/// reloads and change at a restart, for configured and unknown names alike (a stored
/// verifier keeps its own salt: README "Known limits").
pub fn salt_key() -> &'static hmac::Key {
    static KEY: std::sync::OnceLock<hmac::Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()))
}

fn salt_and_iterations(salt_b64: &str, iterations: u32) -> String {
    format!(",s={salt_b64},i={iterations}")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error(
        "malformed SCRAM message: SCRAM-SHA-256 was selected without channel binding, but the message includes channel binding data"
    )]
    ChannelBinding,
    #[error(
        "malformed SCRAM message: SCRAM-SHA-256-PLUS was selected, but the message does not include channel binding data"
    )]
    NoChannelBinding,
    #[error(
        "SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, and this server does"
    )]
    ChannelBindingDowngrade,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingCheck,
    #[error("password authentication failed")]
    BadProof,
}

/// The channel binding of one exchange.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// The client chose SCRAM-SHA-256; `offered`: the server offered SCRAM-SHA-256-PLUS.
    NotSelected { offered: bool },
    /// The client chose SCRAM-SHA-256-PLUS: the server's `tls-server-end-point` data.
    Selected(&'a [u8]),
}

/// One exchange: `client_first` then `client_final`.
pub struct ScramExchange<'s> {
    secret: &'s ScramSecret,
    /// `client-first-message-bare,server-first-message,`: how the AuthMessage begins.
    auth_prefix: String,
    /// What the client must send (base64) as its final message's channel binding: the GS2
    /// header, then for SCRAM-SHA-256-PLUS the binding data.
    cbind_input: std::borrow::Cow<'static, [u8]>,
    /// Where the combined nonce sits in `auth_prefix`.
    nonce: std::ops::Range<usize>,
}

impl<'s> ScramExchange<'s> {
    /// Handle the SASLInitialResponse data; returns the server-first message. `binding`:
    /// how the client chose (the mechanism's name) and what the server offered.
    pub fn client_first(
        secret: &'s ScramSecret,
        msg: &[u8],
        server_nonce: &[u8; 18],
        binding: Binding<'_>,
    ) -> Result<(ScramExchange<'s>, String), ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cbind, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        // The authorization identity is always empty (checked below).
        let cbind_input: std::borrow::Cow<'static, [u8]> = match (cbind, binding) {
            ("n", Binding::NotSelected { .. }) => b"n,,".as_slice().into(),
            // The client would bind but believes the server cannot: over TLS this server
            // offered it, so something between them removed the offer.
            ("y", Binding::NotSelected { offered: true }) => {
                return Err(ScramError::ChannelBindingDowngrade);
            }
            ("y", Binding::NotSelected { offered: false }) => b"y,,".as_slice().into(),
            (c, Binding::NotSelected { .. }) if c.starts_with("p=") => {
                return Err(ScramError::ChannelBinding);
            }
            ("p=tls-server-end-point", Binding::Selected(data)) => {
                let mut input = b"p=tls-server-end-point,,".to_vec();
                input.extend_from_slice(data);
                input.into()
            }
            (c, Binding::Selected(_)) if c.starts_with("p=") => {
                return Err(ScramError::Malformed(
                    "unsupported SCRAM channel-binding type",
                ));
            }
            ("n" | "y", Binding::Selected(_)) => return Err(ScramError::NoChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity not supported",
            ));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|c| (0x21..=0x7e).contains(&c) && c != b','))
            .ok_or(ScramError::Malformed("no client nonce"))?;
        if !bare.starts_with("n=") && !bare.starts_with("m=") {
            return Err(ScramError::Malformed("bad client-first-message"));
        }
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension not supported"));
        }
        // Built by hand: `format!` costs several times more, on every login.
        let mut server_first =
            String::with_capacity(2 + client_nonce.len() + 24 + secret.salt_and_iterations.len());
        server_first.push_str("r=");
        server_first.push_str(client_nonce);
        B64.encode_string(server_nonce, &mut server_first);
        let nonce_end = server_first.len();
        server_first.push_str(&secret.salt_and_iterations);
        let mut auth_prefix = String::with_capacity(bare.len() + server_first.len() + 2);
        auth_prefix.push_str(bare);
        auth_prefix.push(',');
        let nonce = auth_prefix.len() + 2..auth_prefix.len() + nonce_end;
        auth_prefix.push_str(&server_first);
        auth_prefix.push(',');
        Ok((
            ScramExchange {
                secret,
                auth_prefix,
                cbind_input,
                nonce,
            },
            server_first,
        ))
    }

    /// Handle the SASLResponse data; returns the server-final message on success.
    pub fn client_final(&self, msg: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof_b64) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding attribute"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if B64.decode(cbind).ok().as_deref() != Some(&*self.cbind_input) {
            return Err(ScramError::ChannelBindingCheck);
        }
        if nonce != &self.auth_prefix[self.nonce.clone()] {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof_b64)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof encoding"))?;
        let mut auth_message = String::with_capacity(self.auth_prefix.len() + without_proof.len());
        auth_message.push_str(&self.auth_prefix);
        auth_message.push_str(without_proof);
        let client_signature = hmac::sign(&self.secret.client_signer, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature.as_ref()) {
            *k ^= s;
        }
        let stored = digest::digest(&digest::SHA256, &client_key);
        if !super::constant_time_eq(stored.as_ref(), &self.secret.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac::sign(&self.secret.server_signer, auth_message.as_bytes());
        let mut server_final = String::with_capacity(46);
        server_final.push_str("v=");
        B64.encode_string(server_signature.as_ref(), &mut server_final);
        Ok(server_final)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(password_on_server: &str, password_of_client: &str) -> Result<(), ScramError> {
        let verifier = postgres_protocol::password::scram_sha_256(password_on_server.as_bytes());
        run_with(
            &ScramSecret::parse(&verifier).expect("valid verifier"),
            password_of_client,
        )
    }

    fn run_with(secret: &ScramSecret, password_of_client: &str) -> Result<(), ScramError> {
        exchange(
            secret,
            password_of_client,
            Binding::NotSelected { offered: false },
            ChannelBinding::unsupported(),
        )
    }

    /// A real client's exchange with `binding` chosen by the server side and `client_cb` on
    /// the client's.
    fn run_bound(binding: Binding<'_>, client_cb: ChannelBinding) -> Result<(), ScramError> {
        let verifier = postgres_protocol::password::scram_sha_256(b"secret");
        let secret = ScramSecret::parse(&verifier).expect("valid verifier");
        exchange(&secret, "secret", binding, client_cb)
    }

    fn exchange(
        secret: &ScramSecret,
        password_of_client: &str,
        binding: Binding<'_>,
        client_cb: ChannelBinding,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password_of_client.as_bytes(), client_cb);
        let (exchange, server_first) =
            ScramExchange::client_first(secret, client.message(), &[7u8; 18], binding)?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected server-first"))?;
        let server_final = exchange.client_final(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected server signature"))
    }

    #[test]
    fn channel_binding_ties_the_proof_to_the_tls_connection() {
        let end_point = [5u8; 32];
        let bound = |data: &[u8]| ChannelBinding::tls_server_end_point(data.to_vec());
        assert_eq!(
            run_bound(Binding::Selected(&end_point), bound(&end_point)),
            Ok(())
        );
        // A man in the middle terminates TLS with another certificate: other data.
        assert_eq!(
            run_bound(Binding::Selected(&end_point), bound(&[6u8; 32])),
            Err(ScramError::ChannelBindingCheck)
        );
        // The client chose SCRAM-SHA-256-PLUS but sends no binding.
        assert_eq!(
            run_bound(Binding::Selected(&end_point), ChannelBinding::unsupported()),
            Err(ScramError::NoChannelBinding)
        );
        // The client could bind but was shown no PLUS offer, though the server made one.
        assert_eq!(
            run_bound(
                Binding::NotSelected { offered: true },
                ChannelBinding::unrequested()
            ),
            Err(ScramError::ChannelBindingDowngrade)
        );
        assert_eq!(
            run_bound(
                Binding::NotSelected { offered: false },
                ChannelBinding::unrequested()
            ),
            Ok(())
        );
        assert_eq!(
            run_bound(Binding::NotSelected { offered: true }, bound(&end_point)),
            Err(ScramError::ChannelBinding)
        );
    }

    #[test]
    fn full_exchange_with_a_real_client() {
        assert_eq!(run("secret", "secret"), Ok(()));
        assert_eq!(run("secret", "wrong"), Err(ScramError::BadProof));
    }

    #[test]
    fn a_plain_password_gets_the_salt_an_unknown_name_would_get() {
        let key = salt_key();
        let salt = user_salt(key, "app");
        assert_eq!(salt, user_salt(salt_key(), "app"));
        assert_ne!(salt, user_salt(key, "bob"));
        // A real client (libpq's algorithm, SASLprep included) logs in with it.
        for password in ["app_pw", "pässwörd", "I\u{2168}"] {
            let secret = ScramSecret::from_password(password, &salt);
            assert_eq!(run_with(&secret, password), Ok(()), "{password}");
            assert_eq!(run_with(&secret, "wrong"), Err(ScramError::BadProof));
        }
        // An unknown user shows the salt a configured one of that name would have.
        let mock = ScramSecret::mock("app", key);
        assert_eq!(
            mock.salt_and_iterations,
            ScramSecret::from_password("app_pw", &salt).salt_and_iterations
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let verifier = postgres_protocol::password::scram_sha_256(b"x");
        let secret = ScramSecret::parse(&verifier).unwrap();
        for bad in [
            &b""[..],
            b"n",
            b"n,,",
            b"n,,n=,r=",
            b"p=tls-server-end-point,,n=,r=abc",
            b"x,,n=,r=abc",
            b"\xff\xfe",
        ] {
            let plain = Binding::NotSelected { offered: false };
            assert!(ScramExchange::client_first(&secret, bad, &[1; 18], plain).is_err());
            // Well-formed for SCRAM-SHA-256-PLUS.
            if !bad.starts_with(b"p=") {
                let bound = Binding::Selected(&[1; 32]);
                assert!(ScramExchange::client_first(&secret, bad, &[1; 18], bound).is_err());
            }
        }
        let plain = Binding::NotSelected { offered: false };
        let (ex, _) =
            ScramExchange::client_first(&secret, b"n,,n=,r=abc", &[1; 18], plain).unwrap();
        for bad in [&b""[..], b"c=biws", b"c=biws,r=abc,p=AAAA", b"c=,r=,p="] {
            assert!(ex.client_final(bad).is_err());
        }
    }

    #[test]
    fn server_first_carries_both_nonces_the_salt_and_the_iterations() {
        let secret =
            ScramSecret::parse("SCRAM-SHA-256$4096:c2FsdHNhbHQ=$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .unwrap();
        let (ex, server_first) = ScramExchange::client_first(
            &secret,
            b"y,,n=,r=abc",
            &[7; 18],
            Binding::NotSelected { offered: false },
        )
        .unwrap();
        assert_eq!(
            server_first,
            "r=abcBwcHBwcHBwcHBwcHBwcHBwcH,s=c2FsdHNhbHQ=,i=4096"
        );
        assert_eq!(&*ex.cbind_input, b"y,,");
        assert_eq!(
            &ex.auth_prefix[ex.nonce.clone()],
            "abcBwcHBwcHBwcHBwcHBwcHBwcH"
        );
        assert_eq!(ex.auth_prefix, format!("n=,r=abc,{server_first},"));
    }

    #[test]
    fn verifier_parse_rejects_garbage() {
        assert!(ScramSecret::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB").is_none());
        assert!(ScramSecret::parse("plain").is_none());
    }
}
