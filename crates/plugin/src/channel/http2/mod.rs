//! gRPC calls to a plugin over HTTP/2, with a client made for it: a go-plugin server (grpc-go)
//! answers it unchanged.
//!
//! `h2` is a general HTTP/2 implementation: a stream store, priorities, header maps, a task
//! per body. A plugin call needs one HEADERS and one DATA frame out and a head, a message and
//! trailers back; on this VM `h2` cost ~35 µs on the path of every call (BENCHMARKS.md, issue
//! 15). Here a call appends its frames to the connection's outgoing bytes (its header block
//! is the connection's constant fields, encoded once, plus its path, deadline and metadata;
//! nothing is added to the server's decoding table) and waits for its answer by stream id,
//! the way the frame protocol's calls do (`super::frames`); whoever polls the connection
//! writes, reads and hands each answer to its call. Flow control, settings, pings, resets and
//! GOAWAY are handled as RFC 7540 says; what a unary call does not need (priorities, server
//! push, trailers from the client) is not offered.

mod hpack;
mod huffman_table;

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use tokio::{io::AsyncRead, sync::mpsc};
use tonic::{Code, Status};

use super::{
    broken,
    driver::{BusyPoll, Driver},
    pong::HeldPong,
    wire::{self, Connection, Wire},
    Io,
};
use crate::framing::{self, FrameError};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 7540 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Error codes (RFC 7540 §7).
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

/// The frames we take: the default, which we never raise.
const MAX_FRAME: usize = 16_384;
/// What a stream may receive before it acknowledges: a whole answer at the message limit.
const STREAM_WINDOW: u32 = (framing::MAX_MESSAGE_BYTES + 1024) as u32;
/// What the connection may receive before it acknowledges.
const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;
/// The HPACK table we let the server use (the protocol's default).
const HEADER_TABLE: usize = 4096;
/// How many stdio chunks may wait for the relay before more are dropped.
const STREAM_BACKLOG: usize = 1024;

/// A connection to one plugin process; cheap to share between concurrent calls.
#[derive(Clone)]
pub(crate) struct Http2Channel {
    shared: Arc<Shared>,
    driver: Arc<Driver>,
}

impl std::fmt::Debug for Http2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Channel").finish_non_exhaustive()
    }
}

/// What the callers and the connection share.
struct Shared(Mutex<State>);

struct State {
    /// Frames queued for the next write.
    out: BytesMut,
    streams: HashMap<u32, Stream>,
    next_id: u32,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// The server is going away: no new calls.
    going_away: bool,
    /// The connection's waker: told when frames are queued.
    connection: Option<Waker>,
    /// Calls waiting for a stream while the server's limit is reached.
    waiting: Vec<Waker>,
    /// The header fields every request carries, encoded once: the pseudo-fields before the
    /// path, and the fields after it (pseudo-fields come first, RFC 7540 §8.1.2.1).
    before_path: Bytes,
    after_path: Bytes,
    decoder: hpack::Decoder,
    /// A header block arriving in CONTINUATION frames: its stream, flags and bytes so far.
    partial_block: Option<(u32, u8, BytesMut)>,
    /// The server's settings.
    max_frame: usize,
    initial_window: i64,
    max_streams: usize,
    /// What we may still send on the connection.
    send_window: i64,
    /// What we received on the connection and have not yet acknowledged.
    received: u32,
}

struct Stream {
    call: Call,
    /// The answer's head came (what comes next is its message, then its trailers).
    head: bool,
    /// The answer's bytes (gRPC-framed messages) not yet taken.
    body: BytesMut,
    /// What we may still send on this stream, and what waits for more window.
    send_window: i64,
    unsent: Bytes,
    /// Received on this stream and not yet acknowledged (server streams only: a unary
    /// answer fits in the initial window).
    received: u32,
}

enum Call {
    Unary {
        answer: Option<Result<BytesMut, Status>>,
        waker: Option<Waker>,
    },
    Stream {
        items: mpsc::Sender<Bytes>,
        dropped: usize,
    },
}

