//! The TOML configuration: parsing, `Config::validate`, and what a runtime derives from a
//! valid configuration (user secrets, cache rules, backends, SHOW CONFIG's listing).
//!
//! Input: the text of a config file (lossy UTF-8, as a file with a stray byte would be
//! refused anyway).
//!
//! Checks: no panic; a valid configuration written back out as TOML (the form SHOW CONFIG
//! and the docs describe) parses to the same configuration and stays valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsplit::auth::UserSecret;
use pgsplit::config::{AuthMethod, Config};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(cfg) = Config::from_toml(&text) else {
        return;
    };
    let _ = cfg.flattened();
    for user in &cfg.users {
        let method = user.auth_method.unwrap_or(cfg.proxy.auth_method);
        let password = user.password.as_deref().unwrap_or_default();
        // Deriving SCRAM keys from a plain password costs 4096 PBKDF2 rounds: skip it (a
        // unit test checks that derivation against a real client).
        if method == AuthMethod::ScramSha256 && !password.starts_with("SCRAM-SHA-256$") {
            continue;
        }
        let _ = UserSecret::for_user(&cfg, user, pgsplit::auth::salt_key());
    }
    let _ = pgsplit::cache::CacheRules::new(&cfg.cache);
    let _ = pgsplit::backend::Backends::from_config(&cfg);
    let _ = cfg.proxy.client_login_timeout();
    let _ = cfg.proxy.shutdown_timeout();
    let _ = cfg.health.interval();
    let _ = cfg.pool.connect_timeout();
    let _ = cfg.cache.timeout();

    let written = toml::to_string(&cfg).expect("a valid config serializes");
    let again = Config::from_toml(&written)
        .unwrap_or_else(|e| panic!("a valid config written out is refused: {e}\n{written}"));
    assert_eq!(
        again, cfg,
        "a config changes when written out and read back"
    );
});
