//! The album demo app (`app-example/`) end to end: the app runs in-process with one
//! DATABASE_URL pointing at an in-process pgsplit that uses the album cache rules shipped in
//! `proxy.toml`, and the test drives its HTTP API like a user. Which node ran what is read
//! from pg_stat_statements on each node (only these tests touch the album tables; they hold
//! [`album_lock`] so their statement counts never mix).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// Serializes the tests that use the album tables.
fn album_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// The `[[cache.rules]]` of the repository's proxy.toml that name the album tables.
fn shipped_album_rules() -> Vec<toml::Value> {
    let text = std::fs::read_to_string(repo_root().join("proxy.toml")).expect("read proxy.toml");
    let config: toml::Table = text.parse().expect("proxy.toml is TOML");
    let rules = config["cache"]["rules"].as_array().expect("cache.rules");
    rules
        .iter()
        .filter(|r| {
            let t = r.get("table").and_then(|v| v.as_str()).unwrap_or("");
            let q = r.get("query").and_then(|v| v.as_str()).unwrap_or("");
            ["albums", "songs"].contains(&t) || q.contains(" albums") || q.contains(" songs")
        })
        .cloned()
        .collect()
}

/// pgsplit with the shipped album rules, a Redis key prefix of its own, and a fast health
/// checker (read-your-writes waits for it to see the replicas' replay position).
async fn demo_proxy() -> Proxy {
    let c = cluster();
    let rules = shipped_album_rules();
    let names: Vec<String> = rules
        .iter()
        .filter_map(|r| r.get("table").and_then(|v| v.as_str()).map(str::to_owned))
        .collect();
    assert!(
        names.contains(&"albums".to_owned()) && names.contains(&"songs".to_owned()),
        "proxy.toml whitelists the albums and songs tables: {rules:?}"
    );
    let mut cache = toml::Table::new();
    cache.insert("enabled".into(), true.into());
    cache.insert(
        "redis_url".into(),
        format!("redis://127.0.0.1:{}", c.redis).into(),
    );
    cache.insert("key_prefix".into(), unique("demo").into());
    // Parallel tests load the machine; a timed-out lookup would bypass the cache.
    cache.insert("timeout_ms".into(), toml::Value::Integer(2000));
    cache.insert("rules".into(), toml::Value::Array(rules));
    let mut extra = toml::Table::new();
    extra.insert("cache".into(), cache.into());
    let config = format!(
        "{}\n[health]\ninterval_ms = 200\n\n{}",
        base_config_toml(c),
        toml::to_string(&extra).unwrap()
    );
    let proxy = start_proxy_with(&config).await;
    let cache = proxy.shared.cache.clone().expect("cache enabled");
    assert!(
        eventually(Duration::from_secs(10), || !cache.is_bypassed()).await,
        "the cache never connected to redis"
    );
    proxy
}

/// The demo app on a free loopback port; stops when dropped.
struct App {
    base: String,
    stop: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl App {
    /// Migrate (twice at once, as two instances starting together would) and serve.
    async fn start(proxy: &Proxy) -> App {
        let url = format!("postgres://app:app_pw@127.0.0.1:{}/appdb", proxy.port());
        let pool = app_example::pool(&url).unwrap();
        let other = app_example::pool(&url).unwrap();
        let (a, b) = tokio::join!(app_example::migrate(&pool), app_example::migrate(&other));
        a.unwrap();
        b.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            app_example::serve(listener, pool, async move { until.cancelled().await })
                .await
                .unwrap()
        });
        App { base, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"))
    };
    (status, body)
}

/// Statement executions on the album tables on one node, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Calls {
    reads: i64,
    writes: i64,
}

/// [`Calls`] of the primary, replica1 and replica2.
async fn album_calls() -> [Calls; 3] {
    // Statistics are recorded as a statement ends; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c = cluster();
    let mut out = [Calls::default(); 3];
    for (i, port) in [c.primary, c.replicas[0], c.replicas[1]]
        .into_iter()
        .enumerate()
    {
        // The patterns are parameters, so this query's own text never matches them.
        let row = direct(port)
            .await
            .query_one(
                "SELECT coalesce(sum(calls) FILTER (WHERE query ~* $2), 0)::int8,
                        coalesce(sum(calls) FILTER (WHERE query ~* $3), 0)::int8
                 FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                 WHERE d.datname = 'appdb' AND s.query ~ $1",
                &[
                    &r"\m(albums|songs)\M",
                    &r"^\s*select\M",
                    &r"^\s*(insert|update|delete)\M",
                ],
            )
            .await
            .unwrap();
        out[i] = Calls {
            reads: row.get(0),
            writes: row.get(1),
        };
    }
    out
}

fn delta(after: [Calls; 3], before: [Calls; 3]) -> [Calls; 3] {
    std::array::from_fn(|i| Calls {
        reads: after[i].reads - before[i].reads,
        writes: after[i].writes - before[i].writes,
    })
}

