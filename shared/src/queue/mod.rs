//! Queues that carry task messages, behind one small trait so the worker loop is written once.

pub mod amqp;
pub mod local;
pub mod sqs;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

/// A queue named on the command line.
#[derive(Debug, Clone)]
pub enum QueueUrl {
    Amqp(amqp::AmqpAddress),
    Sqs(sqs::SqsAddress),
}

impl QueueUrl {
    pub fn parse(url: &str) -> Result<QueueUrl, QueueError> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "amqp" | "amqps" => Ok(QueueUrl::Amqp(amqp::AmqpAddress::parse(url)?)),
            // SQS queue URLs are http(s); emulators such as moto serve plain http.
            "sqs" | "https" | "http" => Ok(QueueUrl::Sqs(sqs::SqsAddress::parse(url)?)),
            _ => Err(QueueError::new(
                "parse URL",
                format!(
                    "unsupported queue URL scheme {scheme:?}, expected amqp://, amqps://, sqs://NAME or an SQS queue URL"
                ),
            )),
        }
    }
}

/// One received message, valid until it is acknowledged, failed or released.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Stable across redeliveries; names original payloads, which carry no task id.
    pub message_id: String,
    pub body: Vec<u8>,
    /// 1 for the first delivery.
    pub attempt: u32,
    pub enqueued_at: Option<SystemTime>,
    /// Backend-specific handle (receipt handle, delivery tag) used to settle the message.
    pub receipt: String,
}

impl Delivery {
    /// Time spent in the queue before this delivery, when the backend reports the enqueue time.
    pub fn queue_wait(&self) -> Option<Duration> {
        self.enqueued_at
            .and_then(|enqueued| SystemTime::now().duration_since(enqueued).ok())
    }
}

/// Why a delivery did not succeed, which decides between another attempt and the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The body is not a task; it can never succeed.
    Unparseable,
    /// The task is invalid or its data or model cannot work; retrying gives the same result.
    Permanent,
    /// An outage (tracking server, dataset host); a later attempt may succeed.
    Transient,
}

#[derive(Debug, thiserror::Error)]
#[error("queue {operation} failed: {message}")]
pub struct QueueError {
    pub operation: &'static str,
    pub message: String,
}

impl QueueError {
    pub fn new(operation: &'static str, message: impl Into<String>) -> Self {
        QueueError {
            operation,
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Receives up to `max` messages, waiting at most `wait` for the first one.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;

    /// Deletes a message whose task has a FINISHED run.
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Settles a message that failed: retried after `retry_delay`, or dead-lettered with `error`,
    /// as the backend's retry limit and `kind` decide.
    async fn fail(
        &self,
        delivery: &Delivery,
        kind: FailureKind,
        error: &str,
        retry_delay: Duration,
    ) -> Result<(), QueueError>;

    /// Returns a message untouched so another worker can take it now (used on shutdown).
    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Keeps a message from being redelivered while its task is still training.
    async fn heartbeat(&self, _delivery: &Delivery) -> Result<(), QueueError> {
        Ok(())
    }

    /// How often [`TaskQueue::heartbeat`] must be called; `None` when the backend needs none.
    fn heartbeat_interval(&self) -> Option<Duration> {
        None
    }
}
