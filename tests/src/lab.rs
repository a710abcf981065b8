//! A router in network namespaces, for tests that prove enforcement by traffic.
//!
//! ```text
//!  c1 (192.168.77.11, 02:4e:50:00:00:11) ─┐
//!                                          ├─ br-lan 192.168.77.1 [router] wan0 10.77.0.1 ── eth0 10.77.0.2 [wan]
//!  c2 (192.168.77.12, 02:4e:50:00:00:12) ─┘
//! ```
//!
//! The namespaces are [`Netns`]es of the test kit (named after this process, so
//! parallel tests never meet; dropping the lab kills what it started and deletes
//! them; a new lab sweeps namespaces left by a test process that died), and making
//! a lab is the kit's requirement check: a test using it needs the `netns_` marker
//! and root. All addresses live only inside these namespaces. Connections from a
//! namespace are made in-process: a thread enters the namespace and opens the
//! socket, which stays there.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use netpilot_testkit::netns::run;
pub use netpilot_testkit::Netns;
use serde_json::Value;

pub const LAN_IF: &str = "br-lan";
pub const WAN_IF: &str = "wan0";
pub const ROUTER_LAN: &str = "192.168.77.1";
pub const ROUTER_WAN: &str = "10.77.0.1";
pub const WAN_HOST: &str = "10.77.0.2";
pub const C1_IP: &str = "192.168.77.11";
pub const C2_IP: &str = "192.168.77.12";
pub const C1_MAC: &str = "02:4e:50:00:00:11";
pub const C2_MAC: &str = "02:4e:50:00:00:12";

pub struct Lab {
    pub router: Netns,
    pub wan: Netns,
    pub c1: Netns,
    pub c2: Netns,
}

/// What a TCP connection attempt met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Open,
    /// RST, or an ICMP "administratively prohibited"/unreachable answer.
    Refused,
    TimedOut,
}

impl Lab {
    pub fn new() -> anyhow::Result<Lab> {
        let lab = Lab {
            router: Netns::new("r")?,
            wan: Netns::new("w")?,
            c1: Netns::new("a")?,
            c2: Netns::new("b")?,
        };
        let r = lab.router.name();
        run(&["ip", "-n", r, "link", "add", LAN_IF, "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            r,
            "addr",
            "add",
            &format!("{ROUTER_LAN}/24"),
            "dev",
            LAN_IF,
        ])?;
        run(&["ip", "-n", r, "link", "set", LAN_IF, "up"])?;
        for (ns, port, ip, mac) in [
            (lab.c1.name(), "lan1", C1_IP, C1_MAC),
            (lab.c2.name(), "lan2", C2_IP, C2_MAC),
        ] {
            run(&[
                "ip", "-n", r, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            run(&["ip", "-n", r, "link", "set", port, "master", LAN_IF, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "address", mac])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", ns, "route", "add", "default", "via", ROUTER_LAN])?;
        }
        let w = lab.wan.name();
        run(&[
            "ip", "-n", r, "link", "add", WAN_IF, "type", "veth", "peer", "name", "eth0", "netns",
            w,
        ])?;
        run(&[
            "ip",
            "-n",
            r,
            "addr",
            "add",
            &format!("{ROUTER_WAN}/24"),
            "dev",
            WAN_IF,
        ])?;
        run(&["ip", "-n", r, "link", "set", WAN_IF, "up"])?;
        run(&[
            "ip",
            "-n",
            w,
            "addr",
            "add",
            &format!("{WAN_HOST}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", w, "link", "set", "eth0", "up"])?;
        run(&[
            "ip",
            "-n",
            w,
            "route",
            "add",
            "192.168.77.0/24",
            "via",
            ROUTER_WAN,
        ])?;
        lab.router
            .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // As OpenWrt has it (kmod-br-netfilter's sysctl.d file sets these to 0; by
        // default the module is not even installed). Where a host has loaded
        // br_netfilter (container engines do), a new namespace would otherwise
        // pass bridged frames through the IP hooks too, and a frame redirected to
        // NetPilot's upload ifb would reach the forward hook without its conntrack
        // entry (so its connection's mark, which classifies download, is lost).
        for key in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
            if std::path::Path::new(&format!("/proc/sys/net/bridge/{key}")).exists() {
                lab.router
                    .exec(&["sysctl", "-qw", &format!("net.bridge.{key}=0")])?;
            }
        }
        Ok(lab)
    }

    /// Runs a program in a namespace to completion.
    pub fn exec(&self, ns: &Netns, argv: &[&str]) -> anyhow::Result<String> {
        Ok(ns.exec(argv)?)
    }

    /// Starts a program in a namespace; the lab kills it on drop.
    pub fn spawn(&self, ns: &Netns, argv: &[&str]) -> anyhow::Result<()> {
        Ok(ns.spawn(argv)?)
    }

    /// A TCP connection opened from namespace `ns`.
    pub fn connect(
        &self,
        ns: &Netns,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        ns.run(move || TcpStream::connect_timeout(&addr, timeout))
    }

    /// Whether a TCP connection from `ns` to `addr` opens.
    pub fn probe(&self, ns: &Netns, addr: SocketAddr) -> Probe {
        match self.connect(ns, addr, Duration::from_secs(2)) {
            Ok(_) => Probe::Open,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Probe::TimedOut,
            Err(_) => Probe::Refused,
        }
    }

    /// A listener in `ns` that accepts and closes connections, for probes.
    pub fn listen(&self, ns: &Netns, ip: &str) -> anyhow::Result<SocketAddr> {
        let bind: SocketAddr = format!("{ip}:0").parse()?;
        let listener = ns.run(move || TcpListener::bind(bind))?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for c in listener.incoming() {
                drop(c);
            }
        });
        Ok(addr)
    }

