//! The relay's registry, both backends through one interface
//! (`netpilot_relay::registry::Registry`): every case of the shared suite runs on
//! SQLite and on a real PostgreSQL (a server and a fresh database per test), then
//! what only a shared database has to get right — two nodes racing for one token,
//! nodes migrating at once, a newer schema, the change history other nodes poll,
//! and a database that is down or silent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use netpilot_relay::registry::{
    postgres::SCHEMA_VERSION, PgRegistry, Registry, Store, StoreError, Watermark,
};
use netpilot_tests::engines::Postgres;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(3);

fn h(b: u8) -> [u8; 32] {
    [b; 32]
}

fn sqlite() -> Registry {
    Registry::sqlite(Store::open_in_memory().unwrap())
}

async fn postgres() -> (Postgres, Registry) {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("registry").await.unwrap();
    let reg = PgRegistry::open(&url, TIMEOUT).await.unwrap();
    (pg, Registry::Postgres(reg))
}

/// One case of the shared suite, as a test per backend.
macro_rules! both {
    ($case:ident) => {
        mod $case {
            #[tokio::test]
            async fn sqlite() {
                super::$case(&super::sqlite()).await;
            }
            #[tokio::test]
            async fn postgres() {
                let (_pg, reg) = super::postgres().await;
                super::$case(&reg).await;
            }
        }
    };
}

both!(token_is_traded_once);
async fn token_is_traded_once(s: &Registry) {
    let id = Uuid::new_v4();
    s.create_router(id, "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    let row = s.redeem_token(&h(1), &h(9), 10).await.unwrap();
    assert_eq!(row.id, id);
    assert_eq!(row.secret_hash, Some(h(9)));
    assert_eq!(row.enrolled_at, Some(10));
    assert!(matches!(
        s.redeem_token(&h(1), &h(8), 20).await,
        Err(StoreError::TokenUsed)
    ));
    assert!(matches!(
        s.redeem_token(&h(2), &h(8), 20).await,
        Err(StoreError::TokenInvalid)
    ));
    // The first secret stays.
    assert_eq!(s.router(id).await.unwrap().unwrap().secret_hash, Some(h(9)));
}

both!(pages_follow_creation_order_from_a_position_and_filter_by_owner);
async fn pages_follow_creation_order_from_a_position_and_filter_by_owner(s: &Registry) {
    let mut ids = Vec::new();
    for i in 0..7u8 {
        let id = Uuid::new_v4();
        // Two routers per millisecond: the id breaks the tie.
        let owner = if i % 2 == 0 { "even" } else { "odd" };
        s.create_router(id, "r", owner, &h(i), 1_000, i64::from(i / 2))
            .await
            .unwrap();
        ids.push(id);
    }
    let all = s.routers().await.unwrap();
    assert_eq!(all.len(), 7);
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page = s.routers_page(None, after, 3).await.unwrap();
        walked.extend(page.iter().map(|r| r.id));
        match page.last() {
            Some(last) if page.len() == 3 => after = Some((last.created_at, last.id)),
            _ => break,
        }
    }
    assert_eq!(walked, all.iter().map(|r| r.id).collect::<Vec<_>>());
    let even = s.routers_page(Some("even"), None, 100).await.unwrap();
    assert_eq!(even.len(), 4);
    assert!(even.iter().all(|r| r.owner_user_id == "even"));
    let rest = s
        .routers_page(Some("even"), Some((even[1].created_at, even[1].id)), 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[..], even[2..]);
    assert!(ids.contains(&rest[0].id));
}

both!(expired_token_is_refused);
async fn expired_token_is_refused(s: &Registry) {
    s.create_router(Uuid::new_v4(), "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    assert!(matches!(
        s.redeem_token(&h(1), &h(9), 1_000).await,
        Err(StoreError::TokenExpired)
    ));
}

