//! The cluster's engines as the tests start them (`netpilot_tests::engines`): a
//! PostgreSQL and a Redis of their own, reachable by the URLs they hand out with
//! the same drivers the relay uses, and gone when dropped.

use netpilot_tests::engines::{Postgres, Redis};

#[tokio::test]
async fn postgres_starts_answers_at_its_url_and_is_gone_when_dropped() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.create_database("t1").await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "t1");
    drop(client);
    let _ = conn.await;
    let log = pg.log();
    drop(pg);
    // The socket directory went with the server.
    let again = tokio_postgres::connect(&url, tokio_postgres::NoTls).await;
    assert!(again.is_err(), "still reachable after drop; log:\n{log}");
}

#[tokio::test]
async fn redis_starts_answers_at_its_url_and_forgets_on_restart() {
    let mut r = Redis::start().await.unwrap();
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "v");
    r.resume().await.unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, None);
}
