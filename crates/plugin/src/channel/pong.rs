//! Holds a lone HTTP/2 PING acknowledgement back until the host's next write.
//!
//! A grpc-go server (every go-plugin plugin) estimates the connection's bandwidth with a PING
//! it sends on a request's DATA frame whenever no estimate is out, so with small messages it
//! pings on every call: the plugin writes a window update and a PING before it runs the
//! function, the host wakes for them and writes the acknowledgement, and wakes again for the
//! answer. An estimate stays out until its acknowledgement arrives, so an acknowledgement
//! that follows the next request's frames spares that request its PING: the plugin answers
//! it in one write, and the host wakes once. Half the calls of a busy connection go without
//! a PING, and no acknowledgement costs a write of its own (BENCHMARKS.md, issue 15).
//!
//! An acknowledgement goes out behind the next bytes written, or after [`HOLD_AT_MOST`] when
//! nothing is written by then (a plugin that stops gracefully waits for it). It is held only
//! on a busy connection, one whose request came within that time of the write before: on a
//! quiet one the next request is not likely to come first, and the timer would only add a
//! wake-up for the host and one for the plugin. Only a PING acknowledgement written alone is
//! held; everything else passes through unchanged.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// The longest an acknowledgement waits for a write to go with; also how close together
/// writes come on a connection busy enough to hold one.
pub(crate) const HOLD_AT_MOST: Duration = Duration::from_millis(10);

/// A PING frame with the ACK flag: a 9-byte header (length 8, type 6, flags 1, stream 0) and
/// 8 bytes of opaque data.
const PONG_LEN: usize = 17;
const PONG_HEADER: [u8; 9] = [0, 0, 8, 6, 1, 0, 0, 0, 0];

/// The most slices a write may have for the acknowledgement to go behind them (the
/// connection writes one); a write with more leaves it held for the next.
const MAX_SLICES: usize = 7;

/// A socket under an HTTP/2 client that holds back a PING acknowledgement written alone.
#[derive(Debug)]
pub(crate) struct HeldPong<T> {
    inner: T,
    /// The held acknowledgement, of which `written` bytes are out (the rest must go before
    /// anything else once some are).
    pong: [u8; PONG_LEN],
    written: usize,
    /// When the held acknowledgement goes out on its own; `Some` exactly while one is held.
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the last write other than a held acknowledgement went out, and whether it came
    /// within `busy_within` of the one before.
    last_write: Option<Instant>,
    busy: bool,
    busy_within: Duration,
}

impl<T: AsyncWrite> HeldPong<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            pong: [0; PONG_LEN],
            written: 0,
            deadline: None,
            last_write: None,
            busy: false,
            busy_within: HOLD_AT_MOST,
        }
    }
}

impl<T: AsyncWrite + Unpin> HeldPong<T> {
    fn held(&self) -> bool {
        self.deadline.is_some()
    }

    /// Holds `bufs` if they are one PING acknowledgement, none is held yet and the
    /// connection is busy: its last two writes came close together, the last one just now
    /// (a PING after a pause, a keepalive's say, is acknowledged at once).
    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> bool {
        // Cheapest first: most writes are requests, turned away by their length before the
        // clock is read.
        if bufs.iter().map(|b| b.len()).sum::<usize>() != PONG_LEN
            || self.held()
            || !self.busy
            || !self.inner.is_write_vectored()
            || self
                .last_write
                .is_none_or(|at| at.elapsed() >= self.busy_within)
        {
            return false;
        }
        let mut frame = [0; PONG_LEN];
        let mut at = 0;
        for buf in bufs {
            frame[at..at + buf.len()].copy_from_slice(buf);
            at += buf.len();
        }
        if frame[..PONG_HEADER.len()] != PONG_HEADER {
            return false;
        }
        self.pong = frame;
        self.written = 0;
        self.deadline = Some(Box::pin(tokio::time::sleep(HOLD_AT_MOST)));
        true
    }

