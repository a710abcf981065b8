//! A TCP proxy that can go silent: between an agent and the relay it relays bytes
//! both ways until frozen, then relays nothing more while keeping every socket
//! open — no FIN, no RST, as when a router's WAN dies. 127.0.0.1:0 only.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FreezeProxy {
    pub addr: SocketAddr,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezeProxy {
    /// Listens on a fresh loopback port and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<FreezeProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, _) = watch::channel(false);
        let tx = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let frozen = tx.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, frozen.clone()) => {}
                        _ = pipe(sr, cw, frozen) => {}
                    }
                });
            }
        });
        Ok(FreezeProxy { addr, frozen, task })
    }

    /// `https://` URL of the proxy, for the agent's `--relay`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// From now on no byte crosses in either direction; sockets stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for FreezeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies until either side closes; bytes read while frozen are held, never written.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Frozen for good: hold the bytes and the sockets until the test ends.
        if frozen.wait_for(|f| !*f).await.is_err() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
