//! Reading a function's log records: the lines the runtimes keep in their JetStream stream,
//! then, if asked, new ones as they are published.

use std::{collections::VecDeque, pin::Pin};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use mycelium_core::{
    logs::{LogRecord, LOG_STREAM},
    Error, FunctionName,
};

use crate::Client;

/// Why reading logs failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsErrorKind {
    /// The function name is invalid; nothing was read.
    InvalidName,
    /// No runtime keeps log history on this NATS (no JetStream, or no runtime ever ran), and
    /// only history was asked for.
    NoHistory,
    /// Talking to NATS failed.
    Transport,
}

/// A failed [`Client::logs`] or a failure while following.
pub type LogsError = Error<LogsErrorKind>;

/// What [`Client::logs`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogsOptions {
    /// How many of the most recent kept lines to return.
    pub lines: usize,
    /// Also follow new lines as they are published.
    pub follow: bool,
}

/// One published log line: the bytes as published and, when they are one, the record.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The message body, a JSON [`LogRecord`] when a runtime published it.
    pub payload: Bytes,
}

impl LogLine {
    /// The record, if the payload is one.
    pub fn record(&self) -> Option<LogRecord> {
        serde_json::from_slice(&self.payload).ok()
    }
}

type LiveLines = Pin<Box<dyn Stream<Item = Result<LogLine, LogsError>> + Send>>;

/// A function's log: the kept lines, then the live ones when following.
pub struct FunctionLog {
    /// The most recent kept lines, oldest first (empty without history).
    pub history: Vec<LogLine>,
    live: Option<LiveLines>,
}

impl std::fmt::Debug for FunctionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionLog")
            .field("history", &self.history.len())
            .field("following", &self.live.is_some())
            .finish()
    }
}

impl FunctionLog {
    /// The next new line; `None` when not following or when the connection ended. No line
    /// falls between the history and the first live line, none comes twice.
    pub async fn next(&mut self) -> Option<Result<LogLine, LogsError>> {
        self.live.as_mut()?.next().await
    }
}

fn transport(e: impl std::error::Error + Send + Sync + 'static) -> LogsError {
    LogsError::with_source(LogsErrorKind::Transport, "reading logs", e)
}

impl Client {
    /// Reads `function`'s log. With the runtimes' log stream, one ordered consumer gives the
    /// kept lines and then the live ones; without it (no JetStream), only following works:
    /// a plain subscription to the function's log subject.
    pub async fn logs(
        &self,
        function: &str,
        options: LogsOptions,
    ) -> Result<FunctionLog, LogsError> {
        use async_nats::jetstream;

        let name = FunctionName::new(function)
            .map_err(|e| LogsError::with_source(LogsErrorKind::InvalidName, e.to_string(), e))?;
        let subject = self.subjects.logs_of(&name);
        let Ok(stream) = jetstream::new(self.nats.clone())
            .get_stream(LOG_STREAM)
            .await
        else {
            if !options.follow {
                return Err(LogsError::new(
                    LogsErrorKind::NoHistory,
                    format!("no runtime keeps logs on this NATS (stream {LOG_STREAM} is missing: it needs JetStream); use --follow to see new lines live"),
                ));
            }
            let live = self.nats.subscribe(subject).await.map_err(transport)?;
            return Ok(FunctionLog {
                history: Vec::new(),
                live: Some(Box::pin(live.map(|message| {
                    Ok(LogLine {
                        payload: message.payload,
                    })
                }))),
            });
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(transport)?;
        let mut kept = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(transport)?;
        let mut recent = VecDeque::with_capacity(options.lines.min(10_000));
        while kept > 0 {
            let Some(message) = messages.next().await else {
                break;
            };
            let message = message.map_err(transport)?;
            kept = message.info().map_or(0, |info| info.pending);
            if recent.len() == options.lines {
                recent.pop_front();
            }
            if options.lines > 0 {
                recent.push_back(LogLine {
                    payload: message.message.payload,
                });
            }
        }
        Ok(FunctionLog {
            history: recent.into(),
            live: options.follow.then(|| -> LiveLines {
                Box::pin(messages.map(|message| {
                    message.map_err(transport).map(|message| LogLine {
                        payload: message.message.payload,
                    })
                }))
            }),
        })
    }
}
