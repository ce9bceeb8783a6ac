//! docker-compose.yaml, checked without a Docker engine: the services and their published
//! ports, the files it mounts or builds from, start order against health checks, the pgsplit
//! config it mounts (parsed by pgsplit itself) against the services, the roles the init
//! scripts create against the credentials the services use, the files the image build
//! copies against what cargo reads, and the shell scripts' syntax (plus shellcheck where
//! installed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use pgsplit::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

use crate::common::repo_root;

/// Service → (published host port, port inside the container).
const PORTS: [(&str, u16, u16); 6] = [
    ("primary", 5432, 5432),
    ("replica1", 5433, 5432),
    ("replica2", 5434, 5432),
    ("redis", 6379, 6379),
    ("pgsplit", 6432, 6432),
    ("app", 8080, 8080),
];

fn compose() -> Yaml {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yaml"))
        .expect("read docker-compose.yaml");
    let mut docs = YamlLoader::load_from_str(&text).expect("docker-compose.yaml is YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn services(doc: &Yaml) -> BTreeMap<String, Yaml> {
    doc["services"]
        .as_hash()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_owned(), v.clone()))
        .collect()
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `environment:` as a map (compose allows a map or a list of KEY=VALUE).
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    let env = &service["environment"];
    if let Some(h) = env.as_hash() {
        return h
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::Integer(i) => i.to_string(),
                    v => v.as_str().expect("environment value").to_owned(),
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect();
    }
    strings(env)
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Bind mounts: (host path, container path).
fn binds(service: &Yaml) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .iter()
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            (
                parts.next().unwrap().to_owned(),
                parts.next().expect("container path").to_owned(),
            )
        })
        .collect()
}

/// `ports:` as (host port, container port); a host IP, when given, must be loopback.
fn published(service: &Yaml) -> Vec<(u16, u16)> {
    strings(&service["ports"])
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let (host, container) = match parts.as_slice() {
                [ip, h, c] => {
                    assert_eq!(*ip, "127.0.0.1", "{p}: published on loopback only");
                    (h, c)
                }
                [h, c] => (h, c),
                _ => panic!("unexpected port mapping {p}"),
            };
            (host.parse().unwrap(), container.parse().unwrap())
        })
        .collect()
}

fn depends_on(service: &Yaml) -> BTreeMap<String, String> {
    service["depends_on"]
        .as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let cond = v["condition"].as_str().unwrap_or("service_started");
                    (k.as_str().unwrap().to_owned(), cond.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_services_ports_files_and_start_order_agree() {
    let doc = compose();
    let services = services(&doc);
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = PORTS.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(names, expected);

    for (name, host, container) in PORTS {
        assert_eq!(
            published(&services[name]),
            [(host, container)],
            "{name} publishes {host}->{container}"
        );
    }

    let root = repo_root();
    let dockerfile_targets = |dockerfile: &Path| -> BTreeSet<String> {
        std::fs::read_to_string(dockerfile)
            .unwrap_or_else(|e| panic!("{}: {e}", dockerfile.display()))
            .lines()
            .filter(|l| l.to_ascii_uppercase().starts_with("FROM "))
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let as_at = words.iter().position(|w| w.eq_ignore_ascii_case("as"))?;
                words.get(as_at + 1).map(|t| t.to_string())
            })
            .collect()
    };
    for (name, svc) in &services {
        // Either an image or a build whose context, Dockerfile and target exist.
        let build = &svc["build"];
        if build.is_badvalue() {
            assert!(svc["image"].as_str().is_some(), "{name}: image or build");
        } else {
            let context = root.join(build["context"].as_str().unwrap_or("."));
            assert!(context.is_dir(), "{name}: build context");
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {}", dockerfile.display());
            if let Some(target) = build["target"].as_str() {
                assert!(
                    dockerfile_targets(&dockerfile).contains(target),
                    "{name}: the Dockerfile has a stage {target}"
                );
            }
        }
        for (host, _) in binds(svc) {
            assert!(
                root.join(&host).exists(),
                "{name} mounts {host}, which exists"
            );
        }
        // Each service says when it is ready, and starts after what it needs is ready.
        let test = strings(&svc["healthcheck"]["test"]);
        assert!(
            test.first().is_some_and(|t| t == "CMD" || t == "CMD-SHELL"),
            "{name}: healthcheck {test:?}"
        );
        for (dep, cond) in depends_on(svc) {
            assert!(services.contains_key(&dep), "{name} depends on {dep}");
            assert_eq!(
                cond, "service_healthy",
                "{name} waits for {dep} to be healthy"
            );
        }
    }
    let needs = |s: &str| -> BTreeSet<String> { depends_on(&services[s]).into_keys().collect() };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };
    assert_eq!(needs("primary"), set(&[]));
    assert_eq!(needs("replica1"), set(&["primary"]));
    assert_eq!(needs("replica2"), set(&["primary"]));
    assert_eq!(
        needs("pgsplit"),
        set(&["primary", "redis", "replica1", "replica2"])
    );
    assert_eq!(needs("app"), set(&["pgsplit"]));

    // The init scripts are mounted into the primary's first-start hook, and replica.sh is the
    // replicas' entry point.
    assert!(
        binds(&services["primary"]).contains(&(
            "./init".to_owned(),
            "/docker-entrypoint-initdb.d".to_owned()
        )),
        "primary mounts ./init"
    );
    for r in ["replica1", "replica2"] {
        let svc = &services[r];
        let mount = binds(svc)
            .into_iter()
            .find(|(h, _)| h == "./replica.sh")
            .expect("replica.sh mounted");
        assert!(
            strings(&svc["entrypoint"]).contains(&mount.1),
            "{r} runs {}",
            mount.1
        );
        assert_eq!(environment(svc)["REPLICA_NAME"], r);
    }
}

