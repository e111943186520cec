//! The Unix socket a host and a plugin talk over, watched for readability only.
//!
//! tokio's `UnixStream` asks epoll for both readable and writable events. A Unix stream
//! socket tells its peer's waiters "writable again" every time it reads (the kernel's
//! `unix_write_space`), so with both registered each request the plugin read woke the host's
//! waiting thread, and each reply the host read woke the plugin, to find nothing to do: one
//! futile thread wake-up per message, on a virtual machine as costly as the message itself.
//! [`UnixConnection`] writes straight to the socket and registers for writability (through a
//! duplicate of the descriptor) only while a write finds the socket's buffer full.

use std::{
    io::{self, IoSlice, Read, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
};

use tokio::io::{unix::AsyncFd, AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream socket for `h2`: readable interest always, writable interest only
/// while a write waits for room.
#[derive(Debug)]
pub struct UnixConnection {
    read: AsyncFd<UnixStream>,
    /// A duplicate of the socket registered for writability, present only while a write
    /// would block (dropping it deregisters it).
    write: Option<AsyncFd<OwnedFd>>,
    /// While set, a read tries the socket even when the reactor has not reported it
    /// readable: a caller spinning for an answer sees it without waiting for a wake-up.
    eager: Arc<AtomicBool>,
}

impl UnixConnection {
    /// Takes over a connected tokio stream. Must be called inside a tokio runtime.
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        Ok(Self {
            read: register(stream.into_std()?, Interest::READABLE)?,
            write: None,
            eager: Arc::default(),
        })
    }

    /// The switch that makes reads try the socket without waiting for the reactor (for a
    /// caller that busy-polls the connection for an answer it expects soon).
    pub fn eager_reads(&self) -> Arc<AtomicBool> {
        self.eager.clone()
    }

    /// Runs `write` until it does not block, registering for writability when it does.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.read.get_ref()) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                done => {
                    // Room again (or a real error): stop hearing about writability.
                    self.write = None;
                    return Poll::Ready(done);
                }
            }
            let watch = match &mut self.write {
                Some(watch) => watch,
                none => {
                    let duplicate = self.read.get_ref().as_fd().try_clone_to_owned()?;
                    none.insert(register(duplicate, Interest::WRITABLE)?)
                }
            };
            // Ready means "writable since the guard's last clear": try the write again, and
            // if it still blocks the next turn waits for the next edge.
            ready!(watch.poll_write_ready(cx))?.clear_ready();
        }
    }
}

/// Registers a descriptor this module owns with the runtime's reactor.
#[allow(unsafe_code)]
fn register<T: AsRawFd>(owned: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is a `UnixStream` or an `OwnedFd` owned by the returned `AsyncFd`: the
    // descriptor stays open, and stays the same, until the `AsyncFd` drops (nothing here
    // hands out `&mut T`).
    Ok(unsafe { AsyncFd::register_with_interest(owned, interest) }?)
}

impl AsyncRead for UnixConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = match this.read.poll_read_ready(cx) {
                Poll::Ready(guard) => guard?,
                Poll::Pending if this.eager.load(Ordering::Relaxed) => {
                    // The reactor learns of new data only when a thread parks: look now.
                    let unfilled = buf.initialize_unfilled();
                    match this.read.get_ref().read(unfilled) {
                        Ok(read) => {
                            buf.advance(read);
                            return Poll::Ready(Ok(()));
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            return Poll::Pending
                        }
                        Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                }
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(read)) => {
                    // A short read emptied the socket: wait for the next event instead of
                    // finding out with one more read (as tokio's own streams do).
                    if read > 0 && read < room {
                        guard.clear_ready();
                    }
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                // Would block: readiness cleared, wait for the next event.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for UnixConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.read.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt, task::Waker};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// The event masks this process's epoll instances hold for the socket `fd` refers to,
    /// whichever descriptor registered it (from `/proc/self/fdinfo`; an epoll instance can
    /// be open under several descriptors, so entries are told apart by their lines).
    fn registrations(fd: &impl AsRawFd) -> Vec<u32> {
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino();
        let mut entries = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap() {
            let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let field = |name: &str| {
                    let mut words = line.split_whitespace();
                    words.find(|w| *w == name)?;
                    words.next().map(str::to_owned)
                };
                let (Some(events), Some(ino)) = (field("events:"), line.split("ino:").nth(1))
                else {
                    continue;
                };
                let ino = ino.split_whitespace().next().unwrap_or_default();
                if u64::from_str_radix(ino, 16) == Ok(inode) {
                    entries.insert(line.to_owned(), u32::from_str_radix(&events, 16).unwrap());
                }
            }
        }
        entries.into_values().collect()
    }

