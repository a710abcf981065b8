//! The agent's control socket with the real binaries: `netpilot-agent status` for a
//! person and as JSON, who may ask (the agent's user: root on a router), what it says when the agent is not
//! running, and `reconnect` redialing the relay at once — over a link that died
//! silently, and out of a long backoff wait.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpilot_tests::{binary, Agent, AgentPaths, ApiRig, Relay, RelayOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn cli(args: &[&str]) -> Output {
    std::process::Command::new(binary("netpilot-agent"))
        .args(args)
        .output()
        .unwrap()
}

fn status_json(socket: &Path) -> Value {
    let out = cli(&["status", "--json", "--control", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn status_is_served_on_a_private_socket_and_says_when_the_agent_is_not_running() {
    let mut rig = ApiRig::simulated().await.unwrap();
    let socket = AgentPaths::of(&rig.router).control;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    let out = cli(&["status", "--control", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}");
    for needle in [
        "agent:\n",
        &format!("  router_id: {}\n", rig.router_id()),
        "link:\n",
        "  connected: true\n",
        &format!("  relay: {}\n", rig.relay.url()),
        "policy:\n",
        "  in_sync: ",
        "  drift: none\n",
        "  shaping.wan_root_owner: ",
        "offloading:\n",
        "  software: ",
        "nlbwmon:\n",
        "  running: ",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let v = status_json(&socket);
    assert_eq!(v["agent"]["router_id"], rig.router_id());
    assert_eq!(v["link"]["connected"], true);
    // The engine's status is passed on whole: what the API shows, the console shows.
    let api = rig
        .session("alice")
        .await
        .unwrap()
        .get("/api/infrastructure/status")
        .await;
    let api_fields: Vec<_> = api.body["data"]["status"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let ctl_fields: Vec<_> = v["policy"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(api_fields, ctl_fields);
    assert_eq!(v["offloading"], api.body["data"]["offloading"]);

    // An agent killed outright leaves its socket: nothing answers there.
    rig.agent.kill().await;
    let out = cli(&["status", "--control", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running (nothing answers"), "{err}");
    // A restarted agent takes the stale socket over; stopped, it removes it.
    rig.restart_agent().await.unwrap();
    assert_eq!(status_json(&socket)["link"]["connected"], true);
    rig.agent.terminate().await.unwrap();
    assert!(!socket.exists());
    let out = cli(&["status", "--control", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the agent is not running (no control socket at"),
        "{err}"
    );
}

/// Another user than the agent's (root on a router) is refused by the socket's
/// modes, and told to ask as root. Needs root to switch users (hence `netns_`, the
/// suite's mark for tests that need root).
#[tokio::test]
async fn netns_status_is_refused_to_a_user_who_is_not_root() {
    let rig = ApiRig::simulated().await.unwrap();
    let socket = AgentPaths::of(&rig.router).control;
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("netpilot-agent"))
        .args(["status", "--control", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!as_nobody.status.success());
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(
        err.contains("permission denied") && err.contains("root"),
        "{err}"
    );
    // Root (the agent's user) is served on the same socket.
    assert_eq!(status_json(&socket)["link"]["connected"], true);
}

/// A TCP proxy between the agent and the relay that can kill links silently (the
/// connections stay open and carry nothing, as when the WAN went away) or loudly
/// (closed), and refuse new ones.
struct Proxy {
    addr: SocketAddr,
    /// Connections numbered below this carry nothing any more.
    silent_below: Arc<AtomicU64>,
    /// The number the next connection gets.
    next_id: Arc<AtomicU64>,
    refuse: Arc<AtomicBool>,
    /// Closes every open connection.
    close_all: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(relay: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent_below = Arc::new(AtomicU64::new(0));
        let refuse = Arc::new(AtomicBool::new(false));
        let close_all = Arc::new(tokio::sync::Notify::new());
        let next_id = Arc::new(AtomicU64::new(0));
        let (silent, no, close, next) = (
            silent_below.clone(),
            refuse.clone(),
            close_all.clone(),
            next_id.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let id = next.fetch_add(1, Ordering::SeqCst);
                if no.load(Ordering::SeqCst) {
                    continue;
                }
                let (silent, close) = (silent.clone(), close.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(relay).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let dead = || silent.load(Ordering::SeqCst) > id;
                    tokio::select! {
                        _ = pipe(cr, sw, &dead) => {}
                        _ = pipe(sr, cw, &dead) => {}
                        _ = close.notified() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            silent_below,
            next_id,
            refuse,
            close_all,
        }
    }

    /// Every connection open now goes silent; new ones work.
    fn kill_silently(&self) {
        self.silent_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dead: &impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dead() {
            // Swallowed: the peer hears nothing, and no FIN either.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Polls the agent's status until `pred` holds; returns how long that took.
async fn wait_link(socket: &Path, what: &str, within: Duration, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let v = status_json(socket);
        if pred(&v["link"]) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {}", v["link"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reconnect_redials_at_once_over_a_dead_link_and_out_of_a_backoff_wait() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let relay_addr: SocketAddr = relay.url().trim_start_matches("https://").parse().unwrap();
    let proxy = Proxy::start(relay_addr).await;
    let url = format!("https://{}", proxy.addr);
    // Dead links noticed only after 10 minutes, reconnects up to an hour apart:
    // anything sooner is the reconnect request.
    let _agent = Agent::start(
        &router,
        &[
            "--simulate",
            "--relay",
            &url,
            "--ping-interval",
            "60s",
            "--dead-after",
            "600s",
            "--backoff-base",
            "1h",
            "--backoff-cap",
            "1h",
        ],
    )
    .await
    .unwrap();
    let socket = AgentPaths::of(&router).control;
    let reconnect = || {
        let out = cli(&["reconnect", "--control", socket.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    };
    wait_link(&socket, "first link", Duration::from_secs(10), |l| {
        l["connected"] == true && l["connects"] == 1
    })
    .await;

    // The WAN went away and came back: the link is dead, nobody said so.
    proxy.kill_silently();
    let t = Instant::now();
    reconnect();
    wait_link(&socket, "a new link", Duration::from_secs(5), |l| {
        l["connected"] == true && l["connects"] == 2
    })
    .await;
    println!(
        "dead link replaced in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // The relay is gone for a while: the agent waits out a backoff of up to an hour.
    proxy.refuse.store(true, Ordering::SeqCst);
    proxy.close_all.notify_waiters();
    wait_link(&socket, "the link down", Duration::from_secs(5), |l| {
        l["connected"] == false
    })
    .await;
    proxy.refuse.store(false, Ordering::SeqCst);
    let t = Instant::now();
    reconnect();
    wait_link(
        &socket,
        "back without the backoff",
        Duration::from_secs(5),
        |l| l["connected"] == true && l["connects"] == 3,
    )
    .await;
    println!(
        "back from a backoff wait in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let log =
        std::fs::read_to_string(router.state_dir.parent().unwrap().join("agent.log")).unwrap();
    assert!(log.contains("redial asked for; dropping the link"), "{log}");
    assert!(log.contains("redial asked for; not waiting"), "{log}");
}
