//! The connection loop both protocols run under their calls (see [`super::driver`]): write
//! what the calls queued, read what the plugin sent, hand it to the protocol, until the
//! connection ends; then every call waiting on it is told.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// What a protocol keeps between the calls and the connection.
pub(super) trait Wire: Send + Sync + 'static {
    /// Where read bytes wait until a whole frame is in.
    type Reader: Send + Unpin;

    /// Reads what `io` has into `reader`; `Ready(Ok(0))` is the end of the connection.
    fn poll_fill<T: AsyncRead + Unpin>(
        reader: &mut Self::Reader,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>>;

    /// Keeps `waker` as the one to tell when calls queue bytes, and moves what they queued
    /// into `writing` when it is empty.
    fn take_queued(&self, waker: &Waker, writing: &mut BytesMut);

    /// Hands every whole frame in `reader` to its call (what that queues is written next);
    /// an error ends the connection.
    fn deliver(&self, reader: &mut Self::Reader) -> Result<(), String>;

    /// Ends every call: the connection is gone, for `why`.
    fn close(&self, why: String);
}

/// [`Wire::take_queued`] for a protocol whose state keeps the connection's waker and the
/// queued bytes.
pub(super) fn take_queued(
    connection: &mut Option<Waker>,
    out: &mut BytesMut,
    waker: &Waker,
    writing: &mut BytesMut,
) {
    if !connection.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *connection = Some(waker.clone());
    }
    if writing.is_empty() {
        std::mem::swap(writing, out);
    }
}

/// A connection over `io` speaking `W`'s protocol; polled by the calls and the driver.
pub(super) struct Connection<T, W: Wire> {
    pub(super) io: T,
    pub(super) wire: Arc<W>,
    pub(super) reader: W::Reader,
    /// What is being written; refilled from the queue when empty.
    pub(super) writing: BytesMut,
}

impl<T: AsyncRead + AsyncWrite + Unpin, W: Wire> Future for Connection<T, W> {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let ended = loop {
            this.wire.take_queued(cx.waker(), &mut this.writing);
            if let Poll::Ready(Err(error)) =
                crate::frames::poll_write_out(&mut this.io, cx, &mut this.writing)
            {
                break Err(error.to_string());
            }
            match W::poll_fill(&mut this.reader, &mut this.io, cx) {
                Poll::Ready(Ok(0)) => break Ok(()),
                Poll::Ready(Ok(_)) => {
                    if let Err(error) = this.wire.deliver(&mut this.reader) {
                        break Err(error);
                    }
                }
                Poll::Ready(Err(error)) => break Err(error.to_string()),
                Poll::Pending => return Poll::Pending,
            }
        };
        let why = match &ended {
            Ok(()) => "the plugin closed it".to_owned(),
            Err(error) => error.clone(),
        };
        this.wire.close(why);
        Poll::Ready(ended)
    }
}
