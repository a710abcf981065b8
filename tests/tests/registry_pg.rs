//! The registry in PostgreSQL with the real binaries: cluster-mode relays on one
//! database see each other's routers (created on one, enrolled through another,
//! linked to a third's... here two), a revocation on one node closes the link on
//! the other through the registry poll alone, PostgreSQL down answers a 503
//! envelope in time and recovers, and `migrate-registry` carries a single node's
//! registry into PostgreSQL so its agents link to a cluster node unchanged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netpilot_tests::engines::{Postgres, Redis};
use netpilot_tests::{binary, eventually, start_session, Agent, Relay, RelayOptions};
use serde_json::json;

/// How often each node polls the registry in these tests.
const POLL: Duration = Duration::from_millis(300);

/// The shared certificate every node presents: a single relay's generated one.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
}

impl Identity {
    fn of(relay: &Relay) -> Identity {
        Identity {
            cert: relay.data_dir.join("tls/relay-cert.pem"),
            key: relay.data_dir.join("tls/relay-key.pem"),
        }
    }
}

/// A cluster node's config: the shared certificate, the database and Redis.
fn node_config(node: &str, id: &Identity, pg_url: &str, redis_url: &str, poll: Duration) -> String {
    format!(
        "[timeouts]\nping_interval = \"200ms\"\ndead_after = \"800ms\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [cluster]\nnode_id = {node:?}\npostgres_url = {pg_url:?}\nredis_url = {redis_url:?}\n\
         internal_listen = \"127.0.0.1:0\"\nsecret = \"{secret}\"\n\
         registry_poll = \"{poll}ms\"\npostgres_timeout = \"1s\"\n",
        cert = id.cert.display().to_string(),
        key = id.key.display().to_string(),
        secret = "s".repeat(40),
        poll = poll.as_millis(),
    )
}

async fn node(node: &str, id: &Identity, pg_url: &str, redis: &Redis) -> Relay {
    node_polling(node, id, pg_url, redis, POLL).await
}

async fn node_polling(
    node: &str,
    id: &Identity,
    pg_url: &str,
    redis: &Redis,
    poll: Duration,
) -> Relay {
    Relay::start(RelayOptions {
        config: node_config(node, id, pg_url, &redis.url(), poll),
    })
    .await
    .unwrap()
}