both!(re_enrollment_token_replaces_the_secret);
async fn re_enrollment_token_replaces_the_secret(s: &Registry) {
    let id = Uuid::new_v4();
    s.create_router(id, "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    s.redeem_token(&h(1), &h(9), 10).await.unwrap();
    s.add_token(id, &h(2), 2_000).await.unwrap();
    assert_eq!(
        s.redeem_token(&h(2), &h(7), 20).await.unwrap().secret_hash,
        Some(h(7))
    );
    assert!(matches!(
        s.add_token(Uuid::new_v4(), &h(3), 1).await,
        Err(StoreError::NotFound)
    ));
    s.revoke(id, 30).await.unwrap();
    assert!(matches!(
        s.add_token(id, &h(4), 2_000).await,
        Err(StoreError::Revoked)
    ));
}

both!(revoke_clears_tokens_and_keeps_the_secret_to_check);
async fn revoke_clears_tokens_and_keeps_the_secret_to_check(s: &Registry) {
    let id = Uuid::new_v4();
    s.create_router(id, "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    s.redeem_token(&h(1), &h(2), 6).await.unwrap();
    let row = s.revoke(id, 7).await.unwrap();
    assert_eq!(row.revoked_at, Some(7));
    assert_eq!(row.secret_hash, Some(h(2)));
    // Revoking again keeps the first time.
    assert_eq!(s.revoke(id, 9).await.unwrap().revoked_at, Some(7));
    assert!(matches!(
        s.redeem_token(&h(1), &h(9), 6).await,
        Err(StoreError::TokenInvalid)
    ));
    assert!(matches!(
        s.revoke(Uuid::new_v4(), 5).await,
        Err(StoreError::NotFound)
    ));
}

both!(a_revoked_router_cannot_enroll_and_its_token_is_not_spent);
async fn a_revoked_router_cannot_enroll_and_its_token_is_not_spent(s: &Registry) {
    let id = Uuid::new_v4();
    s.create_router(id, "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    s.redeem_token(&h(1), &h(2), 6).await.unwrap();
    s.add_token(id, &h(3), 1_000).await.unwrap();
    s.revoke(id, 7).await.unwrap();
    // The revocation took the token with it.
    assert!(matches!(
        s.redeem_token(&h(3), &h(4), 8).await,
        Err(StoreError::TokenInvalid)
    ));
    assert_eq!(s.router(id).await.unwrap().unwrap().secret_hash, Some(h(2)));
}

both!(touch_records_last_seen_and_keeps_the_version_it_is_not_given);
async fn touch_records_last_seen_and_keeps_the_version_it_is_not_given(s: &Registry) {
    let id = Uuid::new_v4();
    s.create_router(id, "home", "u1", &h(1), 1_000, 0)
        .await
        .unwrap();
    s.touch(id, 7, Some("0.1.0")).await.unwrap();
    s.touch(id, 9, None).await.unwrap();
    let row = s.router(id).await.unwrap().unwrap();
    assert_eq!(row.last_seen, Some(9));
    assert_eq!(row.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(s.router(Uuid::new_v4()).await.unwrap(), None);
}

both!(changes_from_the_start_are_every_router);
async fn changes_from_the_start_are_every_router(s: &Registry) {
    for i in 0..3 {
        s.create_router(Uuid::new_v4(), "r", "u", &h(i), 1_000, i64::from(i))
            .await
            .unwrap();
    }
    let all = s.changes(Watermark::START).await.unwrap();
    assert_eq!(all.routers.len(), 3);
}

/// Two nodes (two pools) redeem one token at the same moment, 50 times over:
/// exactly one wins each time, the other hears "already used", and the router
/// keeps the winner's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_one_token_give_it_to_exactly_one() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("race").await.unwrap();
    let a = Arc::new(PgRegistry::open(&url, TIMEOUT).await.unwrap());
    let b = Arc::new(PgRegistry::open(&url, TIMEOUT).await.unwrap());
    for round in 0..50u8 {
        let id = Uuid::new_v4();
        let token = [round; 32];
        a.create_router(id, "r", "u", &token, 1_000, 0)
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let race = |reg: Arc<PgRegistry>, secret: [u8; 32]| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                reg.redeem_token(&token, &secret, 10).await
            })
        };
        let (ra, rb) = (race(a.clone(), h(0xa)), race(b.clone(), h(0xb)));
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let winner = match (&ra, &rb) {
            (Ok(_), Err(StoreError::TokenUsed)) => h(0xa),
            (Err(StoreError::TokenUsed), Ok(_)) => h(0xb),
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        assert_eq!(
            a.router(id).await.unwrap().unwrap().secret_hash,
            Some(winner),
            "round {round}"
        );
    }
}

/// Four nodes start at once on an empty database: each migration runs once (the
/// advisory lock), none fails on another's half-made schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_exactly_once() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("migrate").await.unwrap();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgRegistry::open(&url, TIMEOUT).await })
        })
        .collect();
    for o in opens {
        let reg = o.await.unwrap().unwrap();
        assert_eq!(reg.schema_version().await.unwrap(), SCHEMA_VERSION);
    }
    let applied = pg
        .psql(
            "migrate",
            "SELECT count(*), max(version) FROM schema_migrations",
        )
        .await
        .unwrap();
    assert_eq!(applied.trim(), format!("{SCHEMA_VERSION}|{SCHEMA_VERSION}"));
    // And once more later: nothing to do, nothing applied twice.
    PgRegistry::open(&url, TIMEOUT).await.unwrap();
    let count = pg
        .psql("migrate", "SELECT count(*) FROM schema_migrations")
        .await
        .unwrap();
    assert_eq!(count.trim(), SCHEMA_VERSION.to_string());
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("newer").await.unwrap();
    PgRegistry::open(&url, TIMEOUT).await.unwrap();
    let newer = SCHEMA_VERSION + 1;
    pg.psql(
        "newer",
        &format!("INSERT INTO schema_migrations (version) VALUES ({newer})"),
    )
    .await
    .unwrap();
    match PgRegistry::open(&url, TIMEOUT).await {
        Err(e @ StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (newer, SCHEMA_VERSION));
            assert!(e.to_string().contains("run a relay at least as new"), "{e}");
        }
        other => panic!("expected SchemaTooNew, got {:?}", other.map(|_| ())),
    }
}

