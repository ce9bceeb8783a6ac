//! Regression tests for what the fuzz targets (`fuzz/`, run by `scripts/fuzz`) found. Each
//! test replays the input (kept in `tests/fuzz_regressions/` and among the target's seeds,
//! so every fuzz run tries it again) through the same code path in the real proxy, against
//! the test cluster, and asserts the fixed behaviour.

#[path = "integration/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::{RawClient, bind, error_code, execute, message, parse, tags};

/// A session-mode proxy in front of the primary alone (every request on one server
/// connection), whose connections keep at most `max_prepared` statements.
async fn proxy(max_prepared: usize) -> common::Proxy {
    let c = common::cluster();
    let mut toml = common::session_mode(&common::base_config_toml(c));
    for port in c.replicas {
        toml = common::without_replica(&toml, port);
    }
    toml.push_str(&format!(
        "\n[pool]\nmax_prepared_statements = {max_prepared}\n"
    ));
    common::start_proxy_with(&toml).await
}

/// The whole frames of an `extended_sequence` input: after its flags byte, its oracle
/// length and oracle, the client's bytes.
fn client_frames(input: &[u8]) -> Vec<u8> {
    let oracle = input[1] as usize;
    let mut rest = &input[2 + oracle..];
    let mut out = Vec::new();
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < len + 1 {
            break;
        }
        out.extend_from_slice(&rest[..len + 1]);
        rest = &rest[len + 1..];
    }
    out
}

/// Bind and run a statement prepared under `name`: it must answer its one row.
async fn run(client: &mut RawClient, name: &str, sql: &str) -> String {
    let mut req = parse(name, sql);
    req.extend(bind(name));
    req.extend(execute());
    req.extend(message(b'S', &[]));
    let msgs = client.send(&req).await;
    assert_eq!(error_code(&msgs), None, "{sql}: {}: {msgs:?}", tags(&msgs));
    tags(&msgs)
}

/// fuzz/fuzz_targets/extended_sequence.rs, crash-9ae4be19 (minimized): one batch prepares
/// more statements than a server connection may keep, so the proxy closes the oldest ones
/// as it goes, and fails before those messages run. The proxy put back every statement it
/// had evicted, including "SELECT 9", which the server never prepared (its Parse was
/// skipped too): the next use of "SELECT 9" got a ParseComplete from the proxy and a
/// 26000 "prepared statement does not exist" from the server.
#[tokio::test]
async fn a_failed_batch_does_not_leave_statements_the_server_never_prepared() {
    let proxy = proxy(2).await;
    let mut client = RawClient::login(proxy.addr, "trustuser").await;
    let input = include_bytes!("fuzz_regressions/extended_sequence-prepared-set-undo.bin");
    // Parse s0, Parse s8, Execute (no such portal: 34000), Parse s4 "SELECT 9", Bind,
    // Parse s10, Parse s11, Sync.
    let msgs = client.send(&client_frames(input)).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "{msgs:?}");
    assert_eq!(tags(&msgs), "11EZ");
    assert_eq!(run(&mut client, "again", "SELECT 9").await, "12DCZ");
    // The statements that did run are still there, and still within the limit.
    assert_eq!(run(&mut client, "x0", "SELECT 2").await, "12DCZ");
    assert_eq!(run(&mut client, "x8", "SELECT 8").await, "12DCZ");
}

/// The same bookkeeping the other way round: a statement the server holds is evicted and
/// prepared again within a batch that fails first. The proxy forgot it although the server
/// kept it (the Close was skipped), so its next use sent a second Parse of the same name:
/// 42P05 "prepared statement already exists".
#[tokio::test]
async fn a_failed_batch_does_not_forget_statements_the_server_kept() {
    let proxy = proxy(1).await;
    let mut client = RawClient::login(proxy.addr, "trustuser").await;
    assert_eq!(run(&mut client, "a", "SELECT 1").await, "12DCZ");
    let mut req = message(b'E', b"no_such_portal\0\0\0\0\0");
    req.extend(parse("b", "SELECT 2"));
    req.extend(parse("a2", "SELECT 1"));
    req.extend(message(b'S', &[]));
    let msgs = client.send(&req).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "{msgs:?}");
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(run(&mut client, "a3", "SELECT 1").await, "12DCZ");
    assert_eq!(run(&mut client, "b2", "SELECT 2").await, "12DCZ");
}

/// fuzz/fuzz_targets/config.rs (with this input, written for it while reading the balancer;
/// the fuzzer had not reached it in its first 10 minutes): a replica weight near `u32::MAX`
/// passed validation, and building the runtime's balancer then asked for one wheel slot per
/// unit of weight, 32 GB here, and the process aborted at startup, or at a reload (SIGHUP,
/// RELOAD, a file change) of a running proxy.
#[test]
fn an_absurd_replica_weight_is_refused_before_the_balancer_sees_it() {
    use pgsplit::config::{Config, MAX_WEIGHT};
    let text = include_str!("fuzz_regressions/config-replica-weight.toml");
    let Err(err) = Config::from_toml(text) else {
        panic!("weight 4000000000 is accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("weight 4000000000 is over the maximum of 1000"),
        "{err}"
    );
    let ok = Config::from_toml(&text.replace("4000000000", &MAX_WEIGHT.to_string()))
        .expect("the largest weight is valid");
    let backends = pgsplit::backend::Backends::from_config(&ok);
    assert_eq!(backends.replicas.len(), 1);
}