/// Albums and songs whose titles start with `marker`, counted on the primary directly.
async fn rows_marked(marker: &str) -> (i64, i64) {
    let p = direct(cluster().primary).await;
    let count = |sql: &'static str| {
        let p = &p;
        async move {
            p.query_one(sql, &[&format!("{marker}%")])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    (
        count("SELECT count(*) FROM albums WHERE title LIKE $1").await,
        count("SELECT count(*) FROM songs WHERE title LIKE $1").await,
    )
}

/// Everything after the writes has reached both replicas and the proxy's health checker
/// has seen it, so reads of sessions that wrote may go to replicas again; and both replicas
/// are in rotation (under load, a check can time out and take one out for a while).
async fn settle(proxy: &Proxy) {
    wait_replicated().await;
    wait_proxy_saw_replay(proxy, cluster()).await;
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .every_replica(|r| r.is_available()))
        .await,
        "the replicas never were all in rotation"
    );
}

#[tokio::test]
async fn the_album_api_reads_from_replicas_and_cache_and_writes_to_the_primary() {
    let _serial = album_lock().lock().await;
    let proxy = demo_proxy().await;
    let app = App::start(&proxy).await;
    let http = http();
    let marker = unique("demo_api");
    let start = album_calls().await;

    // Create three albums (each one transaction: the album and its songs).
    let mut ids = Vec::new();
    for n in 1..=3 {
        let body = json!({
            "title": format!("{marker} album {n}"),
            "songs": [{"title": format!("{marker} song {n}.1")}, {"title": format!("{marker} song {n}.2")}],
        });
        let (status, created) = send(http.post(app.url("/api/album")).json(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["id"].as_i64().expect("id"));
    }
    assert_eq!(rows_marked(&marker).await, (3, 6));
    settle(&proxy).await;

    // Reads: each album four times. The first read of each misses the cache and runs on a
    // replica; the others are answered from Redis.
    let cache = proxy.shared.cache.clone().unwrap();
    let hits_before = cache.snapshot().hits;
    let before_reads = album_calls().await;
    for _ in 0..4 {
        for (n, id) in ids.iter().enumerate() {
            let (status, album) = send(http.get(app.url(&format!("/api/album/{id}")))).await;
            assert_eq!(status, StatusCode::OK, "{album}");
            assert_eq!(album["id"], json!(id));
            assert_eq!(album["title"], json!(format!("{marker} album {}", n + 1)));
            let songs = album["songs"].as_array().unwrap();
            assert_eq!(songs.len(), 2);
            assert_eq!(songs[0]["position"], json!(1));
            assert_eq!(
                songs[1]["title"],
                json!(format!("{marker} song {}.2", n + 1))
            );
        }
    }
    let reads = delta(album_calls().await, before_reads);
    let hits = cache.snapshot().hits - hits_before;
    eprintln!("album reads per node (primary, replica1, replica2): {reads:?}; cache hits: {hits}");
    assert_eq!(
        reads[0],
        Calls::default(),
        "the primary ran no album read: {reads:?}"
    );
    let on_replicas = reads[1].reads + reads[2].reads;
    assert!(on_replicas >= 1, "the replicas ran the reads: {reads:?}");
    // 12 requests x 2 SELECTs: 6 first reads; most repeats are hits (an entry is stored off
    // the client's path, so a repeat right after a miss may miss too).
    assert!(
        on_replicas <= 12,
        "repeated reads came from the cache: {reads:?}"
    );
    assert!(hits >= 12, "cache hits: {hits}");
    assert_eq!(reads[1].writes + reads[2].writes, 0);

    // The paged listing.
    let (status, page) = send(http.get(app.url("/api/albums?page=1&per_page=2"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["per_page"], json!(2));
    assert!(page["total"].as_i64().unwrap() >= 3, "{page}");
    let listed = page["albums"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{page}");
    assert!(listed[0]["id"].as_i64() < listed[1]["id"].as_i64());
    // The albums just made are the newest, on the last pages (a cluster kept across runs
    // holds albums of earlier runs too).
    let total = page["total"].as_i64().unwrap();
    let last = (total + 99) / 100;
    let mut listed_ids = Vec::new();
    for p in (last - 1).max(1)..=last {
        let url = app.url(&format!("/api/albums?page={p}&per_page=100"));
        let (status, albums) = send(http.get(url)).await;
        assert_eq!(status, StatusCode::OK, "{albums}");
        listed_ids.extend(
            albums["albums"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].clone()),
        );
    }
    for id in &ids {
        assert!(listed_ids.contains(&json!(id)), "{id} in {listed_ids:?}");
    }

    // Update, then read at once: the new title, never the cached old one. Each round warms
    // the cache with the current version first.
    let id = ids[0];
    for round in 1..=4 {
        send(http.get(app.url(&format!("/api/album/{id}")))).await;
        send(http.get(app.url(&format!("/api/album/{id}")))).await;
        let title = format!("{marker} renamed {round}");
        let body = json!({ "title": title, "songs": [format!("{marker} only song {round}")] });
        let (status, updated) =
            send(http.put(app.url(&format!("/api/album/{id}"))).json(&body)).await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        assert_eq!(updated["title"], json!(title));
        let (status, album) = send(http.get(app.url(&format!("/api/album/{id}")))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            album["title"],
            json!(title),
            "read after update, round {round}"
        );
        let songs = album["songs"].as_array().unwrap();
        assert_eq!(songs.len(), 1, "{album}");
        assert_eq!(
            songs[0]["title"],
            json!(format!("{marker} only song {round}"))
        );
    }
    let (status, _) = send(
        http.put(app.url("/api/album/999999999"))
            .json(&json!({ "title": "nobody", "songs": [] })),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Delete; the album and its songs are gone, at once and for good.
    let gone = ids[1];
    let (status, _) = send(http.delete(app.url(&format!("/api/album/{gone}")))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, err) = send(http.get(app.url(&format!("/api/album/{gone}")))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], json!(format!("album {gone} not found")));
    let (status, _) = send(http.delete(app.url(&format!("/api/album/{gone}")))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(http.get(app.url("/api/album/999999999"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let p = direct(cluster().primary).await;
    let left: i64 = p
        .query_one("SELECT count(*) FROM songs WHERE album_id = $1", &[&gone])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Bad input: 400 (or 415) with a JSON error, and nothing written anywhere.
    settle(&proxy).await;
    let before_bad = album_calls().await;
    let long = "x".repeat(201);
    let bad_bodies = [
        json!({ "title": "", "songs": [] }),
        json!({ "title": "   ", "songs": [] }),
        json!({ "songs": [{"title": format!("{marker} orphan")}] }),
        json!({ "title": format!("{marker} {long}"), "songs": [] }),
        json!({ "title": format!("{marker} blank song"), "songs": [{"title": "a"}, {"title": " "}] }),
        json!({ "title": format!("{marker} too many"), "songs": vec![json!("s"); 101] }),
        json!({ "title": format!("{marker} bad field"), "songs": [], "year": 1959 }),
        json!({ "title": 42 }),
        json!([format!("{marker} not an object")]),
    ];
    for body in &bad_bodies {
        for req in [
            http.post(app.url("/api/album")),
            http.put(app.url(&format!("/api/album/{id}"))),
        ] {
            let (status, err) = send(req.json(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {err}");
            assert!(
                err["error"].as_str().is_some_and(|m| !m.is_empty()),
                "{err}"
            );
        }
    }
    let (status, err) = send(
        http.post(app.url("/api/album"))
            .header("content-type", "application/json")
            .body(format!("{{\"title\": \"{marker} broken\"")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, err) = send(
        http.post(app.url("/api/album"))
            .header("content-type", "text/plain")
            .body(format!("{{\"title\": \"{marker} text\"}}")),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{err}");
    for path in [
        "/api/album/abc",
        "/api/album/0",
        "/api/album/-4",
        "/api/albums?page=0",
        "/api/albums?per_page=0",
        "/api/albums?per_page=101",
        "/api/albums?page=x",
    ] {
        let (status, err) = send(http.get(app.url(path))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {err}");
        assert!(err["error"].is_string(), "{path}: {err}");
    }
    let (status, _) = send(http.delete(app.url("/api/album/abc"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let bad = delta(album_calls().await, before_bad);
    assert!(
        bad.iter().all(|c| c.writes == 0),
        "no writes for bad input: {bad:?}"
    );
    assert_eq!(
        rows_marked(&marker).await,
        (2, 3),
        "only the good albums exist"
    );
    let (status, album) = send(http.get(app.url(&format!("/api/album/{id}")))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(album["title"], json!(format!("{marker} renamed 4")));

    // Over the whole test, writes ran on the primary only.
    let total = delta(album_calls().await, start);
    assert!(total[0].writes >= 3 + 3 + 4 * 3 + 2, "{total:?}");
    assert_eq!(total[1].writes + total[2].writes, 0, "{total:?}");
}

#[tokio::test]
async fn the_page_lists_albums_and_its_form_adds_one() {
    let _serial = album_lock().lock().await;
    let proxy = demo_proxy().await;
    let app = App::start(&proxy).await;
    let http = http();
    let marker = unique("demo_page");

    let page = http.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("<form method=\"post\" action=\"/\">")
    );

    let title = format!("{marker} <Blue> & \"Green\"");
    let resp = http
        .post(app.url("/"))
        .form(&[
            ("title", title.as_str()),
            ("songs", "First song\r\n\r\n  Second song  \r\n"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/");
    let html = http
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let escaped = format!("{marker} &lt;Blue&gt; &amp; &quot;Green&quot;");
    assert!(html.contains(&escaped), "the new album is listed: {html}");
    assert!(
        html.contains("<li>First song</li><li>Second song</li>"),
        "{html}"
    );

    // A bad form: 400, the page again with the error and what was typed; nothing written.
    let resp = http
        .post(app.url("/"))
        .form(&[("title", "  "), ("songs", &format!("{marker} kept"))])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let html = resp.text().await.unwrap();
    assert!(html.contains("title must not be empty"), "{html}");
    assert!(
        html.contains(&format!("{marker} kept</textarea>")),
        "{html}"
    );
    assert_eq!(rows_marked(&marker).await, (1, 0));
}
