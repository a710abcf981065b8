//! The relay as a cluster (issue 16), with the real binaries: three nodes on one
//! Redis and one registry, agents on any of them. A call entering any node reaches
//! the router wherever its link is and is answered exactly as a single node would;
//! sessions live in Redis, so any node serves them and they outlive a node;
//! revocation on one node closes the link on another at once; a killed node's
//! routers come back through the others; an unreachable node's routers answer
//! `ROUTER_UNREACHABLE` quickly; without Redis every call is refused (fail closed).

use std::time::{Duration, Instant};

use netpilot_tests::cluster::ClusterRig;
use netpilot_tests::{eventually, session_id, Session};
use serde_json::{json, Value};

fn data(r: &netpilot_tests::Reply) -> &Value {
    assert_eq!(r.status, 200, "{}", r.body);
    &r.body["data"]
}

fn group(id: u32, name: &str) -> Value {
    json!({"id": id, "name": name, "devices": [{"mac": format!("aa:bb:cc:dd:ee:{id:02x}")}],
        "policy": {"internet": "allow"}})
}

#[tokio::test]
async fn a_call_entering_any_node_reaches_the_router_wherever_it_is_linked() {
    let (rig, routers) = ClusterRig::start(3, "", &["alice"]).await.unwrap();
    let router = &routers[0];
    let _agent = rig.agent(router, 1).await.unwrap();
    for via in 0..3 {
        rig.wait_holder(via, &router.router_id, Some(1), Duration::from_secs(15))
            .await
            .unwrap();
    }

    // A session started on node 0 (which has no link) sees the router reachable:
    // its health check went to node 1.
    let c0 = rig.client(0).await.unwrap();
    let sid = session_id();
    let r = c0
        .post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": "alice", "routerId": router.router_id}),
        )
        .await
        .unwrap();
    assert_eq!(data(&r)["router_reachable"], json!(true), "{}", r.body);

    // The same session on every node: a change through node 2, read through 0 and 1.
    let mut sessions = Vec::new();
    for via in 0..3 {
        sessions.push(Session {
            client: rig.client(via).await.unwrap(),
            id: sid.clone(),
            router_id: router.router_id.clone(),
        });
    }
    let r = sessions[2]
        .post("/api/groups/sync", json!({"group": group(3, "Kids")}))
        .await;
    assert_eq!(data(&r)["apply"]["changed"], json!(true));
    let here = sessions[1].get("/api/groups/3").await;
    for s in &sessions {
        let r = s.get("/api/groups/3").await;
        assert_eq!(data(&r)["name"], json!("Kids"));
        // Answered exactly as the node holding the link answers it.
        assert_eq!(r.body["data"], here.body["data"]);
        assert_eq!(r.body["success"], json!(true));
    }
    // An agent error passes through untouched, status and code.
    let r = sessions[0].get("/api/groups/99").await;
    let local = sessions[1].get("/api/groups/99").await;
    assert_eq!(r.status, local.status, "{}", r.body);
    assert_eq!(r.body["error"], local.body["error"]);

    // Status on any node: the router is attached and online (elsewhere).
    let st = c0
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(
        data(&st)["routers"][0]["online"],
        json!(true),
        "{}",
        st.body
    );

    // Concurrent calls through the node without the link all arrive.
    let mut calls = Vec::new();
    for _ in 0..50 {
        let s = sessions[0].clone();
        calls.push(tokio::spawn(
            async move { s.get("/api/groups/3").await.status },
        ));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }

    // /health and /metrics tell the cluster's state.
    let h = c0.get("/health").await.unwrap();
    assert_eq!(h.body["data"]["cluster"]["node_id"], json!("node-0"));
    assert_eq!(h.body["data"]["cluster"]["redis"], json!("ok"));
    assert_eq!(
        h.body["data"]["cluster"]["nodes"].as_array().map(Vec::len),
        Some(3),
        "{}",
        h.body
    );
    let m = c0.get("/metrics").await.unwrap();
    let m = String::from_utf8_lossy(&m.raw).into_owned();
    let forwards_out = metric(&m, "netpilot_cluster_forwards_out_total");
    assert!(forwards_out >= 50.0, "{forwards_out}\n{m}");
}

