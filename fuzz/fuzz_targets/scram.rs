//! The server side of SCRAM-SHA-256 (`pgsplit::auth`): stored-verifier parsing, and the
//! client-first / client-final messages of an exchange.
//!
//! Input: a mode byte, the 18-byte server nonce, then NUL-separated parts.
//! - mode bit 0 clear, a real exchange: parts are the server's password, the salt, and an
//!   optional tamper instruction (offset, xor). A verifier is made with 1–4 PBKDF2
//!   iterations (cheap, same code path as 4096) and a real client (postgres-protocol) logs
//!   in with the same password, or a wrong one (mode bit 3), with channel binding
//!   (SCRAM-SHA-256-PLUS) when mode bit 4 is set.
//! - mode bit 0 set, raw messages: parts are a verifier text, a client-first and a
//!   client-final message, fed as a client would send them.
//!
//! Checks: no panic; the right password logs in and the client accepts the server's
//! signature; a wrong password, or any change to the client's final message, is refused;
//! raw messages never log in (nobody forges a proof); a verifier the proxy can parse is one
//! the config validation accepts.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use pgsplit::auth::{Binding, ScramError, ScramExchange, ScramSecret};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::{Digest, Sha256};

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// A verifier as PostgreSQL stores it (`SCRAM-SHA-256$i:salt$StoredKey:ServerKey`).
fn verifier(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}

/// A parseable verifier must pass `Config::validate` too (else `pgsplit check` and a
/// reload would refuse a verifier the proxy can use).
fn config_accepts(verifier: &str) {
    let text = format!(
        "[[users]]\nname = \"u\"\npassword = {}\n[primary]\nhost = \"h\"\n",
        toml::Value::String(verifier.to_owned())
    );
    if let Err(e) = pgsplit::config::Config::from_toml(&text) {
        panic!("config refuses a verifier the proxy parses: {verifier:?}: {e}");
    }
}

fn real_exchange(mode: u8, nonce: &[u8; 18], parts: &[&[u8]]) {
    // ASCII printable only: SASLprep leaves it unchanged, so client and verifier agree.
    let password: Vec<u8> = parts[0]
        .iter()
        .copied()
        .filter(|c| (0x20..0x7f).contains(c))
        .collect();
    let salt = parts
        .get(1)
        .filter(|s| !s.is_empty())
        .copied()
        .unwrap_or(b"salt");
    let iterations = 1 + u32::from((mode >> 1) & 3);
    let v = verifier(&password, salt, iterations);
    let secret = ScramSecret::parse(&v).expect("a verifier made like PostgreSQL's parses");
    config_accepts(&v);
    let wrong = mode & 8 != 0;
    let mut client_password = password.clone();
    if wrong {
        client_password.push(b'x');
    }
    // Over TLS: SCRAM-SHA-256-PLUS with the certificate's end-point data on both sides.
    let end_point = [nonce[0]; 32];
    let (client_binding, binding) = if mode & 16 != 0 {
        (
            ChannelBinding::tls_server_end_point(end_point.to_vec()),
            Binding::Selected(&end_point),
        )
    } else {
        (
            ChannelBinding::unsupported(),
            Binding::NotSelected { offered: false },
        )
    };
    let mut client = ScramSha256::new(&client_password, client_binding);
    let (exchange, server_first) =
        ScramExchange::client_first(&secret, client.message(), nonce, binding)
            .expect("a real client's first message is accepted");
    client
        .update(server_first.as_bytes())
        .expect("the client accepts server-first");
    let mut last = client.message().to_vec();
    let tamper = parts.get(2).filter(|t| t.len() >= 2);
    if let Some(t) = tamper {
        let at = t[0] as usize % last.len();
        last[at] ^= t[1] | 1;
    }
    match exchange.client_final(&last) {
        Ok(server_final) => {
            assert!(!wrong, "a wrong password logged in");
            assert!(
                tamper.is_none(),
                "a changed client-final logged in: {last:?}"
            );
            client
                .finish(server_final.as_bytes())
                .expect("the client accepts the server's signature");
        }
        Err(e) => {
            assert!(
                wrong || tamper.is_some(),
                "the right password was refused: {e}"
            );
            if tamper.is_none() {
                assert_eq!(e, ScramError::BadProof);
            }
        }
    }
}

fn raw_messages(nonce: &[u8; 18], parts: &[&[u8]]) {
    let text = String::from_utf8_lossy(parts[0]);
    let secret = match ScramSecret::parse(&text) {
        Some(s) => {
            config_accepts(&text);
            s
        }
        None => ScramSecret::parse(&verifier(b"pw", b"salt", 1)).expect("valid verifier"),
    };
    let first = parts.get(1).copied().unwrap_or_default();
    let end_point = [nonce[1]; 32];
    let binding = match nonce[0] % 3 {
        0 => Binding::Selected(&end_point),
        1 => Binding::NotSelected { offered: true },
        _ => Binding::NotSelected { offered: false },
    };
    let Ok((exchange, server_first)) = ScramExchange::client_first(&secret, first, nonce, binding)
    else {
        return;
    };
    let client_nonce = std::str::from_utf8(first)
        .ok()
        .and_then(|m| m.split(',').find_map(|a| a.strip_prefix("r=")))
        .expect("accepted client-first has a nonce");
    assert!(server_first.starts_with(&format!("r={client_nonce}")));
    let last = parts.get(2).copied().unwrap_or_default();
    assert!(
        exchange.client_final(last).is_err(),
        "a made-up client-final logged in"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 19 {
        return;
    }
    let mode = data[0];
    let nonce: [u8; 18] = data[1..19].try_into().expect("18 bytes");
    let parts: Vec<&[u8]> = data[19..].splitn(3, |&b| b == 0).collect();
    if mode & 1 == 0 {
        real_exchange(mode, &nonce, &parts);
    } else {
        raw_messages(&nonce, &parts);
    }
});