/// A call's request before it is queued.
struct Request<'a> {
    path: &'static str,
    body: Bytes,
    timeout: Option<Duration>,
    metadata: &'a [(HeaderName, HeaderValue)],
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request and registers its call, once the server takes another stream.
    fn poll_start(
        &self,
        cx: &mut Context<'_>,
        request: &Request<'_>,
        call: &mut Option<Call>,
    ) -> Poll<Result<u32, Status>> {
        let mut state = self.lock();
        if let Some(why) = &state.closed {
            return Poll::Ready(Err(broken(why)));
        }
        if state.going_away {
            return Poll::Ready(Err(Status::unavailable(
                "the plugin is closing its connection; the call was not sent",
            )));
        }
        if state.streams.len() >= state.max_streams {
            state.waiting.push(cx.waker().clone());
            return Poll::Pending;
        }
        let id = state.next_id;
        if id > 0x7fff_ffff {
            // Stream ids are spent after 2^30 calls: the connection cannot go on.
            return Poll::Ready(Err(broken(&"its stream ids are spent")));
        }
        state.next_id += 2;
        let Some(call) = call.take() else {
            return Poll::Ready(Err(Status::internal("a call was started twice")));
        };
        state.put_headers(id, request);
        let send_window = state.initial_window;
        state.streams.insert(
            id,
            Stream {
                call,
                head: false,
                body: BytesMut::new(),
                send_window,
                unsent: request.body.clone(),
                received: 0,
            },
        );
        state.send_pending(id);
        let connection = state.connection.clone();
        drop(state);
        if let Some(connection) = connection {
            connection.wake();
        }
        Poll::Ready(Ok(id))
    }

    fn poll_answer(&self, id: u32, cx: &mut Context<'_>) -> Poll<Result<BytesMut, Status>> {
        let mut state = self.lock();
        let closed = state.closed.clone();
        let Some(Stream {
            call: Call::Unary { answer, waker },
            ..
        }) = state.streams.get_mut(&id)
        else {
            return Poll::Ready(Err(Status::internal("the call was forgotten")));
        };
        if let Some(answer) = answer.take() {
            state.end_stream(id);
            return Poll::Ready(answer);
        }
        if let Some(why) = closed {
            state.end_stream(id);
            return Poll::Ready(Err(broken(&why)));
        }
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl State {
    fn new(authority: &str) -> Self {
        // :method POST and :scheme http, from the static table.
        let before_path = Bytes::from_static(&[0x83, 0x86]);
        let mut after_path = BytesMut::new();
        literal(&mut after_path, 1, None, authority.as_bytes());
        literal(&mut after_path, 31, None, framing::CONTENT_TYPE.as_bytes());
        literal(&mut after_path, 0, Some(b"te"), b"trailers");
        let mut out = BytesMut::new();
        out.put_slice(PREFACE);
        let mut settings = BytesMut::new();
        for (id, value) in [(0x2u16, 0u32), (0x4, STREAM_WINDOW)] {
            settings.put_u16(id);
            settings.put_u32(value);
        }
        put_frame(&mut out, SETTINGS, 0, 0, &settings);
        put_frame(
            &mut out,
            WINDOW_UPDATE,
            0,
            0,
            &(CONNECTION_WINDOW - 65_535).to_be_bytes(),
        );
        Self {
            out,
            streams: HashMap::new(),
            next_id: 1,
            closed: None,
            going_away: false,
            connection: None,
            waiting: Vec::new(),
            before_path,
            after_path: after_path.freeze(),
            decoder: hpack::Decoder::new(HEADER_TABLE),
            partial_block: None,
            max_frame: MAX_FRAME,
            initial_window: 65_535,
            max_streams: usize::MAX,
            send_window: 65_535,
            received: 0,
        }
    }

    /// Queues a request's HEADERS (and CONTINUATION frames if its block is large).
    fn put_headers(&mut self, id: u32, request: &Request<'_>) {
        let mut block = BytesMut::with_capacity(self.after_path.len() + 96);
        block.put_slice(&self.before_path);
        literal(&mut block, 4, None, request.path.as_bytes());
        block.put_slice(&self.after_path);
        if let Some(timeout) = request.timeout {
            literal(
                &mut block,
                0,
                Some(b"grpc-timeout"),
                framing::timeout_header(timeout).as_bytes(),
            );
        }
        for (name, value) in request.metadata {
            literal(
                &mut block,
                0,
                Some(name.as_str().as_bytes()),
                value.as_bytes(),
            );
        }
        let mut block = block.freeze();
        let mut kind = HEADERS;
        loop {
            let chunk = block.split_to(block.len().min(self.max_frame));
            let flags = if block.is_empty() { END_HEADERS } else { 0 };
            put_frame(&mut self.out, kind, flags, id, &chunk);
            if block.is_empty() {
                break;
            }
            kind = CONTINUATION;
        }
    }

    /// Queues what the windows allow of a stream's request body; the last frame ends it.
    fn send_pending(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.unsent.is_empty() {
            return;
        }
        loop {
            let room = self.send_window.min(stream.send_window).max(0) as usize;
            let len = stream.unsent.len().min(room).min(self.max_frame);
            if len == 0 {
                return;
            }
            let chunk = stream.unsent.split_to(len);
            let flags = if stream.unsent.is_empty() {
                END_STREAM
            } else {
                0
            };
            put_frame(&mut self.out, DATA, flags, id, &chunk);
            self.send_window -= len as i64;
            stream.send_window -= len as i64;
            if stream.unsent.is_empty() {
                return;
            }
        }
    }

    /// Forgets a stream and lets a call waiting for one start.
    fn end_stream(&mut self, id: u32) {
        if self.streams.remove(&id).is_some() {
            for waker in self.waiting.drain(..) {
                waker.wake();
            }
        }
    }

    /// Ends a stream early: its call gets `status`, the server a reset.
    fn fail_stream(&mut self, id: u32, status: Status) {
        if !self.streams.contains_key(&id) {
            return;
        }
        put_frame(&mut self.out, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        self.answer(id, Err(status));
        self.end_stream_if_stream(id);
    }

    /// Handles one frame from the server; an error ends the connection.
    fn receive(&mut self, kind: u8, flags: u8, id: u32, mut payload: Bytes) -> Result<(), String> {
        if let Some((block_id, _, _)) = &self.partial_block {
            if kind != CONTINUATION || id != *block_id {
                return Err("a header block was interrupted".into());
            }
        }
        match kind {
            DATA => {
                let size = payload.len() as u32;
                self.received += size;
                if self.received >= CONNECTION_WINDOW / 2 {
                    let increment = std::mem::take(&mut self.received);
                    put_frame(&mut self.out, WINDOW_UPDATE, 0, 0, &increment.to_be_bytes());
                }
                let data = unpad(flags, &mut payload)?;
                self.data(id, size, data, flags & END_STREAM != 0);
            }
            HEADERS | CONTINUATION => {
                let (block_id, block_flags, block) = if kind == HEADERS {
                    let mut fragment = unpad(flags, &mut payload)?;
                    if flags & PRIORITY != 0 {
                        if fragment.len() < 5 {
                            return Err("a HEADERS frame too short for its priority".into());
                        }
                        fragment.advance(5);
                    }
                    (id, flags, BytesMut::from(&fragment[..]))
                } else {
                    let Some((block_id, block_flags, mut block)) = self.partial_block.take() else {
                        return Err("a CONTINUATION frame outside a header block".into());
                    };
                    block.put_slice(&payload);
                    (block_id, block_flags | (flags & END_HEADERS), block)
                };
                if block_flags & END_HEADERS == 0 {
                    if block.len() > 1 << 20 {
                        return Err("a header block over 1 MiB".into());
                    }
                    self.partial_block = Some((block_id, block_flags, block));
                    return Ok(());
                }
                self.headers(block_id, block_flags & END_STREAM != 0, &block)?;
            }
            RST_STREAM => {
                if payload.len() != 4 {
                    return Err("a RST_STREAM frame of the wrong size".into());
                }
                let code = payload.get_u32();
                let status = match code {
                    CANCEL => Status::cancelled("the plugin cancelled the call"),
                    REFUSED_STREAM => {
                        Status::unavailable("the plugin refused the call before processing it")
                    }
                    code => Status::internal(format!(
                        "the plugin reset the call (HTTP/2 error code {code})"
                    )),
                };
                self.answer(id, Err(status));
                self.end_stream_if_stream(id);
            }
            SETTINGS => {
                if flags & ACK != 0 {
                    return Ok(());
                }
                if !payload.len().is_multiple_of(6) {
                    return Err("a SETTINGS frame of the wrong size".into());
                }
                while payload.has_remaining() {
                    let (setting, value) = (payload.get_u16(), payload.get_u32());
                    match setting {
                        0x3 => self.max_streams = value as usize,
                        0x4 => {
                            if value > 0x7fff_ffff {
                                return Err("an initial window over 2^31-1".into());
                            }
                            let delta = i64::from(value) - self.initial_window;
                            self.initial_window = i64::from(value);
                            for stream in self.streams.values_mut() {
                                stream.send_window += delta;
                            }
                        }
                        0x5 => {
                            if !(16_384..=16_777_215).contains(&value) {
                                return Err("a maximum frame size out of range".into());
                            }
                            self.max_frame = value as usize;
                        }
                        _ => {}
                    }
                }
                put_frame(&mut self.out, SETTINGS, ACK, 0, &[]);
                self.send_all_pending();
                for waker in self.waiting.drain(..) {
                    waker.wake();
                }
            }
            PING => {
                if payload.len() != 8 {
                    return Err("a PING frame of the wrong size".into());
                }
                if flags & ACK == 0 {
                    // Written alone, `HeldPong` keeps it for the next request (see pong.rs).
                    put_frame(&mut self.out, PING, ACK, 0, &payload);
                }
            }
            GOAWAY => {
                if payload.len() < 8 {
                    return Err("a GOAWAY frame too short".into());
                }
                let last = payload.get_u32() & 0x7fff_ffff;
                self.going_away = true;
                let unprocessed: Vec<u32> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|&id| id > last)
                    .collect();
                for id in unprocessed {
                    self.answer(
                        id,
                        Err(Status::unavailable(
                            "the plugin closed its connection before processing the call",
                        )),
                    );
                    self.end_stream_if_stream(id);
                }
            }
            WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err("a WINDOW_UPDATE frame of the wrong size".into());
                }
                let increment = i64::from(payload.get_u32() & 0x7fff_ffff);
                if id == 0 {
                    self.send_window += increment;
                    self.send_all_pending();
                } else if let Some(stream) = self.streams.get_mut(&id) {
                    stream.send_window += increment;
                    self.send_pending(id);
                }
            }
            PUSH_PROMISE => return Err("a PUSH_PROMISE, though push is off".into()),
            _ => {}
        }
        Ok(())
    }

    fn send_all_pending(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.unsent.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.send_pending(id);
        }
    }

    fn data(&mut self, id: u32, size: u32, data: Bytes, end: bool) {
        let Some(stream) = self.streams.get_mut(&id) else {
            // A call the host gave up on: its bytes only count for the connection.
            return;
        };
        if matches!(
            stream.call,
            Call::Unary {
                answer: Some(_),
                ..
            }
        ) {
            // Failed already (an answer over the limit): the rest is dropped.
            return;
        }
        stream.body.put_slice(&data);
        match &mut stream.call {
            Call::Unary { .. } => {
                if stream.body.len() > framing::MAX_MESSAGE_BYTES + 5 {
                    let status = Status::resource_exhausted(format!(
                        "the plugin's reply is larger than {} bytes",
                        framing::MAX_MESSAGE_BYTES
                    ));
                    self.fail_stream(id, status);
                    return;
                }
            }
            Call::Stream { items, dropped } => {
                stream.received += size;
                if stream.received >= STREAM_WINDOW / 2 {
                    let increment = std::mem::take(&mut stream.received);
                    put_frame(
                        &mut self.out,
                        WINDOW_UPDATE,
                        0,
                        id,
                        &increment.to_be_bytes(),
                    );
                }
                loop {
                    match framing::take_raw(&mut stream.body) {
                        Ok(Some(message)) => match items.try_send(message) {
                            Ok(()) => {
                                if *dropped > 0 {
                                    tracing::warn!(chunks = *dropped, "a plugin's output came faster than it was logged; chunks were dropped");
                                    *dropped = 0;
                                }
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => *dropped += 1,
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                self.fail_stream(id, Status::cancelled("nobody reads the stream"));
                                return;
                            }
                        },
                        Ok(None) => break,
                        Err(error) => {
                            tracing::warn!(%error, "a plugin's stream message does not fit; the stream ends");
                            self.fail_stream(id, Status::resource_exhausted(error.to_string()));
                            return;
                        }
                    }
                }
            }
        }
        if end {
            // gRPC ends an answer with trailers; a body that ends the stream has no status.
            self.answer(
                id,
                Err(Status::internal(
                    "the plugin's answer ended without a gRPC status",
                )),
            );
            self.end_stream_if_stream(id);
        }
    }

    fn headers(&mut self, id: u32, end: bool, block: &[u8]) -> Result<(), String> {
        let (mut status, mut grpc_status, mut grpc_message) = (None, None, None);
        // Decoded whatever the stream: the table is the connection's.
        self.decoder
            .decode(block, |name, value| match name {
                b":status" => status = Some(value.to_vec()),
                b"grpc-status" => grpc_status = Some(value.to_vec()),
                b"grpc-message" => grpc_message = Some(value.to_vec()),
                _ => {}
            })
            .map_err(|e| e.to_string())?;
        let Some(stream) = self.streams.get_mut(&id).filter(|s| {
            !matches!(
                s.call,
                Call::Unary {
                    answer: Some(_),
                    ..
                }
            )
        }) else {
            return Ok(());
        };
        if !stream.head {
            stream.head = true;
            if status.as_deref() != Some(b"200") {
                let status =
                    String::from_utf8_lossy(status.as_deref().unwrap_or(b"none")).into_owned();
                self.fail_stream(
                    id,
                    Status::unknown(format!("the plugin answered HTTP status {status}")),
                );
                return Ok(());
            }
        } else if !end {
            return Err("a third header block on a stream".into());
        }
        if !end {
            return Ok(());
        }
        let result = match grpc_status {
            None => Err(Status::internal(
                "the plugin's answer ended without a gRPC status",
            )),
            Some(code) => {
                let code = std::str::from_utf8(&code)
                    .ok()
                    .and_then(|c| c.parse::<i32>().ok())
                    .map_or(Code::Unknown, Code::from_i32);
                if code == Code::Ok {
                    Ok(std::mem::take(&mut stream.body))
                } else {
                    let message = grpc_message
                        .as_deref()
                        .map(percent_decode)
                        .unwrap_or_default();
                    Err(Status::new(code, message))
                }
            }
        };
        self.answer(id, result);
        self.end_stream_if_stream(id);
        Ok(())
    }

    /// Gives a unary call its answer and wakes it (it forgets its stream when it takes it).
    fn answer(&mut self, id: u32, result: Result<BytesMut, Status>) {
        if let Some(Stream {
            call: Call::Unary { answer, waker },
            unsent,
            ..
        }) = self.streams.get_mut(&id)
        {
            *answer = Some(result);
            *unsent = Bytes::new();
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
    }

    /// Forgets a server stream that ended (its reader sees the end when the sender drops).
    fn end_stream_if_stream(&mut self, id: u32) {
        if matches!(
            self.streams.get(&id),
            Some(Stream {
                call: Call::Stream { .. },
                ..
            })
        ) {
            self.end_stream(id);
        }
    }
}