#[test]
fn the_mounted_proxy_config_and_the_roles_match_the_services() {
    let doc = compose();
    let services = services(&doc);
    let pgsplit = &services["pgsplit"];
    let (host_path, mount) = binds(pgsplit)
        .into_iter()
        .find(|(_, c)| c.ends_with(".toml"))
        .expect("pgsplit mounts a .toml config");
    assert!(
        read("Dockerfile").contains(&mount),
        "the pgsplit image reads its config from {mount}"
    );
    let config = Config::from_toml(&read(&host_path)).expect("the mounted config is valid");

    assert_eq!(config.primary.host, "primary");
    assert_eq!(config.primary.port, 5432);
    let replicas: BTreeSet<(String, u16)> = config
        .replicas
        .iter()
        .map(|r| (r.host.clone(), r.port))
        .collect();
    assert_eq!(
        replicas,
        [("replica1".to_owned(), 5432), ("replica2".to_owned(), 5432)].into()
    );
    assert!(config.cache.enabled);
    assert_eq!(config.cache.redis_url, "redis://redis:6379");
    // Versions must never come back from an old snapshot with the entries they guard.
    let redis = strings(&services["redis"]["command"]);
    assert!(
        redis.windows(2).any(|w| w == ["--save", ""])
            && redis.windows(2).any(|w| w == ["--appendonly", "no"]),
        "the cache's Redis runs without persistence: {redis:?}"
    );
    let tables: BTreeSet<&str> = config
        .cache
        .rules
        .iter()
        .filter_map(|r| r.table.as_deref())
        .collect();
    assert!(
        tables.contains("albums") && tables.contains("songs"),
        "{tables:?}"
    );
    assert!(
        config.proxy.listen.ip().is_unspecified(),
        "reachable from other containers"
    );
    assert_eq!(published(pgsplit)[0].1, config.proxy.listen.port());

    // The app reaches pgsplit by its service name, as one of pgsplit's users, in the database
    // the primary creates; it listens where its port is published.
    let app_env = environment(&services["app"]);
    let url = &app_env["DATABASE_URL"];
    let rest = url.strip_prefix("postgres://").expect("a postgres:// URL");
    let (creds, rest) = rest.split_once('@').unwrap();
    let (user, password) = creds.split_once(':').unwrap();
    let (hostport, db) = rest.split_once('/').unwrap();
    assert_eq!(hostport, format!("pgsplit:{}", config.proxy.listen.port()));
    assert!(
        config
            .users
            .iter()
            .any(|u| u.name == user && u.password.as_deref() == Some(password)),
        "{user} is a pgsplit user with that password"
    );
    let primary_env = environment(&services["primary"]);
    assert_eq!(db, primary_env["POSTGRES_DB"]);
    let listen_port = app_env["LISTEN_ADDR"].rsplit(':').next().unwrap();
    assert_eq!(listen_port, published(&services["app"])[0].1.to_string());

    // Every pgsplit user exists on the servers with the same password: the superuser from
    // the image's environment, the others from init/.
    let init_sql: String = std::fs::read_dir(repo_root().join("init"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for u in &config.users {
        let password = u.password.as_deref().unwrap_or_default();
        if u.name == primary_env["POSTGRES_USER"] {
            assert_eq!(password, primary_env["POSTGRES_PASSWORD"]);
        } else {
            assert!(
                init_sql.contains(&format!("CREATE ROLE {} ", u.name))
                    && init_sql.contains(&format!("PASSWORD '{password}'")),
                "init/ creates role {} with its password",
                u.name
            );
        }
    }
    // The replicas stream as a replication role that init/ creates and pg_hba admits, each
    // over a slot init/ creates.
    let hba: String = read("init/02-pg-hba.sh");
    for r in ["replica1", "replica2"] {
        let env = environment(&services[r]);
        let user = &env["REPLICATION_USER"];
        assert!(
            init_sql.contains(&format!(
                "CREATE ROLE {user} WITH REPLICATION LOGIN PASSWORD '{}'",
                env["REPLICATION_PASSWORD"]
            )),
            "{r}: replication role"
        );
        assert!(
            hba.lines().any(
                |l| l.split_whitespace().collect::<Vec<_>>()[..].starts_with(&[
                    "host",
                    "replication",
                    user
                ])
            ),
            "{r}: pg_hba admits {user} for replication"
        );
        assert!(init_sql.contains(&format!("pg_create_physical_replication_slot('{r}_slot')")));
        assert_eq!(env["PRIMARY_HOST"], "primary");
    }
}

/// `shell -n file` passes.
/// Cargo reads every target the manifests declare (and every workspace member) before it
/// builds anything: the image's build stage must copy them all, and .dockerignore must not
/// drop them.
#[test]
fn the_docker_build_copies_every_file_cargo_reads() {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml is TOML");
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("members");
    needed.extend(
        members
            .iter()
            .filter_map(|m| m.as_str())
            .filter(|m| *m != ".")
            .map(String::from),
    );
    for (kind, dir) in [("bin", "src/bin"), ("bench", "benches"), ("test", "tests")] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let path = match (target.get("path"), target.get("name")) {
                (Some(p), _) => p.as_str().expect("path").to_string(),
                (None, Some(n)) => format!("{dir}/{}.rs", n.as_str().expect("name")),
                (None, None) => panic!("a [[{kind}]] without name or path"),
            };
            needed.push(path);
        }
    }
    let copied: Vec<String> = read("Dockerfile")
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().skip(1).collect();
            let sources = &words[..words.len().saturating_sub(1)];
            sources
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let under = |path: &str, dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
    for path in &needed {
        assert!(repo_root().join(path).exists(), "{path} exists");
        assert!(
            copied.iter().any(|c| under(path, c)),
            "the Dockerfile copies {path} (COPY sources: {copied:?})"
        );
        assert!(
            !ignored.iter().any(|i| under(path, i)),
            ".dockerignore keeps {path}"
        );
    }
}

