//! Micro-benchmarks of the per-request work that is pure CPU: classifying SQL (cold and
//! through the classification cache, including the literal-masking shape cache), framing,
//! and the routing decision. `cargo bench --bench hot_path`.

use std::hint::black_box;

mod fixtures;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use fixtures::{JOIN_READ, POINT_READ, WRITE};
use pgsplit::protocol::decode_frame;
use pgsplit::router::{ClassifyCache, SessionFacts, classify, route};

fn classifier(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for (name, sql) in [
        ("point_read", POINT_READ),
        ("join_read", JOIN_READ),
        ("write", WRITE),
    ] {
        g.bench_function(format!("cold/{name}"), |b| {
            b.iter(|| classify(black_box(sql)))
        });
    }
    let cache = ClassifyCache::new(16_384, Vec::new());
    g.bench_function("cached/same_text", |b| {
        b.iter(|| cache.get(black_box(JOIN_READ)))
    });
    // Simple-protocol clients send a new literal each time: served by the shape cache.
    let texts: Vec<String> = (0..1024)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"))
        .collect();
    let mut i = 0;
    g.bench_function("cached/new_literal", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            cache.get(black_box(&texts[i]))
        })
    });
    g.finish();
}

fn framing(c: &mut Criterion) {
    let wire = fixtures::data_rows_wire();
    c.bench_function("frames/decode_64_data_rows", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Ok(Some(f)) = decode_frame(&mut buf, 1 << 20) {
                n += f.body.len();
            }
            black_box(n)
        })
    });
    let mut buf = BytesMut::from(&wire[..]);
    let frames: Vec<_> =
        std::iter::from_fn(|| decode_frame(&mut buf, 1 << 20).ok().flatten()).collect();
    c.bench_function("frames/encode_64_data_rows", |b| {
        b.iter(|| {
            let mut out = BytesMut::with_capacity(wire.len());
            for f in black_box(&frames) {
                f.encode_into(&mut out);
            }
            black_box(out.len())
        })
    });
}

fn routing(c: &mut Criterion) {
    let read = classify(JOIN_READ);
    let write = classify(WRITE);
    let idle = SessionFacts::default();
    c.bench_function("route/read_then_write", |b| {
        b.iter(|| {
            (
                route([black_box(&read)], idle),
                route([black_box(&read), black_box(&write)], idle),
            )
        })
    });
}

criterion_group!(benches, classifier, framing, routing);
criterion_main!(benches);