    /// Writes the rest of a partly written acknowledgement, which must precede anything else.
    fn finish_pong(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.written > 0 {
            ready!(self.release(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes (more of) the held acknowledgement on its own.
    fn release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held() {
            ready!(self.write_pong(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn write_pong(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pong[self.written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.wrote_pong(n);
        Poll::Ready(Ok(()))
    }

    fn wrote_pong(&mut self, n: usize) {
        self.written += n;
        if self.written == PONG_LEN {
            // Cancelled: left armed, it would wake the connection's task for nothing.
            self.deadline = None;
        }
    }

    fn poll_write_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.finish_pong(cx))?;
        if self.hold(bufs) {
            // The connection writes after its last read of a turn, so it may not read
            // again before the deadline: the timer must wake it by itself.
            if let Some(deadline) = &mut self.deadline {
                let _ = deadline.as_mut().poll(cx);
            }
            return Poll::Ready(Ok(PONG_LEN));
        }
        let written = ready!(self.write_through(cx, bufs))?;
        let now = Instant::now();
        self.busy = self
            .last_write
            .is_some_and(|at| now.duration_since(at) < self.busy_within);
        self.last_write = Some(now);
        Poll::Ready(Ok(written))
    }

    /// Writes `bufs`, and a held acknowledgement behind them if they leave room.
    fn write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.held() || bufs.len() > MAX_SLICES {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        let given: usize = bufs.iter().map(|b| b.len()).sum();
        let mut slices = [IoSlice::new(&[]); MAX_SLICES + 1];
        slices[..bufs.len()].copy_from_slice(bufs);
        slices[bufs.len()] = IoSlice::new(&self.pong[self.written..]);
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..=bufs.len()]))?;
        if n <= given {
            return Poll::Ready(Ok(n));
        }
        self.wrote_pong(n - given);
        Poll::Ready(Ok(given))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeldPong<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The connection reads whenever it is polled, and a deadline that passes wakes it
        // (through the task polling it): here the held acknowledgement goes out on its own.
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                // A write that blocks is retried when the socket has room (its wake-up polls
                // the connection, which reads again).
                if let Poll::Ready(Err(error)) = this.release(cx) {
                    return Poll::Ready(Err(error));
                }
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeldPong<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_held(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_held(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not the held acknowledgement: the connection flushes right after writing it.
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::unix::net::UnixStream as Peer};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::UnixStream,
    };

    use super::*;

    const PONG: [u8; PONG_LEN] = [0, 0, 8, 6, 1, 0, 0, 0, 0, 2, 4, 16, 16, 9, 14, 7, 7];
    /// A HEADERS frame's worth of bytes (what the next request writes).
    const FRAME: [u8; 12] = [0, 0, 3, 1, 4, 0, 0, 0, 1, 0x83, 0x86, 0x84];

    /// The host's end, and the plugin's as a plain non-blocking socket: a write to a Unix
    /// socket is in the peer's buffer when it returns, so a read that finds nothing proves
    /// nothing was written.
    fn pair() -> (HeldPong<UnixStream>, Peer) {
        let (host, peer) = Peer::pair().expect("a socket pair");
        host.set_nonblocking(true).expect("non-blocking");
        peer.set_nonblocking(true).expect("non-blocking");
        let host = UnixStream::from_std(host).expect("registering the socket");
        (HeldPong::new(host), peer)
    }

    /// A connection on which two requests came within a minute of each other: busy, however
    /// slow the machine.
    async fn busy_pair() -> (HeldPong<UnixStream>, Peer) {
        let (mut host, mut peer) = pair();
        host.busy_within = Duration::from_secs(60);
        for _ in 0..2 {
            host.write_all(&FRAME).await.expect("writing");
        }
        assert_eq!(written_so_far(&mut peer), [FRAME, FRAME].concat());
        (host, peer)
    }

    /// Everything written to the peer so far.
    fn written_so_far(peer: &mut Peer) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0; 256];
        loop {
            match peer.read(&mut chunk) {
                Ok(0) => panic!("the host's end shut down"),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("reading the peer: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_lone_acknowledgement_goes_behind_the_next_write() {
        let (mut host, mut peer) = busy_pair().await;
        // Split the way a vectored write may split it: still one acknowledgement.
        let (head, data) = PONG.split_at(9);
        let n = host
            .write_vectored(&[IoSlice::new(head), IoSlice::new(data)])
            .await
            .expect("holding the acknowledgement");
        assert_eq!(n, PONG_LEN);
        assert_eq!(written_so_far(&mut peer), b"");

        assert_eq!(host.write(&FRAME).await.expect("writing"), FRAME.len());
        let mut expected = FRAME.to_vec();
        expected.extend_from_slice(&PONG);
        assert_eq!(written_so_far(&mut peer), expected);
        assert!(!host.held());
        assert!(host.deadline.is_none(), "the timer is cancelled");
    }

    #[tokio::test]
    async fn a_held_acknowledgement_goes_out_alone_when_nothing_follows() {
        let (mut host, mut peer) = busy_pair().await;
        host.write_all(&PONG)
            .await
            .expect("holding the acknowledgement");
        assert_eq!(written_so_far(&mut peer), b"");
        // The connection keeps reading while nothing is written: the deadline is kept there.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 1];
            let n = host.read(&mut buf).await.expect("reading the peer");
            (n, host.held())
        });
        let got = tokio::task::spawn_blocking(move || {
            peer.set_nonblocking(false).expect("blocking");
            peer.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("a read timeout");
            let mut got = [0; PONG_LEN];
            peer.read_exact(&mut got)
                .expect("the acknowledgement went out on its own");
            peer.shutdown(std::net::Shutdown::Write)
                .expect("closing the peer");
            got
        })
        .await
        .expect("the peer");
        assert_eq!(got, PONG);
        assert_eq!(reader.await.expect("the reader"), (0, false));
    }

    #[tokio::test]
    async fn only_a_lone_acknowledgement_is_held() {
        let (mut host, mut peer) = busy_pair().await;
        let mut ping = PONG;
        ping[4] = 0; // a PING that asks for an acknowledgement
        let mut on_a_stream = PONG;
        on_a_stream[8] = 1;
        let mut pong_and_frame = PONG.to_vec();
        pong_and_frame.extend_from_slice(&FRAME);
        for bytes in [&ping[..], &on_a_stream, &pong_and_frame, &FRAME] {
            host.write_all(bytes).await.expect("writing");
            assert_eq!(written_so_far(&mut peer), bytes);
        }
    }

    #[tokio::test]
    async fn a_second_acknowledgement_takes_the_held_one_along_and_shutdown_sends_it() {
        let (mut host, mut peer) = busy_pair().await;
        let mut second = PONG;
        second[16] = 8;
        host.write_all(&PONG)
            .await
            .expect("holding the acknowledgement");
        host.write_all(&second).await.expect("writing");
        let mut expected = second.to_vec();
        expected.extend_from_slice(&PONG);
        assert_eq!(written_so_far(&mut peer), expected);

        host.write_all(&PONG)
            .await
            .expect("holding the acknowledgement");
        host.shutdown().await.expect("shutting down");
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).expect("reading to the end");
        assert_eq!(rest, PONG);
    }

    #[tokio::test]
    async fn a_quiet_connection_acknowledges_at_once() {
        let (mut host, mut peer) = pair();
        // The first request on a connection has no write just before it.
        host.write_all(&FRAME).await.expect("writing");
        host.write_all(&PONG).await.expect("writing");
        assert_eq!(written_so_far(&mut peer), [&FRAME[..], &PONG].concat());
        // Two requests further apart than the busy window.
        host.busy_within = Duration::from_millis(1);
        host.write_all(&FRAME).await.expect("writing");
        tokio::time::sleep(Duration::from_millis(5)).await;
        host.write_all(&FRAME).await.expect("writing");
        host.write_all(&PONG).await.expect("writing");
        assert_eq!(
            written_so_far(&mut peer),
            [&FRAME[..], &FRAME, &PONG].concat()
        );
        assert!(!host.held());
    }

    /// The connection reads until the socket is empty and only then writes what it queued, the
    /// acknowledgement among it: the connection may have read for the last time before the
    /// acknowledgement is held, and its timer alone must bring it back.
    #[tokio::test]
    async fn a_held_acknowledgement_wakes_its_connection_when_due() {
        struct Woken(tokio::sync::Notify);
        impl std::task::Wake for Woken {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.notify_one();
            }
        }
        let (mut host, mut peer) = busy_pair().await;
        let woken = std::sync::Arc::new(Woken(tokio::sync::Notify::new()));
        let waker = std::task::Waker::from(woken.clone());
        // The connection's last turn: it read, then wrote the acknowledgement, and waits.
        let held = Pin::new(&mut host).poll_write(&mut Context::from_waker(&waker), &PONG);
        assert!(matches!(held, Poll::Ready(Ok(PONG_LEN))));
        assert_eq!(written_so_far(&mut peer), b"");
        tokio::time::timeout(Duration::from_secs(60), woken.0.notified())
            .await
            .expect("the timer woke the connection");
        // Woken, the connection reads, and the acknowledgement goes out.
        let mut byte = [0; 1];
        let read = Pin::new(&mut host).poll_read(
            &mut Context::from_waker(std::task::Waker::noop()),
            &mut ReadBuf::new(&mut byte),
        );
        assert!(read.is_pending());
        assert!(!host.held());
        assert_eq!(written_so_far(&mut peer), PONG);
    }

    #[tokio::test]
    async fn a_ping_after_a_pause_is_acknowledged_at_once() {
        let (mut host, mut peer) = busy_pair().await;
        // Busy (its requests came close together), but quiet since longer than the window.
        assert!(host.busy);
        host.busy_within = Duration::from_millis(1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        host.write_all(&PONG).await.expect("writing");
        assert_eq!(written_so_far(&mut peer), PONG);
    }
}
