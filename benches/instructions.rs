//! Instruction counts per operation on the hot path, for `scripts/instructions` to run under
//! callgrind. Wall-clock time on a shared 2-core machine is noise; the number of instructions
//! a release build executes for the same input is not, so this is what CI can check.
//!
//! `instructions <scenario> <iterations>` runs one scenario that many times and exits. The
//! script runs each scenario twice (N and 2N iterations) and divides the difference by N, so
//! process start-up, allocator warm-up and the first cache miss cancel out. Without arguments
//! (as `cargo test --all-targets` runs it) every scenario runs a few times as a smoke test.

use std::hint::black_box;

mod fixtures;

use bytes::BytesMut;
use fixtures::{JOIN_READ, POINT_READ, WRITE};
use pgsplit::protocol::decode_frame;
use pgsplit::router::{ClassifyCache, SessionFacts, classify, route};

/// Names and bodies of the measured operations; each closure does one operation per call.
type Scenario = (&'static str, fn(usize) -> usize);

const SCENARIOS: &[Scenario] = &[
    ("classify_cold_point_read", |_| {
        black_box(classify(black_box(POINT_READ))).statement_count
    }),
    ("classify_cold_join_read", |_| {
        black_box(classify(black_box(JOIN_READ))).statement_count
    }),
    ("classify_cold_write", |_| {
        black_box(classify(black_box(WRITE))).statement_count
    }),
    ("classify_cached_same_text", |_| {
        black_box(cache().get(black_box(JOIN_READ))).statement_count
    }),
    ("classify_cached_new_literal", |i| {
        let texts = literal_texts();
        black_box(cache().get(black_box(&texts[i % texts.len()]))).statement_count
    }),
    ("decode_64_data_rows", |_| decode_rows()),
    ("encode_64_data_rows", |_| encode_rows()),
    ("route_read_then_write", |_| route_pair()),
];

fn cache() -> &'static ClassifyCache {
    static CACHE: std::sync::OnceLock<ClassifyCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| ClassifyCache::new(16_384, Vec::new()))
}

/// Simple-protocol clients send a new literal each time; the shape cache serves them. The
/// texts exist before the first iteration so that both runs of a scenario build the same set.
fn literal_texts() -> &'static [String] {
    static TEXTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TEXTS.get_or_init(|| {
        (0..4096)
            .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"))
            .collect()
    })
}

fn data_rows() -> &'static [u8] {
    static WIRE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    WIRE.get_or_init(fixtures::data_rows_wire)
}

fn decode_rows() -> usize {
    let mut buf = BytesMut::from(black_box(data_rows()));
    let mut n = 0;
    while let Ok(Some(f)) = decode_frame(&mut buf, 1 << 20) {
        n += f.body.len();
    }
    black_box(n)
}

/// The frames of `data_rows` written back into one buffer as the relay writes what it
/// forwards. The frames are cut from the wire by hand, not with `decode_frame`: a second
/// call site in this binary changed how the compiler inlined the decoder, and with it the
/// decoding scenario's count (4,700 -> 6,393 instructions).
fn encode_rows() -> usize {
    static FRAMES: std::sync::OnceLock<Vec<pgsplit::protocol::Frame>> = std::sync::OnceLock::new();
    let frames = FRAMES.get_or_init(|| {
        let mut frames = Vec::new();
        let mut rest = data_rows();
        while let [tag, a, b, c, d, ..] = *rest {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            let body = bytes::Bytes::copy_from_slice(&rest[5..1 + len]);
            frames.push(pgsplit::protocol::Frame { tag, body });
            rest = &rest[1 + len..];
        }
        frames
    });
    let mut out = BytesMut::with_capacity(data_rows().len());
    for f in black_box(frames) {
        f.encode_into(&mut out);
    }
    black_box(out.len())
}

fn route_pair() -> usize {
    static PAIR: std::sync::OnceLock<(
        pgsplit::router::Classification,
        pgsplit::router::Classification,
    )> = std::sync::OnceLock::new();
    let (read, write) = PAIR.get_or_init(|| (classify(JOIN_READ), classify(WRITE)));
    let idle = SessionFacts::default();
    let a = route([black_box(read)], idle);
    let b = route([black_box(read), black_box(write)], idle);
    black_box((a, b));
    1
}

fn run(f: fn(usize) -> usize, iterations: usize) -> usize {
    (0..iterations).map(|i| f(black_box(i))).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [name, iterations] if !name.starts_with('-') => {
            let Some((_, f)) = SCENARIOS.iter().find(|(n, _)| n == name) else {
                eprintln!("unknown scenario {name:?}; known: {}", names());
                std::process::exit(2);
            };
            let Ok(iterations) = iterations.parse() else {
                eprintln!("iterations must be a number, not {iterations:?}");
                std::process::exit(2);
            };
            // Everything the scenario builds lazily exists before the counted iterations.
            f(0);
            black_box(run(*f, iterations));
        }
        [flag] if flag == "--list" => println!("{}", names()),
        _ => {
            for (_, f) in SCENARIOS {
                assert!(run(*f, 3) > 0);
            }
        }
    }
}

fn names() -> String {
    SCENARIOS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(" ")
}