/// The router's agent linked to node `at` (as node `via` sees it), and a session of
/// alice's through node `via` that reaches the router.
async fn linked(
    rig: &ClusterRig,
    router: &netpilot_tests::EnrolledRouter,
    at: usize,
    via: usize,
) -> (netpilot_tests::Agent, Session) {
    let agent = rig.agent(router, at).await.unwrap();
    rig.wait_holder(via, &router.router_id, Some(at), Duration::from_secs(15))
        .await
        .unwrap();
    let c = rig.client(via).await.unwrap();
    let s = Session::start(&c, "alice", &router.router_id)
        .await
        .unwrap();
    assert_eq!(s.get("/api/groups").await.status, 200);
    (agent, s)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn sessions_live_in_redis_any_node_serves_them_and_they_expire_there() {
    let (rig, routers) = ClusterRig::start(
        2,
        "[timeouts]\nsession_idle = \"1500ms\"\nrouter_idle = \"700ms\"\n",
        &["alice", "bob"],
    )
    .await
    .unwrap();
    let (alice_router, bob_router) = (&routers[0], &routers[1]);
    let c0 = rig.client(0).await.unwrap();
    let c1 = rig.client(1).await.unwrap();

    let sid = session_id();
    let start = json!({"sessionId": sid, "userId": "alice"});
    assert_eq!(
        c0.post("/api/session/start", start).await.unwrap().status,
        200
    );
    // Another user cannot take it, on any node.
    let r = c1
        .post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": "mallory"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // Ownership is checked on whichever node the call enters: bob's router is not
    // alice's, and an unknown session is refused before any routing.
    let r = c1
        .get(&netpilot_tests::q(
            "/api/groups",
            &sid,
            &bob_router.router_id,
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c1
        .get(&netpilot_tests::q(
            "/api/groups",
            &session_id(),
            &alice_router.router_id,
        ))
        .await
        .unwrap();
    assert_eq!(r.code(), "SESSION_INVALID", "{}", r.body);

    // Attached through node 1 (the router is offline: no agent), seen on node 0.
    let r = c1
        .get(&netpilot_tests::q(
            "/api/groups",
            &sid,
            &alice_router.router_id,
        ))
        .await
        .unwrap();
    assert_eq!(r.code(), "ROUTER_OFFLINE", "{}", r.body);
    let st = c0
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(data(&st)["user_id"], json!("alice"));
    assert_eq!(
        data(&st)["routers"][0]["router_id"],
        json!(alice_router.router_id)
    );
    assert_eq!(data(&st)["routers"][0]["online"], json!(false));

    // The router detaches after its idle time, by Redis expiry; refreshes through
    // either node keep the session alive past its own idle time.
    eventually(Duration::from_secs(5), "router detached", || async {
        let st = c0
            .get(&format!("/api/session/status?sessionId={sid}"))
            .await
            .ok()?;
        (st.status == 200 && st.body["data"]["routers"] == json!([])).then_some(())
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        let c = if t0.elapsed().as_millis() % 2 == 0 {
            &c0
        } else {
            &c1
        };
        let r = c
            .post("/api/session/refresh", json!({"sessionId": sid}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "refreshed session expired: {}", r.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then it expires on its own, everywhere.
    eventually(Duration::from_secs(5), "session expired", || async {
        let r = c1
            .get(&format!("/api/session/status?sessionId={sid}"))
            .await
            .ok()?;
        (r.code() == "SESSION_INVALID").then_some(())
    })
    .await
    .unwrap();
    let r = c0
        .post("/api/session/refresh", json!({"sessionId": sid}))
        .await
        .unwrap();
    assert_eq!(r.code(), "SESSION_INVALID");

    // End on one node is the end on all.
    let sid = session_id();
    c0.post(
        "/api/session/start",
        json!({"sessionId": sid, "userId": "alice"}),
    )
    .await
    .unwrap();
    let r = c1
        .post("/api/session/end", json!({"sessionId": sid}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c0
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(r.code(), "SESSION_INVALID");
}

#[tokio::test]
async fn revoking_on_one_node_closes_the_link_on_another_at_once() {
    let (rig, routers) = ClusterRig::start(3, "", &["alice"]).await.unwrap();
    let router = &routers[0];
    let _agent = rig.agent(router, 1).await.unwrap();
    rig.wait_holder(2, &router.router_id, Some(1), Duration::from_secs(15))
        .await
        .unwrap();
    let c2 = rig.client(2).await.unwrap();
    let revoked = Instant::now();
    let r = c2
        .delete(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(data(&r)["link_closed"], json!(true), "{}", r.body);
    // Node 1 closed its link: nobody holds the router now.
    rig.wait_holder(0, &router.router_id, None, Duration::from_secs(3))
        .await
        .unwrap();
    let took = revoked.elapsed();
    let h1 = rig.client(1).await.unwrap().get("/health").await.unwrap();
    assert_eq!(h1.body["data"]["connected_agents"], json!(0), "{}", h1.body);
    println!("revocation closed the link on another node in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_killed_nodes_routers_come_back_through_the_others_and_sessions_survive() {
    let (mut rig, routers) = ClusterRig::start(
        3,
        "[timeouts]\nping_interval = \"300ms\"\ndead_after = \"1s\"\n",
        &["alice"],
    )
    .await
    .unwrap();
    let router = &routers[0];
    let (_agent, s) = linked(&rig, router, 0, 1).await;

    rig.kill(0).await;
    let killed = Instant::now();
    // The agent finds node 0 gone and links to the next node in its list.
    eventually(Duration::from_secs(20), "router back", || async {
        let r = s.get("/api/groups").await;
        (r.status == 200).then_some(())
    })
    .await
    .unwrap();
    println!(
        "router answering through another node {:?} after SIGKILL",
        killed.elapsed()
    );
    // Same session, no restart: it lives in Redis, not in the killed node.
    let r = s.get("/api/groups").await;
    assert_eq!(r.status, 200, "{}", r.body);
    rig.wait_holder(2, &router.router_id, Some(1), Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_node_that_cannot_be_reached_answers_router_unreachable_quickly() {
    let (rig, routers) = ClusterRig::start(2, "", &["alice"]).await.unwrap();
    let router = &routers[0];
    let (_agent, s) = linked(&rig, router, 1, 0).await;

    // SIGSTOP: node 1 keeps its sockets but answers nothing, as behind a partition.
    let pid = rig.nodes[1].pid().unwrap();
    let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    stop(nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    let r = s.get("/api/groups").await;
    let took = t.elapsed();
    stop(nix::sys::signal::Signal::SIGCONT);
    println!(
        "call for a router on an unreachable node answered in {took:?}: {}",
        r.body
    );
    // Unreachable while its presence lasts; offline once it expired (1 s here).
    assert!(
        matches!(r.code(), "ROUTER_UNREACHABLE" | "ROUTER_OFFLINE"),
        "{}",
        r.body
    );
    assert_eq!(r.status, 503);
    assert!(took < Duration::from_secs(5), "hung for {took:?}");
}

#[tokio::test]
async fn without_redis_every_call_is_refused_and_the_cluster_recovers() {
    let (mut rig, routers) = ClusterRig::start(2, "", &["alice"]).await.unwrap();
    let router = &routers[0];
    let (_agent, s) = linked(&rig, router, 1, 0).await;
    let c0 = s.client.clone();

    rig.redis.kill().await;
    for via in 0..2 {
        let s = Session {
            client: rig.client(via).await.unwrap(),
            ..s.clone()
        };
        let t = Instant::now();
        let r = s.get("/api/groups").await;
        assert_eq!(r.code(), "CLUSTER_UNAVAILABLE", "node-{via}: {}", r.body);
        assert_eq!(r.status, 503);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    let h = c0.get("/health").await.unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.body["data"]["cluster"]["redis"], json!("unreachable"));

    // Redis back (empty: no persistence here): sessions are gone, the directory is
    // rebuilt by the nodes, and a new session works through either node.
    rig.redis.resume().await.unwrap();
    eventually(Duration::from_secs(10), "directory rebuilt", || async {
        let c = rig.client(0).await.ok()?;
        let s = Session::start(&c, "alice", &router.router_id).await.ok()?;
        (s.get("/api/groups").await.status == 200).then_some(())
    })
    .await
    .unwrap();
    let r = s.get("/api/groups").await;
    assert_eq!(r.code(), "SESSION_INVALID", "{}", r.body);
}

/// A load balancer as the test drives it: calls go round the nodes in service; a
/// node is taken out before it is stopped (as a balancer does once `/health` says
/// draining) and put back once it is up again.
struct Balancer {
    nodes: Vec<tokio::sync::RwLock<Option<netpilot_tests::Client>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Balancer {
    async fn pick(&self) -> netpilot_tests::Client {
        loop {
            let k = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(c) = &*self.nodes[k % self.nodes.len()].read().await {
                return c.clone();
            }
        }
    }
}

#[tokio::test]
async fn restarting_every_node_one_after_another_fails_no_call() {
    let owners = ["alice"; 6];
    let (mut rig, routers) = ClusterRig::start(
        3,
        "[timeouts]\ndrain = \"15s\"\nping_interval = \"500ms\"\ndead_after = \"2s\"\n",
        &owners,
    )
    .await
    .unwrap();
    // Router k prefers node k % 3: every node holds links when it restarts.
    let mut agents = Vec::new();
    for (k, r) in routers.iter().enumerate() {
        agents.push(rig.agent(r, k % 3).await.unwrap());
    }
    for (k, r) in routers.iter().enumerate() {
        rig.wait_holder(0, &r.router_id, Some(k % 3), Duration::from_secs(15))
            .await
            .unwrap();
    }
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(tokio::sync::RwLock::new(Some(rig.client(i).await.unwrap())));
    }
    let lb = std::sync::Arc::new(Balancer {
        nodes: clients,
        next: Default::default(),
    });
    let sid = session_id();
    let r = lb
        .pick()
        .await
        .post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": "alice"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // Steady load: 6 callers, each on every router in turn, through the balancer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for w in 0..6usize {
        let (lb, stop, sid) = (lb.clone(), stop.clone(), sid.clone());
        let ids: Vec<String> = routers.iter().map(|r| r.router_id.clone()).collect();
        callers.spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut k = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let s = Session {
                    client: lb.pick().await,
                    id: sid.clone(),
                    router_id: ids[k % ids.len()].clone(),
                };
                let r = s.get("/api/groups").await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", r.status, r.body));
                }
            }
            (ok, failed)
        });
    }

    // Every node, one after another: out of the balancer, SIGTERM, drained and
    // exited, started again, back in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        *lb.nodes[i].write().await = None;
        let drained = rig.rolling_restart(i).await.unwrap();
        println!("node-{i} drained and exited in {drained:?}");
        *lb.nodes[i].write().await = Some(rig.client(i).await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(r) = callers.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "{ok} calls answered 200 during the rolling restart, {} failed",
        failed.len()
    );
    assert!(ok > 100, "too few calls to prove anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Every router is still reachable, wherever it went.
    for r in &routers {
        let s = Session {
            client: rig.client(0).await.unwrap(),
            id: sid.clone(),
            router_id: r.router_id.clone(),
        };
        assert_eq!(s.get("/api/groups").await.status, 200);
    }
}