/// What another node reads at its poll: every router changed since its mark, even
/// by a transaction that committed after a later one (the mark is the oldest
/// transaction still running, not the highest change seen); last-seen alone is
/// not a change.
#[tokio::test]
async fn the_change_history_misses_no_commit_whatever_the_order() {
    let (pg, reg) = postgres().await;
    let id = Uuid::new_v4();
    reg.create_router(id, "r", "u", &h(1), 1_000, 0)
        .await
        .unwrap();
    let start = reg.changes(Watermark::START).await.unwrap();
    assert_eq!(start.routers.len(), 1);
    let quiet = reg.changes(start.next).await.unwrap();
    reg.touch(id, 5, Some("1")).await.unwrap();
    let after_touch = reg.changes(quiet.next).await.unwrap();
    assert!(
        after_touch.routers.is_empty(),
        "last-seen is not a change: {:?}",
        after_touch.routers
    );

    // A transaction that takes its id first and commits last: open it beside the
    // registry, change a router in it, let another router change and be polled,
    // then commit.
    let url = pg.url_for("registry");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let slow = Uuid::new_v4();
    reg.create_router(slow, "slow", "u", &h(2), 1_000, 1)
        .await
        .unwrap();
    let mark = reg.changes(after_touch.next).await.unwrap().next;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "UPDATE routers SET revoked_at = 99, \
             change_xid = pg_current_xact_id()::text::bigint WHERE id = $1",
            &[&slow],
        )
        .await
        .unwrap();
    let fast = Uuid::new_v4();
    reg.create_router(fast, "fast", "u", &h(3), 1_000, 2)
        .await
        .unwrap();
    let seen = reg.changes(mark).await.unwrap();
    assert!(seen.routers.iter().any(|r| r.id == fast));
    client.batch_execute("COMMIT").await.unwrap();
    let then = reg.changes(seen.next).await.unwrap();
    let revoked = then
        .routers
        .iter()
        .find(|r| r.id == slow)
        .expect("the late commit is in the next poll");
    assert_eq!(revoked.revoked_at, Some(99));
}

/// PostgreSQL killed: each operation fails `Unavailable` within the timeout (no
/// hang), and the registry works again once the server is back, without a restart.
#[tokio::test]
async fn a_killed_database_fails_fast_and_recovers_on_resume() {
    let mut pg = Postgres::start().await.unwrap();
    let url = pg.create_database("down").await.unwrap();
    let timeout = Duration::from_secs(1);
    let reg = PgRegistry::open(&url, timeout).await.unwrap();
    let id = Uuid::new_v4();
    reg.create_router(id, "r", "u", &h(1), 1_000, 0)
        .await
        .unwrap();
    // The test server runs without fsync: make what was committed survive the kill.
    pg.psql("down", "CHECKPOINT").await.unwrap();
    pg.kill().await;
    // Killing the postmaster leaves its backends to notice on their own: a pooled
    // connection may answer a moment longer.
    netpilot_tests::eventually(Duration::from_secs(10), "the pool to lose PostgreSQL", || {
        let reg = &reg;
        async move { matches!(reg.router(id).await, Err(StoreError::Unavailable(_))).then_some(()) }
    })
    .await
    .unwrap();
    let t = Instant::now();
    let r = reg.redeem_token(&h(1), &h(2), 5).await;
    let took = t.elapsed();
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    pg.resume().await.unwrap();
    let row = netpilot_tests::eventually(Duration::from_secs(10), "the registry back", || {
        let reg = &reg;
        async move {
            match reg.router(id).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("not yet: {e}");
                    None
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(row.id, id);
    // The token the failed call could not spend is still there.
    assert_eq!(
        reg.redeem_token(&h(1), &h(2), 5).await.unwrap().secret_hash,
        Some(h(2))
    );
}

/// A database that accepts the connection and never answers (a partition, a
/// stopped server): opening fails within the timeout instead of hanging.
#[tokio::test]
async fn a_silent_database_is_unavailable_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            kept.push(s);
        }
    });
    let host: String =
        form_urlencoded::byte_serialize(dir.path().as_os_str().as_encoded_bytes()).collect();
    let url = format!("postgresql://postgres@{host}/silent");
    let timeout = Duration::from_millis(500);
    let t = Instant::now();
    let r = PgRegistry::open(&url, timeout).await;
    let took = t.elapsed();
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "{:?}",
        r.map(|_| ())
    );
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    held.abort();
}
