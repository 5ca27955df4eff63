//! Relaying a connection's bytes both ways once the gateway has let it
//! through: counted as they pass (so the log has them however the
//! connection ends), and ended when neither side has sent anything for
//! [`IDLE`]: the gateway takes at most so many connections, and an agent
//! must not hold them all open doing nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Longer than any keep-alive that streaming APIs, git or package
/// registries use, so only connections nobody uses end.
pub const IDLE: Duration = Duration::from_secs(10 * 60);

/// What the log says of a connection ended for its silence.
pub fn idle_note() -> String {
    format!("closed: nothing sent either way for {} minutes", IDLE.as_secs() / 60)
}

/// What passed, and why the relay ended.
#[derive(Debug, Default, PartialEq)]
pub struct Relayed {
    /// Bytes from the agent's side, and from the far side.
    pub up: u64,
    pub down: u64,
    /// Ended because nothing moved for the idle time.
    pub idle: bool,
}

/// Copies `agent` to `far` and back until both have ended, one fails, or
/// nothing moves either way for `idle`.
pub async fn relay<A, B>(agent: &mut A, far: &mut B, idle: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte read on either side.
    let (last, up, down) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut a = Counted { inner: agent, count: &up, last: &last, start };
    let mut b = Counted { inner: far, count: &down, last: &last, start };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut timed_out = false;
    loop {
        let seen = last.load(Ordering::Relaxed);
        tokio::select! {
            _ = &mut copy => break,
            _ = tokio::time::sleep_until(start + Duration::from_millis(seen) + idle) => {
                if last.load(Ordering::Relaxed) == seen {
                    timed_out = true;
                    break;
                }
            }
        }
    }
    Relayed { up: up.load(Ordering::Relaxed), down: down.load(Ordering::Relaxed), idle: timed_out }
}

/// A stream whose reads are counted and time-stamped.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    count: &'a AtomicU64,
    last: &'a AtomicU64,
    start: Instant,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.count.fetch_add(read, Ordering::Relaxed);
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection that keeps talking outlives the idle time many times
    /// over; one that falls silent ends an idle time after its last byte,
    /// its bytes counted.
    #[tokio::test(start_paused = true)]
    async fn silence_ends_a_connection_and_talk_keeps_it() {
        let idle = Duration::from_secs(60);
        let (mut agent, mut agent_end) = tokio::io::duplex(1 << 16);
        let (mut far, mut far_end) = tokio::io::duplex(1 << 16);
        let relayed = tokio::spawn(async move { relay(&mut agent_end, &mut far_end, idle).await });
        let started = Instant::now();
        let mut buf = [0u8; 16];
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            agent.write_all(b"ping").await.unwrap();
            far.read_exact(&mut buf[..4]).await.unwrap();
            far.write_all(b"pong!").await.unwrap();
            agent.read_exact(&mut buf[..5]).await.unwrap();
        }
        assert!(!relayed.is_finished(), "ended while both sides talked");
        let quiet_from = Instant::now();
        let relayed = tokio::time::timeout(2 * idle, relayed).await.expect("still open after the idle time").unwrap();
        assert_eq!(relayed, Relayed { up: 40, down: 50, idle: true });
        let quiet = quiet_from.elapsed();
        assert!(quiet >= idle && quiet < idle + Duration::from_secs(1), "{quiet:?}");
        assert!(started.elapsed() > 8 * idle);
        // Both ends see the connection closed.
        assert_eq!(agent.read(&mut buf).await.unwrap(), 0);
        assert_eq!(far.read(&mut buf).await.unwrap(), 0);
    }

    /// One that ends on its own is no idle one.
    #[tokio::test(start_paused = true)]
    async fn an_ended_connection_is_not_idle() {
        let (mut agent, mut agent_end) = tokio::io::duplex(1 << 16);
        let (mut far, mut far_end) = tokio::io::duplex(1 << 16);
        let relayed = tokio::spawn(async move { relay(&mut agent_end, &mut far_end, IDLE).await });
        agent.write_all(b"request").await.unwrap();
        agent.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        far.write_all(b"answer").await.unwrap();
        drop(far);
        assert_eq!(relayed.await.unwrap(), Relayed { up: 7, down: 6, idle: false });
        let mut answer = Vec::new();
        agent.read_to_end(&mut answer).await.unwrap();
        assert_eq!((got, answer), (b"request".to_vec(), b"answer".to_vec()));
    }
}