fn syntax_ok(shell: &str, rel: &str) {
    let out = Command::new(shell)
        .arg("-n")
        .arg(repo_root().join(rel))
        .output()
        .unwrap_or_else(|e| panic!("run {shell}: {e}"));
    assert!(
        out.status.success(),
        "{shell} -n {rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn replica_and_init_scripts_pass_syntax_checks_and_shellcheck() {
    let mut scripts = vec!["replica.sh".to_owned()];
    syntax_ok("bash", "replica.sh");
    for entry in std::fs::read_dir(repo_root().join("init")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match path.extension().and_then(|x| x.to_str()) {
            // The image sources or runs them with bash; they are plain sh as well.
            Some("sh") => {
                let rel = format!("init/{name}");
                syntax_ok("sh", &rel);
                syntax_ok("bash", &rel);
                scripts.push(rel);
            }
            Some("sql") => {}
            _ => panic!("init/{name}: the postgres image runs only *.sh and *.sql here"),
        }
    }
    assert!(scripts.len() >= 2, "init/ has a shell script");
    match Command::new("shellcheck").arg("--version").output() {
        Ok(v) if v.status.success() => {
            let out = Command::new("shellcheck")
                .args(&scripts)
                .current_dir(repo_root())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "shellcheck {scripts:?}:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        _ => eprintln!("note: shellcheck is not installed; skipped shellcheck of {scripts:?}"),
    }
}