/// Appends a frame.
fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, id: u32, payload: &[u8]) {
    let len = payload.len();
    out.reserve(9 + len);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(id & 0x7fff_ffff);
    out.put_slice(payload);
}

/// Appends a header field as a literal the server does not index (RFC 7541 §6.2.2): its name
/// from the static table (`index`) or spelled out (`index` 0), its value as is.
fn literal(out: &mut BytesMut, index: usize, name: Option<&[u8]>, value: &[u8]) {
    integer(out, 4, 0x00, index);
    if let Some(name) = name {
        integer(out, 7, 0x00, name.len());
        out.put_slice(name);
    }
    integer(out, 7, 0x00, value.len());
    out.put_slice(value);
}

/// An HPACK integer with an `n`-bit prefix after the bits of `first` (RFC 7541 §5.1).
fn integer(out: &mut BytesMut, n: u8, first: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.put_u8((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.put_u8(rest as u8);
}

/// A DATA or HEADERS payload without its padding.
fn unpad(flags: u8, payload: &mut Bytes) -> Result<Bytes, String> {
    if flags & PADDED == 0 {
        return Ok(std::mem::take(payload));
    }
    let Some(&pad) = payload.first() else {
        return Err("a padded frame without its pad length".into());
    };
    let pad = usize::from(pad);
    if pad + 1 > payload.len() {
        return Err("padding longer than its frame".into());
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok(std::mem::take(payload))
}

/// `grpc-message` is percent-encoded UTF-8.
fn percent_decode(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let digits: Vec<u8> = bytes.clone().take(2).collect();
            if let Some(byte) = std::str::from_utf8(&digits)
                .ok()
                .filter(|d| d.len() == 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
            {
                out.push(byte);
                bytes.nth(1);
                continue;
            }
        }
        out.push(b);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Forgets a unary call whose caller stopped waiting, and resets its stream; its answer, if
/// it comes anyway, is dropped.
struct Forget<'a>(&'a Shared, u32);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let connection = {
            let mut state = self.0.lock();
            let Some(stream) = state.streams.get(&self.1) else {
                return;
            };
            let answered = matches!(
                stream.call,
                Call::Unary {
                    answer: Some(_),
                    ..
                }
            );
            state.end_stream(self.1);
            if answered || state.closed.is_some() {
                return;
            }
            put_frame(&mut state.out, RST_STREAM, 0, self.1, &CANCEL.to_be_bytes());
            state.connection.clone()
        };
        if let Some(connection) = connection {
            connection.wake();
        }
    }
}

impl Http2Channel {
    /// Speaks HTTP/2 over `io` to `authority`, and starts the background driver.
    pub(crate) fn connect(io: Io, busy_poll: Option<BusyPoll>, authority: &str) -> Self {
        let shared = Arc::new(Shared(Mutex::new(State::new(authority))));
        let connection = Connection {
            io: HeldPong::new(io),
            wire: shared.clone(),
            reader: BytesMut::new(),
            writing: BytesMut::new(),
        };
        let driver = Driver::start(connection, busy_poll);
        Self { shared, driver }
    }

    /// Calls `path` (`/package.Service/Method`) with `message`. `timeout` goes to the plugin as
    /// `grpc-timeout`; the caller enforces its own deadline by dropping the future, which
    /// resets the stream.
    pub(crate) async fn unary<Q, R>(
        &self,
        path: &'static str,
        message: &Q,
        timeout: Duration,
        metadata: &[(HeaderName, HeaderValue)],
    ) -> Result<R, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let request = Request {
            path,
            body: framing::encode(message),
            timeout: Some(timeout),
            metadata,
        };
        self.driver
            .driven(async {
                let mut call = Some(Call::Unary {
                    answer: None,
                    waker: None,
                });
                let id = poll_fn(|cx| self.shared.poll_start(cx, &request, &mut call)).await?;
                let _forget = Forget(&self.shared, id);
                let mut body = poll_fn(|cx| self.shared.poll_answer(id, cx)).await?;
                let message = framing::take::<R>(&mut body).map_err(|e| match e {
                    FrameError::Compressed => {
                        Status::unimplemented(format!("the plugin's answer: {e}"))
                    }
                    FrameError::TooLarge(_) => {
                        Status::resource_exhausted(format!("the plugin's answer: {e}"))
                    }
                    FrameError::Decode(_) => Status::internal(format!("the plugin's answer: {e}")),
                })?;
                let Some(message) = message else {
                    return Err(Status::internal("the plugin's answer carried no message"));
                };
                if !body.is_empty() {
                    return Err(Status::internal(
                        "the plugin answered a unary call with more than one message",
                    ));
                }
                Ok(message)
            })
            .await
    }

    /// Calls `path` expecting a stream of messages, read from the receiver. The calls and the
    /// background task drive the connection.
    pub(crate) async fn server_stream<Q: prost::Message>(
        &self,
        path: &'static str,
        message: &Q,
    ) -> Result<mpsc::Receiver<Bytes>, Status> {
        let (items, receiver) = mpsc::channel(STREAM_BACKLOG);
        let request = Request {
            path,
            body: framing::encode(message),
            timeout: None,
            metadata: &[],
        };
        let mut call = Some(Call::Stream { items, dropped: 0 });
        poll_fn(|cx| self.shared.poll_start(cx, &request, &mut call)).await?;
        Ok(receiver)
    }
}