    /// [`Lab::listen`] on a given port: a service's own port (DoT's 853) inside a
    /// namespace this lab made, where nothing else can hold it.
    pub fn listen_on(&self, ns: &Netns, ip: &str, port: u16) -> anyhow::Result<SocketAddr> {
        let bind: SocketAddr = format!("{ip}:{port}").parse()?;
        let listener = ns.run(move || TcpListener::bind(bind))?;
        std::thread::spawn(move || {
            for c in listener.incoming() {
                drop(c);
            }
        });
        Ok(bind)
    }

    /// Waits until something listens on TCP `port` in `ns` (a server started with
    /// [`Lab::spawn`] is ready).
    pub fn wait_listening(&self, ns: &Netns, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = self.exec(ns, &["ss", "-Hln", "sport", "=", &format!(":{port}")])?;
            if !ss.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} in {}", ns.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TCP throughput in Mbit/s measured by iperf3 between a client in `client_ns`
    /// and a one-off server at `server_ip` in `server_ns`. `download` runs the data
    /// from the server to the client.
    pub fn throughput(
        &self,
        client_ns: &Netns,
        server_ns: &Netns,
        server_ip: &str,
        download: bool,
        seconds: u32,
    ) -> anyhow::Result<f64> {
        // A port free in the server's namespace (nothing else runs there).
        let bind: SocketAddr = format!("{server_ip}:0").parse()?;
        let port = server_ns
            .run(move || TcpListener::bind(bind).and_then(|l| l.local_addr()))?
            .port();
        let port_s = port.to_string();
        self.spawn(
            server_ns,
            &["iperf3", "-s", "-1", "-B", server_ip, "-p", &port_s],
        )?;
        // Ready once its socket listens. A probe connection would not do: the
        // one-off server would take it for its one client.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = self.exec(
                server_ns,
                &["ss", "-Htln", "sport", "=", &format!(":{port}")],
            )?;
            if !ss.trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("iperf3 server did not listen on {server_ip}:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = seconds.to_string();
        let mut argv = vec![
            "iperf3", "-c", server_ip, "-p", &port_s, "-t", &secs, "-O", "1", "-J",
        ];
        if download {
            argv.push("-R");
        }
        let out = self.exec(client_ns, &argv)?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| anyhow!("no throughput in iperf3 output: {out}"))?;
        Ok(bps / 1e6)
    }

    /// [`Lab::api`] expecting `200 OK`: the answer's `data`.
    pub fn api_data(&self, addr: SocketAddr, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self
            .api(addr, method, path, Some(&body))
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["data"].clone()
    }

    /// One HTTP/1.1 call to the agent's local API inside the router namespace.
    pub fn api(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut s = self.connect(&self.router, addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("bad answer: {text}"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line: {head}"))?;
        // Bodies are small JSON; chunked framing is undone by finding the object.
        let json = payload.find('{').map(|i| &payload[i..]).unwrap_or("");
        let end = json.rfind('}').map(|i| &json[..=i]).unwrap_or("");
        let v: Value = serde_json::from_str(end).with_context(|| format!("body: {payload}"))?;
        Ok((status, v))
    }
}
