//! The local API's connections: accepting, capping and timing them out, so that no client
//! (or crowd of idle clients) can take the agent's file descriptors or its API away.
//!
//! Why it exists: every API connection holds a file descriptor, and the same process needs
//! descriptors for SQLite, the QUIC socket, file watches and the files it renders. With
//! `axum::serve`, connections were unbounded and never timed out, so ~1,000 idle connections
//! used up the default soft limit of 1,024 descriptors: the API stopped answering for good
//! and peer changes could no longer be rendered into files. So:
//!
//! * at start the soft descriptor limit is raised (up to [`FD_TARGET`], never above the hard
//!   limit; [`raise_fd_limit`]);
//! * at most `api_max_connections` connections are served at once; one more is answered
//!   `503` with a JSON error and closed straight away (and beyond a few such refusals in
//!   flight, closed without an answer), so the cap never waits on the client;
//! * a connection must send each request head within `api_idle_timeout` of the previous
//!   response (or of connecting): this closes idle keep-alive connections and slowloris
//!   heads (hyper's header read timeout); request bodies must arrive within the same time
//!   (the body layer in [`crate::api`]); a response write that makes no progress for that
//!   long (a client that stopped reading) closes the connection ([`StallTimeout`]).
//!   A watch stream (`?watch`), once its request is in, lives as long as its client reads it.
//!
//! The same loop serves the unix socket `data_dir/api.sock` ([`bind_unix`]: a stale socket
//! file is removed, the new one gets mode 0660 and the configured group), with the same cap
//! (counted separately) and timeouts.
//!
//! Data flow: `TcpListener` or `UnixListener` → [`serve`] (permit or refusal) → one task per
//! connection: hyper's HTTP/1 connection over [`StallTimeout`] → the axum router.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

use crate::metrics::Metrics;

/// The soft descriptor limit the agent asks for at start (bounded by the hard limit).
pub(crate) const FD_TARGET: u64 = 65_536;

/// Refusal answers in flight at once; past that an extra connection is closed unanswered.
const MAX_REFUSING: usize = 64;

/// Connection limits of the API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Raise the soft `RLIMIT_NOFILE` towards [`FD_TARGET`] (never above the hard limit);
/// returns (before, after). `rustix` gives a safe `setrlimit` (the workspace forbids `unsafe`).
pub(crate) fn raise_fd_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    let want = FD_TARGET.min(lim.maximum.unwrap_or(u64::MAX));
    if want <= before {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: lim.maximum,
        },
    )?;
    Ok((before, want))
}

/// A listener the API is served on: loopback TCP or the unix socket.
pub(crate) trait Accept: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Wait for the next connection.
    fn next(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next(&self) -> io::Result<Self::Io> {
        let (tcp, _) = self.accept().await?;
        // Small responses and SSE events go out at once, not after the previous segment's ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
        }
        Ok(tcp)
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn next(&self) -> io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }
}

/// The numeric id of a group given by name (from `/etc/group`) or number.
pub(crate) fn group_id(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| anyhow::anyhow!("cannot read /etc/group to find group `{g}`: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == g)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("no group `{g}` in /etc/group (give a group name or a numeric id)")
        })
}

/// Bind the API's unix socket at `path`: a stale socket file left by an agent that died is
/// removed first (another agent cannot be using it: the data directory's database is held
/// exclusively); the socket gets mode 0660 and, with `group`, that group. Since a client also
/// needs to traverse the data directory (mode 0700), with `group` the data directory is
/// given that group and mode 0710 (enter, not list).
pub(crate) fn bind_unix(
    path: &std::path::Path,
    group: Option<&str>,
) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; move it away so the agent can serve its API socket there",
            path.display()
        ),
        Err(_) => {}
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot serve the API on the unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(g) = group {
        let gid = group_id(g)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} the group `{g}`", path.display()))?;
        if let Some(dir) = path.parent() {
            std::os::unix::fs::chown(dir, None, Some(gid))
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
                })
                .with_context(|| format!("cannot let group `{g}` enter {}", dir.display()))?;
        }
    }
    Ok(l)
}

/// Serve `router` on `listener` until `shutdown` turns true, then let open connections
/// finish (at most 5 s).
pub(crate) async fn serve<L: Accept>(
    listener: L,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = shutdown.wait_for(|s| *s) => { let _ = r; break; }
            a = listener.next() => a,
        };
        let tcp = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept:
                // back off a little rather than spin, and say so at most every 10 s.
                metrics.api_accept_errors.fetch_add(1, Relaxed);
                if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics.api_connections.fetch_add(1, Relaxed);
                let (router, metrics, shutdown) =
                    (router.clone(), metrics.clone(), shutdown.clone());
                tokio::spawn(async move {
                    connection(tcp, router, limits.idle_timeout, shutdown).await;
                    metrics.api_connections.fetch_sub(1, Relaxed);
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.api_refused.fetch_add(1, Relaxed);
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let max = limits.max_connections;
                    tokio::spawn(async move {
                        refuse(tcp, max).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    let all = limits.max_connections as u32;
    if tokio::time::timeout(Duration::from_secs(5), open.acquire_many(all))
        .await
        .is_err()
    {
        tracing::debug!("API connections still open at shutdown; closing them");
    }
}

/// One HTTP/1.1 connection, until it ends, times out, or the agent shuts down.
async fn connection<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    tcp: Io,
    router: Router,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let io = TokioIo::new(StallTimeout::new(tcp, idle));
    let svc = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .keep_alive(true);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended");
                }
                return;
            }
            _ = shutdown.wait_for(|s| *s), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answer a connection over the cap with a `503` and close it. The request (if the client
/// sent one) is drained briefly first, so that the close does not reset the answer away.
async fn refuse<Io: AsyncRead + AsyncWrite + Unpin>(mut tcp: Io, max: usize) {
    let body = serde_json::json!({
        "error": format!(
            "the agent already serves {max} API connections (api_max_connections); close idle clients or watches, or raise api_max_connections, and retry"
        )
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await?;
            drained += n;
            if n == 0 || drained > 64 << 10 {
                return Ok::<(), io::Error>(());
            }
        }
    })
    .await;
}

/// An I/O object whose writes fail with `TimedOut` once one has made no progress for
/// `limit` (a peer that stopped reading its responses). Reads are passed through untouched:
/// a silent client is handled by hyper's header timeout, and a watch stream's client sends
/// nothing for as long as it listens.
pub(crate) struct StallTimeout<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallTimeout<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        StallTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a write returned `Pending`: fail once it has been pending for `limit`.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client has not read its response for too long",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that never accepts a byte.
    struct Stuck;
    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_times_out() {
        let mut w = StallTimeout::new(Stuck, Duration::from_millis(50));
        let t = Instant::now();
        let e = w.write_all(b"hello").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