impl Wire for Shared {
    type Reader = BytesMut;

    fn poll_fill<T: AsyncRead + Unpin>(
        reader: &mut BytesMut,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        reader.reserve(16 * 1024);
        tokio_util::io::poll_read_buf(Pin::new(io), cx, reader)
    }

    fn take_queued(&self, waker: &Waker, writing: &mut BytesMut) {
        let state = &mut *self.lock();
        wire::take_queued(&mut state.connection, &mut state.out, waker, writing);
    }

    fn deliver(&self, read: &mut BytesMut) -> Result<(), String> {
        let mut state = self.lock();
        while read.len() >= 9 {
            let len =
                (usize::from(read[0]) << 16) | (usize::from(read[1]) << 8) | usize::from(read[2]);
            if len > MAX_FRAME {
                return Err(format!(
                    "the plugin sent a {len}-byte frame, over the {MAX_FRAME} we take"
                ));
            }
            if read.len() < 9 + len {
                break;
            }
            let mut frame = read.split_to(9 + len).freeze();
            let (kind, flags) = (frame[3], frame[4]);
            let id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            frame.advance(9);
            state
                .receive(kind, flags, id, frame)
                .map_err(|error| format!("HTTP/2: {error}"))?;
        }
        Ok(())
    }

    fn close(&self, why: String) {
        let mut state = self.lock();
        state.closed = Some(why);
        for stream in state.streams.values_mut() {
            if let Call::Unary {
                waker: Some(waker), ..
            } = &mut stream.call
            {
                waker.wake_by_ref();
            }
        }
        state
            .streams
            .retain(|_, stream| matches!(stream.call, Call::Unary { .. }));
        for waker in state.waiting.drain(..) {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::either::Either;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::*;
    use crate::{framing::path, socket::UnixConnection};

    /// The plugin's end of the connection, played by the test.
    struct Peer(tokio::net::UnixStream);

    impl Peer {
        async fn frame(&mut self) -> (u8, u8, u32, Bytes) {
            let mut head = [0u8; 9];
            self.0.read_exact(&mut head).await.unwrap();
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            self.0.read_exact(&mut payload).await.unwrap();
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            (head[3], head[4], id, payload.into())
        }

        /// The next frame that is not a SETTINGS acknowledgement or a window update.
        async fn next(&mut self) -> (u8, u8, u32, Bytes) {
            loop {
                let frame = self.frame().await;
                if !(frame.0 == SETTINGS && frame.1 & ACK != 0) && frame.0 != WINDOW_UPDATE {
                    return frame;
                }
            }
        }

        async fn send(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
            let mut out = BytesMut::new();
            put_frame(&mut out, kind, flags, id, payload);
            self.0.write_all(&out).await.unwrap();
        }

        /// Reads the preface and the client's settings, sends `settings`, and waits for
        /// their acknowledgement.
        async fn accept(&mut self, settings: &[(u16, u32)]) {
            let mut preface = [0u8; 24];
            self.0.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface, PREFACE);
            let (kind, flags, _, _) = self.frame().await;
            assert_eq!((kind, flags), (SETTINGS, 0));
            let mut payload = BytesMut::new();
            for &(id, value) in settings {
                payload.put_u16(id);
                payload.put_u32(value);
            }
            self.send(SETTINGS, 0, 0, &payload).await;
            loop {
                let (kind, flags, _, _) = self.frame().await;
                if kind == SETTINGS && flags & ACK != 0 {
                    return;
                }
            }
        }

        /// Answers stream `id` with `message` and `grpc-status: 0`, the trailers split into
        /// HEADERS and CONTINUATION.
        async fn answer(&mut self, id: u32, message: &HealthCheckResponse) {
            self.send(HEADERS, END_HEADERS, id, &[0x88]).await;
            self.send(DATA, 0, id, &framing::encode(message)).await;
            let trailers = status_field(b"0");
            let (first, rest) = trailers.split_at(5);
            self.send(HEADERS, END_STREAM, id, first).await;
            self.send(CONTINUATION, END_HEADERS, id, rest).await;
        }
    }

    fn status_field(code: &[u8]) -> BytesMut {
        let mut block = BytesMut::new();
        literal(&mut block, 0, Some(b"grpc-status"), code);
        block
    }

    fn channel() -> (Http2Channel, Peer) {
        let (host, plugin) = tokio::net::UnixStream::pair().unwrap();
        let io = Either::Left(UnixConnection::new(host).unwrap());
        (Http2Channel::connect(io, None, "localhost"), Peer(plugin))
    }

    async fn check(channel: &Http2Channel, service: &str) -> Result<HealthCheckResponse, Status> {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        channel
            .unary(path::HEALTH_CHECK, &request, Duration::from_secs(30), &[])
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_waits_for_the_window_and_the_answer_finds_its_call() {
        let (channel, mut peer) = channel();
        // The server lets each stream receive 16 bytes before it grants more.
        peer.accept(&[(0x4, 16)]).await;
        let service = "s".repeat(100);
        let call = tokio::spawn({
            let channel = channel.clone();
            let service = service.clone();
            async move { check(&channel, &service).await }
        });
        let (kind, flags, id, block) = peer.next().await;
        assert_eq!((kind, flags, id), (HEADERS, END_HEADERS, 1));
        // Pseudo-fields first, the path among them.
        let mut fields = Vec::new();
        hpack::Decoder::new(4096)
            .decode(&block, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .unwrap();
        let names: Vec<&[u8]> = fields.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(
            names,
            [
                &b":method"[..],
                b":scheme",
                b":path",
                b":authority",
                b"content-type",
                b"te",
                b"grpc-timeout"
            ]
        );
        assert_eq!(fields[2].1, path::HEALTH_CHECK.as_bytes());
        let (kind, flags, _, first) = peer.next().await;
        assert_eq!((kind, flags, first.len()), (DATA, 0, 16));
        peer.send(WINDOW_UPDATE, 0, 1, &1000u32.to_be_bytes()).await;
        let (kind, flags, _, rest) = peer.next().await;
        assert_eq!((kind, flags), (DATA, END_STREAM));
        let mut body = BytesMut::from(&first[..]);
        body.put_slice(&rest);
        let request: HealthCheckRequest = framing::take(&mut body).unwrap().unwrap();
        assert_eq!(request.service, service);
        peer.answer(1, &HealthCheckResponse { status: 1 }).await;
        assert_eq!(call.await.unwrap().unwrap().status, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statuses_resets_and_goaway_end_their_calls() {
        let (channel, mut peer) = channel();
        peer.accept(&[]).await;
        let calls: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|service| {
                let channel = channel.clone();
                tokio::spawn(async move { check(&channel, service).await })
            })
            .collect();
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let (kind, _, id, _) = peer.next().await;
            if kind == HEADERS {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        assert_eq!(ids, [1, 3, 5]);
        // A trailers-only answer with an error; a reset; a GOAWAY that leaves the last one
        // unprocessed.
        let mut block = BytesMut::from(&[0x88][..]);
        block.put_slice(&status_field(b"5"));
        literal(&mut block, 0, Some(b"grpc-message"), b"not%20here");
        peer.send(HEADERS, END_HEADERS | END_STREAM, 1, &block)
            .await;
        peer.send(RST_STREAM, 0, 3, &CANCEL.to_be_bytes()).await;
        let mut goaway = BytesMut::new();
        goaway.put_u32(3);
        goaway.put_u32(0);
        peer.send(GOAWAY, 0, 0, &goaway).await;
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap().unwrap_err());
        }
        results.sort_by_key(|s| s.code() as i32);
        let got: Vec<(Code, &str)> = results.iter().map(|s| (s.code(), s.message())).collect();
        assert_eq!(
            got,
            [
                (Code::Cancelled, "the plugin cancelled the call"),
                (Code::NotFound, "not here"),
                (
                    Code::Unavailable,
                    "the plugin closed its connection before processing the call"
                ),
            ]
        );
        let refused = check(&channel, "d").await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_stream_hands_on_each_message_and_ends_with_its_trailers() {
        let (channel, mut peer) = channel();
        peer.accept(&[]).await;
        let request = HealthCheckRequest {
            service: "watch".into(),
        };
        let mut items = channel
            .server_stream(path::STREAM_STDIO, &request)
            .await
            .unwrap();
        let (kind, flags, id, _) = peer.next().await;
        assert_eq!((kind, flags), (HEADERS, END_HEADERS));
        let (kind, flags, _, _) = peer.next().await;
        assert_eq!((kind, flags), (DATA, END_STREAM));
        peer.send(HEADERS, END_HEADERS, id, &[0x88]).await;
        // Two messages, the second split across DATA frames.
        let first = framing::encode(&HealthCheckResponse { status: 1 });
        let second = framing::encode(&HealthCheckResponse { status: 2 });
        let mut data = first.to_vec();
        data.extend_from_slice(&second[..3]);
        peer.send(DATA, 0, id, &data).await;
        peer.send(DATA, 0, id, &second[3..]).await;
        peer.send(HEADERS, END_HEADERS | END_STREAM, id, &status_field(b"0"))
            .await;
        let mut got = Vec::new();
        while let Some(item) = items.recv().await {
            got.push(
                <HealthCheckResponse as prost::Message>::decode(item)
                    .unwrap()
                    .status,
            );
        }
        assert_eq!(got, [1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_call_resets_its_stream_and_pings_are_acknowledged() {
        let (channel, mut peer) = channel();
        peer.accept(&[]).await;
        let call = tokio::spawn({
            let channel = channel.clone();
            async move { check(&channel, "slow").await }
        });
        let (kind, _, id, _) = peer.next().await;
        assert_eq!(kind, HEADERS);
        call.abort();
        loop {
            let (kind, _, reset, payload) = peer.next().await;
            if kind == RST_STREAM {
                assert_eq!((reset, &payload[..]), (id, &CANCEL.to_be_bytes()[..]));
                break;
            }
        }
        // An answer to the forgotten call is dropped; the connection goes on.
        peer.answer(id, &HealthCheckResponse { status: 1 }).await;
        peer.send(PING, 0, 0, b"12345678").await;
        assert_eq!(
            peer.next().await,
            (PING, ACK, 0, Bytes::from_static(b"12345678"))
        );
        let call = tokio::spawn({
            let channel = channel.clone();
            async move { check(&channel, "next").await }
        });
        let (kind, _, next, _) = peer.next().await;
        assert_eq!((kind, next), (HEADERS, id + 2));
        peer.answer(next, &HealthCheckResponse { status: 2 }).await;
        assert_eq!(call.await.unwrap().unwrap().status, 2);
        // The plugin goes away: calls fail at once.
        drop(peer);
        let gone = check(&channel, "gone").await.unwrap_err();
        assert_eq!(gone.code(), Code::Unavailable, "{gone}");
    }
}