/// A single relay, started only for its generated certificate.
async fn identity_relay() -> (Relay, Identity) {
    let mut r = Relay::start(RelayOptions::default()).await.unwrap();
    r.terminate().await.unwrap();
    let id = Identity::of(&r);
    (r, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_created_on_one_node_enrolls_through_another_and_revocation_closes_its_link_by_the_poll(
) {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("cluster").await.unwrap();
    let redis = Redis::start().await.unwrap();
    // B on a Redis of its own: none of its change broadcasts reach A, so what A
    // learns of B's changes comes from PostgreSQL alone (the poll, the lookups):
    // the safety net under a lost broadcast.
    let redis_b = Redis::start().await.unwrap();
    let (_cert_holder, id) = identity_relay().await;
    let a = node("a", &id, &url, &redis).await;
    let b = node("b", &id, &url, &redis_b).await;
    assert_eq!(a.fingerprint, b.fingerprint);

    // Created on A; enrolled through B, which has never heard of it.
    let (router_id, token) = a.create_router("alice", "home").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let router = netpilot_tests::EnrolledRouter::at(&router_id, &dir.path().join("state"));
    let out = netpilot_tests::enroll(&b.url(), &token, &b.fingerprint, &router.state_dir)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", b.log());

    // Linked to A, whose cache learnt the secret from the registry (at the
    // link's lookup or its poll, whichever came first).
    let _agent = Agent::start(&router, &["--simulate", "--relay", &a.url()])
        .await
        .unwrap();
    a.wait_online(&router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    let c = a.client().await.unwrap();
    // Last-seen and the agent's version reach PostgreSQL (written beside the link).
    let seen = eventually(Duration::from_secs(5), "last-seen recorded", || {
        let (c, path) = (&c, format!("/api/admin/routers/{router_id}"));
        async move {
            let v = c.get(&path).await.ok()?.body["data"].clone();
            (v["last_seen"].is_string() && v["agent_version"].is_string()).then_some(v)
        }
    })
    .await
    .unwrap();
    assert_eq!(seen["online"], true, "{seen}");
    let sid = start_session(&c, "alice", &router_id).await.unwrap();
    let r = c
        .get(&netpilot_tests::q("/api/agent/health", &sid, &router_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // Revoked on B, which holds no link for it (and whose broadcast A never
    // hears): A learns of it at its poll and closes the link then.
    let rb = b
        .client()
        .await
        .unwrap()
        .delete(&format!("/api/admin/routers/{router_id}"))
        .await
        .unwrap();
    assert_eq!(rb.status, 200, "{}", rb.body);
    assert_eq!(rb.body["data"]["link_closed"], false, "B held no link");
    let revoked = Instant::now();
    a.wait_online(&router_id, false, POLL + Duration::from_secs(5))
        .await
        .unwrap();
    let took = revoked.elapsed();
    println!("revocation on B closed the link on A after {took:?} (poll {POLL:?})");
    assert!(
        a.log().contains("the router was revoked on another node"),
        "{}",
        a.log()
    );
    // And it stays out: the agent's redial is refused as revoked.
    let r = c
        .get(&netpilot_tests::q("/api/agent/health", &sid, &router_id))
        .await
        .unwrap();
    assert_ne!(r.status, 200, "{}", r.body);
    let view = c
        .get(&format!("/api/admin/routers/{router_id}"))
        .await
        .unwrap();
    assert_eq!(view.body["data"]["online"], false, "{}", view.body);
}

/// A node that has not polled since (its poll is an hour here) still links a
/// router created on another node (not in its cache: looked up) and one it created
/// itself but that enrolled through another node (cached without a secret: the
/// refused secret is checked again against the registry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_links_routers_it_has_not_polled_for_from_the_registry() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("lag").await.unwrap();
    let redis = Redis::start().await.unwrap();
    let (_cert_holder, id) = identity_relay().await;
    let hour = Duration::from_secs(3600);
    let a = node_polling("a", &id, &url, &redis, hour).await;
    let b = node_polling("b", &id, &url, &redis, hour).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (i, creator) in [&a, &b].into_iter().enumerate() {
        let (router_id, token) = creator.create_router("alice", "r").await.unwrap();
        let router =
            netpilot_tests::EnrolledRouter::at(&router_id, &dir.path().join(format!("state{i}")));
        let out = netpilot_tests::enroll(&b.url(), &token, &b.fingerprint, &router.state_dir)
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        agents.push(
            Agent::start(&router, &["--simulate", "--relay", &a.url()])
                .await
                .unwrap(),
        );
        ids.push(router_id);
    }
    for router_id in &ids {
        a.wait_online(router_id, true, Duration::from_secs(10))
            .await
            .unwrap();
    }
    assert!(
        !a.log().contains("agent link refused"),
        "no link was refused on the way: {}",
        a.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_answers_registry_unavailable_in_time_and_recovers() {
    let mut pg = Postgres::start().await.unwrap();
    let url = pg.create_database("down").await.unwrap();
    let redis = Redis::start().await.unwrap();
    let (_cert_holder, id) = identity_relay().await;
    let a = node("a", &id, &url, &redis).await;
    let c = a.client().await.unwrap();
    let (router_id, _) = a.create_router("alice", "home").await.unwrap();
    // The test server runs without fsync: what was committed must survive the kill.
    pg.psql("down", "CHECKPOINT").await.unwrap();

    pg.kill().await;
    // Killing the postmaster leaves its backends to notice on their own: the
    // relay's pooled connection may answer a moment longer.
    let path = format!("/api/admin/routers/{router_id}");
    eventually(
        Duration::from_secs(10),
        "the relay to lose PostgreSQL",
        || {
            let (c, path) = (&c, &path);
            async move {
                let r = c.get(path).await.ok()?;
                (r.code() == "REGISTRY_UNAVAILABLE").then_some(())
            }
        },
    )
    .await
    .unwrap();
    let create = json!({"ownerUserId": "alice", "name": "second"});
    let t = Instant::now();
    let r = c.post("/api/admin/routers", create.clone()).await.unwrap();
    let took = t.elapsed();
    println!(
        "create with PostgreSQL down answered {} in {took:?}",
        r.status
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["success"], false);
    assert_eq!(r.code(), "REGISTRY_UNAVAILABLE", "{}", r.body);
    // postgres_timeout is 1 s; generous for a loaded machine, far from a hang.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let m = c.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw);
    let unavailable = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("netpilot_registry_operations_total{outcome=\"unavailable\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(unavailable >= Some(2), "{text}");
    // What the cache answers alone still works: the health endpoint.
    let health = c.get("/health").await.unwrap();
    assert_eq!(health.status, 200, "{}", health.body);

    pg.resume().await.unwrap();
    let again = eventually(Duration::from_secs(10), "the registry back", || {
        let (c, create) = (&c, create.clone());
        async move {
            let r = c.post("/api/admin/routers", create).await.ok()?;
            (r.status == 201).then_some(r)
        }
    })
    .await
    .unwrap();
    assert_eq!(again.body["data"]["name"], "second", "{}", again.body);
}

fn migrate(data_dir: &Path, pg_url: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, format!("api_key = \"{}\"\n", "k".repeat(32))).unwrap();
    std::process::Command::new(binary("netpilot-relay"))
        .arg("migrate-registry")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("NETPILOT_POSTGRES_URL", pg_url)
        .env_remove("NETPILOT_API_KEY")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_registry_moves_a_single_node_into_postgres_and_its_agents_link_to_a_cluster_node()
{
    let mut single = Relay::start(RelayOptions::default()).await.unwrap();
    let enrolled = single.enrolled_router("alice").await.unwrap();
    let (pending_id, pending_token) = single.create_router("bob", "later").await.unwrap();
    let revoked = single.enrolled_router("carol").await.unwrap();
    let r = single
        .client()
        .await
        .unwrap()
        .delete(&format!("/api/admin/routers/{}", revoked.router_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    single.terminate().await.unwrap();

    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("grown").await.unwrap();
    let out = migrate(&single.data_dir, &url);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // Three routers; two tokens: the pending router's and the enrolled one's, used
    // and copied as used (the revoked router's went with the revocation).
    assert!(
        said.contains(
            "copied 3 routers (0 already there) and 2 unexpired tokens (0 already there)"
        ),
        "{said}"
    );
    let again = migrate(&single.data_dir, &url);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{again:?}");
    assert!(
        said.contains(
            "copied 0 routers (3 already there) and 0 unexpired tokens (2 already there)"
        ),
        "{said}"
    );

    let redis = Redis::start().await.unwrap();
    let id = Identity::of(&single);
    let cluster = node("a", &id, &url, &redis).await;
    assert_eq!(
        cluster.fingerprint, single.fingerprint,
        "the same certificate"
    );
    let _agent = Agent::start(&enrolled, &["--simulate", "--relay", &cluster.url()])
        .await
        .unwrap();
    cluster
        .wait_online(&enrolled.router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    let c = cluster.client().await.unwrap();
    let sid = start_session(&c, "alice", &enrolled.router_id)
        .await
        .unwrap();
    let r = c
        .get(&netpilot_tests::q(
            "/api/agent/health",
            &sid,
            &enrolled.router_id,
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The pending token still enrolls, once; the revoked router stays revoked.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = netpilot_tests::enroll(&cluster.url(), &pending_token, &cluster.fingerprint, &state)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let view = c
        .get(&format!("/api/admin/routers/{pending_id}"))
        .await
        .unwrap();
    assert_eq!(view.body["data"]["enrolled"], true, "{}", view.body);
    let view = c
        .get(&format!("/api/admin/routers/{}", revoked.router_id))
        .await
        .unwrap();
    assert_eq!(view.body["data"]["revoked"], true, "{}", view.body);

    // A router already in PostgreSQL with other values is not overwritten.
    pg.psql(
        "grown",
        &format!(
            "UPDATE routers SET name = 'renamed' WHERE id = '{}'",
            enrolled.router_id
        ),
    )
    .await
    .unwrap();
    let refused = migrate(&single.data_dir, &url);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(err.contains("different values"), "{err}");
}

#[tokio::test]
async fn migrate_registry_without_a_database_url_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, format!("api_key = \"{}\"\n", "k".repeat(32))).unwrap();
    let out = std::process::Command::new(binary("netpilot-relay"))
        .arg("migrate-registry")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("NETPILOT_POSTGRES_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NETPILOT_POSTGRES_URL"), "{err}");
}

fn registry_operations(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("netpilot_registry_operations_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Agent requests with made-up router ids or wrong secrets may make a node look in
/// PostgreSQL, but only so many a second: a flood of them answers 401 from the
/// cache and never turns into a flood of queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_routers_costs_postgres_a_bounded_number_of_lookups() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("flood").await.unwrap();
    let redis = Redis::start().await.unwrap();
    let (_cert_holder, id) = identity_relay().await;
    let a = node("a", &id, &url, &redis).await;
    let c = a.client().await.unwrap();
    let before = registry_operations(&String::from_utf8_lossy(
        &c.get("/metrics").await.unwrap().raw,
    ));
    let agent = c.with_key(None);
    let started = Instant::now();
    let calls: Vec<_> = (0..600)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let id = uuid::Uuid::new_v4().to_string();
                agent
                    .call_with(
                        "GET",
                        "/agent/v1/speedtest/ping",
                        None,
                        None,
                        &[
                            ("x-netpilot-router-id", id.as_str()),
                            ("authorization", "Bearer not-a-secret"),
                        ],
                    )
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 401);
    }
    let secs = started.elapsed().as_secs_f64();
    let after = registry_operations(&String::from_utf8_lossy(
        &c.get("/metrics").await.unwrap().raw,
    ));
    let lookups = after - before;
    println!("600 made-up routers in {secs:.2} s cost {lookups} registry lookups");
    // 100 a second, counted in whole windows of 1 s.
    let allowed = 100 * (secs.ceil() as u64 + 1);
    assert!(lookups <= allowed, "{lookups} lookups in {secs:.2} s");
    assert!(lookups >= 1, "the first made-up ids were looked up");
}

/// A Unix-socket proxy in front of a test PostgreSQL that can go silent: once
/// frozen it passes nothing more, in either direction, and keeps every socket
/// open — a partition or a hung server, not a refusal.
struct SilentProxy {
    dir: tempfile::TempDir,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentProxy {
    async fn start(pg: &Postgres) -> SilentProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The server's socket directory, from its URL's host.
        let url = pg.url();
        let host = url
            .strip_prefix("postgresql://postgres@")
            .and_then(|r| r.split_once('/'))
            .unwrap()
            .0;
        let server_dir: String = form_urlencoded::parse(format!("h={host}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        let server = Path::new(&server_dir).join(".s.PGSQL.5432");
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::UnixStream::connect(&server).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                for (mut from, mut to) in [(cr, uw), (ur, cw)].map(|(r, w)| {
                    (
                        Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    )
                }) {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if flag.load(Ordering::SeqCst) {
                                // Silent, sockets held open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        SilentProxy { dir, frozen, task }
    }

    fn url_for(&self, db: &str) -> String {
        let host: String =
            form_urlencoded::byte_serialize(self.dir.path().as_os_str().as_encoded_bytes())
                .collect();
        format!("postgresql://postgres@{host}/{db}")
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// PostgreSQL that stops answering without closing anything: calls that need it
/// answer 503 REGISTRY_UNAVAILABLE within `cluster.postgres_timeout`, not after a
/// TCP timeout or never; what the cache answers goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_postgres_answers_registry_unavailable_within_the_timeout() {
    let pg = Postgres::start().await.unwrap();
    pg.create_database("silent").await.unwrap();
    let proxy = SilentProxy::start(&pg).await;
    let redis = Redis::start().await.unwrap();
    let (_cert_holder, id) = identity_relay().await;
    let a = node("a", &id, &proxy.url_for("silent"), &redis).await;
    let c = a.client().await.unwrap();
    let (router_id, _) = a.create_router("alice", "home").await.unwrap();

    proxy.freeze();
    let t = Instant::now();
    // Bounded here too, so a hang fails the test instead of stalling it.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.post(
            "/api/admin/routers",
            json!({"ownerUserId": "alice", "name": "second"}),
        ),
    )
    .await
    .expect("the relay answers, not hangs")
    .unwrap();
    let took = t.elapsed();
    println!(
        "create with PostgreSQL silent answered {} in {took:?}",
        r.status
    );
    assert_eq!(r.code(), "REGISTRY_UNAVAILABLE", "{}", r.body);
    // postgres_timeout is 1 s here: not before it, and well before a hang.
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let t = Instant::now();
    let r = c
        .get(&format!("/api/admin/routers/{router_id}"))
        .await
        .unwrap();
    assert_eq!(r.code(), "REGISTRY_UNAVAILABLE", "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(4));
    let health = c.get("/health").await.unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
}