    #[tokio::test]
    async fn the_socket_is_watched_for_writability_only_while_a_write_waits_for_room() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut connection = UnixConnection::new(ours).unwrap();
        let watched = registrations(connection.read.get_ref());
        assert_eq!(watched.len(), 1, "{watched:x?}");
        assert_eq!(watched[0] & (EPOLLIN | EPOLLOUT), EPOLLIN, "{watched:x?}");

        // Write until the socket's buffer is full (the peer reads nothing yet).
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut written = 0;
        while let Poll::Ready(n) = Pin::new(&mut connection).poll_write(&mut cx, &chunk) {
            written += n.unwrap();
        }
        let watched = registrations(connection.read.get_ref());
        assert_eq!(watched.len(), 2, "{watched:x?}");
        assert_eq!(
            watched.iter().filter(|m| *m & EPOLLOUT != 0).count(),
            1,
            "{watched:x?}"
        );

        // The peer drains it; the rest of the write goes through, and the writable watch
        // goes away with the first write that does not block.
        let mut theirs = UnixConnection::new(theirs).unwrap();
        let total = written + 3 * chunk.len();
        let reader = tokio::spawn(async move {
            let mut received = vec![0; total];
            theirs.read_exact(&mut received).await.unwrap();
            received
        });
        let mut rest = total - written;
        let mut offset = written % chunk.len();
        while rest > 0 {
            let end = chunk.len().min(offset + rest);
            connection.write_all(&chunk[offset..end]).await.unwrap();
            rest -= end - offset;
            offset = 0;
        }
        let received = reader.await.unwrap();
        assert!(received
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % chunk.len() % 251) as u8));
        assert!(connection.write.is_none());
        let watched = registrations(connection.read.get_ref());
        assert_eq!(watched.len(), 1, "{watched:x?}");
        assert_eq!(watched[0] & (EPOLLIN | EPOLLOUT), EPOLLIN, "{watched:x?}");
    }

    #[tokio::test]
    async fn messages_go_both_ways_and_a_shutdown_ends_the_peers_reads() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (
            UnixConnection::new(a).unwrap(),
            UnixConnection::new(b).unwrap(),
        );
        a.write_all(b"ping").await.unwrap();
        let mut buffer = [0; 4];
        b.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"ping");
        b.write_all(b"pong").await.unwrap();
        a.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"pong");
        a.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(b.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn eager_reads_find_data_the_reactor_has_not_reported() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut ours = UnixConnection::new(ours).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut buffer = [0; 8];
        let mut read = ReadBuf::new(&mut buffer);
        assert!(Pin::new(&mut ours)
            .poll_read(&mut cx, &mut read)
            .is_pending());
        // Written now, and this thread does not turn the reactor before reading.
        let mut theirs = theirs.into_std().unwrap();
        theirs.write_all(b"pong").unwrap();
        assert!(
            Pin::new(&mut ours)
                .poll_read(&mut cx, &mut read)
                .is_pending(),
            "not reported yet"
        );
        ours.eager_reads().store(true, Ordering::Relaxed);
        assert!(Pin::new(&mut ours).poll_read(&mut cx, &mut read).is_ready());
        assert_eq!(read.filled(), b"pong");
        assert!(
            Pin::new(&mut ours)
                .poll_read(&mut cx, &mut read)
                .is_pending(),
            "nothing more"
        );
    }
}
