//! RabbitMQ (AMQP 0-9-1) backend over `lapin`.
//!
//! Topology for a task queue `Q`: a durable queue `Q` whose rejected messages go to the direct
//! exchange `Q.dlx`, which routes them to the durable queue `Q.dlq`. Workers acknowledge a message
//! only after its MLflow run is FINISHED; unacknowledged messages are redelivered by the broker when
//! a worker's connection or channel closes, so none is lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use tokio::sync::Mutex as AsyncMutex;

use super::{Delivery, FailureKind, QueueError, TaskQueue};

/// Header counting how often a task was requeued after a transient failure.
pub const HEADER_RETRIES: &str = "x-cloudml-retries";
/// Header carrying the error of a dead-lettered message.
pub const HEADER_ERROR: &str = "x-cloudml-error";
pub const HEADER_SWEEP_ID: &str = "x-cloudml-sweep-id";
pub const HEADER_SCHEMA_VERSION: &str = "x-cloudml-schema-version";

/// Heartbeat interval asked of the broker when the URL sets none, in seconds.
const DEFAULT_HEARTBEAT_SECONDS: u16 = 30;

/// A parsed `amqp://user:password@host:port/vhost/queue` URL.
#[derive(Clone)]
pub struct AmqpAddress {
    /// The connection URI for lapin (the URL without the queue segment).
    connection_uri: String,
    pub queue: String,
    /// The virtual host, decoded (`/` by default).
    pub vhost: String,
    /// The RabbitMQ management API on the broker's host and default port 15672.
    pub default_management_url: String,
    username: String,
    password: String,
    /// The URL with the password replaced, safe for logs and messages.
    pub display: String,
}

impl std::fmt::Debug for AmqpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl AmqpAddress {
    /// Parses `amqp(s)://[user[:password]@]host[:port][/vhost]/queue[?heartbeat=S]`. The vhost
    /// segment is URL-encoded (`%2f` for `/`); without it the vhost is `/`.
    pub fn parse(url: &str) -> Result<Self, QueueError> {
        let invalid = |reason: String| QueueError::new("parse URL", reason);
        let mut parsed =
            url::Url::parse(url).map_err(|err| invalid(format!("invalid AMQP URL: {err}")))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(invalid(format!(
                "scheme {:?}, expected amqp or amqps",
                parsed.scheme()
            )));
        }
        let segments: Vec<String> = parsed
            .path_segments()
            .map(|segments| {
                segments
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let (vhost, queue) = match segments.as_slice() {
            [queue] => ("%2f".to_string(), queue.clone()),
            [vhost, queue] => (vhost.clone(), queue.clone()),
            [] => {
                return Err(invalid(
                    "missing queue name, expected amqp://host:5672/vhost/queue or amqp://host:5672/queue".into(),
                ))
            }
            more => {
                return Err(invalid(format!(
                    "{} path segments, expected amqp://host:5672/vhost/queue (encode a / in the vhost as %2f)",
                    more.len()
                )))
            }
        };
        let queue = percent_decode(&queue);
        let decoded_vhost = percent_decode(&vhost);
        let username = if parsed.username().is_empty() {
            "guest".to_string()
        } else {
            percent_decode(parsed.username())
        };
        let password = parsed
            .password()
            .map_or_else(|| "guest".to_string(), percent_decode);
        let default_management_url =
            format!("http://{}:15672", parsed.host_str().unwrap_or("localhost"));
        if queue.is_empty() || queue.len() > 200 {
            return Err(invalid(format!(
                "queue name {queue:?}, expected 1 to 200 bytes"
            )));
        }
        if !parsed.query_pairs().any(|(key, _)| key == "heartbeat") {
            parsed
                .query_pairs_mut()
                .append_pair("heartbeat", &DEFAULT_HEARTBEAT_SECONDS.to_string());
        }
        parsed.set_path(&format!("/{vhost}"));
        let connection_uri = parsed.to_string();
        let mut shown = parsed.clone();
        if shown.password().is_some() {
            // Fails only for URLs without a host, which cannot carry a password.
            let _ = shown.set_password(Some("***"));
        }
        Ok(AmqpAddress {
            connection_uri,
            display: format!(
                "{}/{}",
                shown.as_str().split('?').next().unwrap_or_default(),
                queue
            ),
            queue,
            vhost: decoded_vhost,
            default_management_url,
            username,
            password,
        })
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("q={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

/// Declaration options of the task queue.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Leave existing queues and exchanges alone: declare nothing.
    pub no_declare: bool,
    /// Declare a quorum queue with this delivery limit instead of a classic queue.
    pub quorum_delivery_limit: Option<u32>,
}

fn amqp_error(operation: &'static str, address: &AmqpAddress, err: lapin::Error) -> QueueError {
    QueueError::new(operation, format!("{}: {err}", address.display))
}

async fn connect(address: &AmqpAddress, name: &str) -> Result<Connection, QueueError> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(&address.connection_uri, properties)
        .await
        .map_err(|err| amqp_error("connect", address, err))
}

/// Declares the dead-letter exchange, the dead-letter queue and the task queue; safe to repeat.
async fn declare(
    channel: &Channel,
    address: &AmqpAddress,
    topology: &Topology,
) -> Result<(), QueueError> {
    if topology.no_declare {
        return Ok(());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            address.dead_letter_exchange().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| amqp_error("declare dead-letter exchange", address, err))?;
    channel
        .queue_declare(
            address.dead_letter_queue().into(),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|err| amqp_error("declare dead-letter queue", address, err))?;
    channel
        .queue_bind(
            address.dead_letter_queue().into(),
            address.dead_letter_exchange().into(),
            address.queue.clone().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| amqp_error("bind dead-letter queue", address, err))?;

    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(address.dead_letter_exchange().into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(address.queue.clone().into()),
    );
    if let Some(limit) = topology.quorum_delivery_limit {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit as i32));
    }
    channel
        .queue_declare(address.queue.clone().into(), durable, arguments)
        .await
        .map_err(|err| {
            QueueError::new(
                "declare task queue",
                format!(
                    "{}: {err}; if the queue exists with other arguments, delete it or pass --no-declare",
                    address.display
                ),
            )
        })?;
    Ok(())
}

/// A message to publish: body and the ids that go into its properties.
pub struct Outgoing {
    pub task_id: String,
    pub sweep_id: Option<String>,
    pub body: Vec<u8>,
}

/// A message the broker did not confirm, with the reason.
#[derive(Debug, Clone)]
pub struct PublishFailure {
    pub task_id: String,
    pub reason: String,
}

/// Publishes messages with publisher confirms, persistent delivery and `mandatory`, keeping up to
/// `window` confirms in flight. Returns the messages the broker did not accept.
pub async fn publish(
    address: &AmqpAddress,
    topology: &Topology,
    messages: Vec<Outgoing>,
    window: usize,
    on_confirmed: &mut (dyn FnMut(usize) + Send),
) -> Result<Vec<PublishFailure>, QueueError> {
    let connection = connect(address, "cloudml-enqueue").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| amqp_error("open channel", address, err))?;
    declare(&channel, address, topology).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| amqp_error("enable publisher confirms", address, err))?;

    let mut failures = Vec::new();
    let mut pending = futures::stream::FuturesOrdered::new();
    for message in messages {
        let mut headers = FieldTable::default();
        if let Some(sweep_id) = &message.sweep_id {
            headers.insert(
                HEADER_SWEEP_ID.into(),
                AMQPValue::LongString(sweep_id.clone().into()),
            );
        }
        headers.insert(
            HEADER_SCHEMA_VERSION.into(),
            AMQPValue::LongUInt(crate::task::SCHEMA_VERSION),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.task_id.clone().into())
            .with_timestamp(unix_seconds())
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                address.queue.clone().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                properties,
            )
            .await
            .map_err(|err| amqp_error("publish", address, err))?;
        let task_id = message.task_id;
        pending.push_back(async move { (task_id, confirm.await) });

        while pending.len() >= window.max(1) {
            if let Some((task_id, result)) = pending.next().await {
                settle_confirm(task_id, result, &mut failures, on_confirmed);
            }
        }
    }
    while let Some((task_id, result)) = pending.next().await {
        settle_confirm(task_id, result, &mut failures, on_confirmed);
    }
    let _ = connection.close(200, "enqueue done".into()).await;
    Ok(failures)
}

fn settle_confirm(
    task_id: String,
    result: lapin::Result<Confirmation>,
    failures: &mut Vec<PublishFailure>,
    on_confirmed: &mut (dyn FnMut(usize) + Send),
) {
    let reason = match result {
        Ok(Confirmation::Ack(None)) => None,
        Ok(Confirmation::Ack(Some(returned))) => Some(format!(
            "unroutable: {} {}",
            returned.reply_code, returned.reply_text
        )),
        Ok(Confirmation::Nack(_)) => Some("rejected by the broker (nack)".to_string()),
        Ok(Confirmation::NotRequested) => Some("not confirmed".to_string()),
        Err(err) => Some(err.to_string()),
    };
    match reason {
        Some(reason) => failures.push(PublishFailure { task_id, reason }),
        None => on_confirmed(1),
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Queue depths as AMQP reports them (a passive declare).
#[derive(Debug, Clone, Copy)]
pub struct QueueDepth {
    pub ready: u32,
    pub consumers: u32,
    pub dead_lettered: u32,
}

/// Reads the ready count and consumers of the task queue and the ready count of its DLQ.
pub async fn depth(address: &AmqpAddress) -> Result<QueueDepth, QueueError> {
    let connection = connect(address, "cloudml-status").await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| amqp_error("open channel", address, err))?;
    let queue = channel
        .queue_declare(address.queue.clone().into(), passive, FieldTable::default())
        .await
        .map_err(|err| amqp_error("inspect task queue", address, err))?;
    // A failed passive declare closes the channel, so the DLQ gets its own.
    let dlq_channel = connection
        .create_channel()
        .await
        .map_err(|err| amqp_error("open channel", address, err))?;
    let dead_lettered = dlq_channel
        .queue_declare(
            address.dead_letter_queue().into(),
            passive,
            FieldTable::default(),
        )
        .await
        .map_or(0, |queue| queue.message_count());
    let _ = connection.close(200, "status done".into()).await;
    Ok(QueueDepth {
        ready: queue.message_count(),
        consumers: queue.consumer_count(),
        dead_lettered,
    })
}

/// A message in the dead-letter queue, with the error a worker recorded.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: String,
    pub error: Option<String>,
    pub body: Vec<u8>,
}

/// Reads up to `limit` messages of the dead-letter queue without removing them.
pub async fn peek_dead_letters(
    address: &AmqpAddress,
    limit: usize,
) -> Result<Vec<DeadLetter>, QueueError> {
    let connection = connect(address, "cloudml-dlq").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| amqp_error("open channel", address, err))?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let message = channel
            .basic_get(
                address.dead_letter_queue().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .map_err(|err| amqp_error("read dead-letter queue", address, err))?;
        let Some(message) = message else {
            break;
        };
        let properties = &message.delivery.properties;
        let error = match header(properties, HEADER_ERROR) {
            Some(AMQPValue::LongString(text)) => Some(text.to_string()),
            _ => None,
        };
        letters.push(DeadLetter {
            message_id: properties
                .message_id()
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
            error,
            body: message.delivery.data.clone(),
        });
    }
    // Closing the channel without acknowledging returns every message read here to the queue.
    let _ = connection.close(200, "peek done".into()).await;
    Ok(letters)
}

/// Deletes the task queue, its dead-letter queue and exchange.
pub async fn delete_topology(address: &AmqpAddress) -> Result<(), QueueError> {
    let connection = connect(address, "cloudml-delete").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| amqp_error("open channel", address, err))?;
    for queue in [address.queue.clone(), address.dead_letter_queue()] {
        channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .map_err(|err| amqp_error("delete queue", address, err))?;
    }
    channel
        .exchange_delete(
            address.dead_letter_exchange().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|err| amqp_error("delete exchange", address, err))?;
    let _ = connection.close(200, "deleted".into()).await;
    Ok(())
}

/// Reads the task queue's ready and unacknowledged counts from the RabbitMQ management API
/// (`rabbitmq_management` plugin), with the AMQP URL's credentials. AMQP itself reports no
/// unacknowledged count.
pub async fn management_counts(
    address: &AmqpAddress,
    management_url: &str,
) -> Result<(u64, u64), QueueError> {
    let failure = |message: String| {
        QueueError::new(
            "read management API",
            format!("{management_url}: {message}"),
        )
    };
    let encode =
        |text: &str| url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    let url = format!(
        "{}/api/queues/{}/{}",
        management_url.trim_end_matches('/'),
        encode(&address.vhost),
        encode(&address.queue)
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|err| failure(err.to_string()))?;
    let response = client
        .get(&url)
        .basic_auth(&address.username, Some(&address.password))
        .send()
        .await
        .map_err(|err| failure(err.to_string()))?;
    if !response.status().is_success() {
        return Err(failure(format!("HTTP {}", response.status())));
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|err| failure(err.to_string()))?;
    let count = |key: &str| {
        body.get(key)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Ok((count("messages_ready"), count("messages_unacknowledged")))
}

/// One connection, channel and consumer; replaced as a whole after a failure.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    generation: u64,
}

/// Consumer side of a task queue, reconnecting with backoff when the connection or channel is lost.
pub struct AmqpQueue {
    address: AmqpAddress,
    topology: Topology,
    prefetch: u16,
    max_attempts: u32,
    connection_name: String,
    session: AsyncMutex<Option<Session>>,
    /// Ackers of unsettled deliveries by receipt (`generation:delivery_tag`).
    ackers: Mutex<HashMap<String, (Acker, u64)>>,
    generations: std::sync::atomic::AtomicU64,
}

impl AmqpQueue {
    /// `prefetch` should equal the worker's concurrency, so the broker hands out no more messages
    /// than the worker trains at once.
    pub fn new(address: AmqpAddress, topology: Topology, prefetch: u16, max_attempts: u32) -> Self {
        let connection_name = format!(
            "cloudml-worker {} pid {}",
            gethostname::gethostname().to_string_lossy(),
            std::process::id()
        );
        AmqpQueue {
            address,
            topology,
            prefetch: prefetch.max(1),
            max_attempts: max_attempts.max(1),
            connection_name,
            session: AsyncMutex::new(None),
            ackers: Mutex::new(HashMap::new()),
            generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Connects, declares the topology and starts consuming. Fails fast so a wrong URL is reported
    /// at start-up instead of being retried forever.
    pub async fn connect(&self) -> Result<(), QueueError> {
        let session = self.open_session().await?;
        *self.session.lock().await = Some(session);
        tracing::info!(queue = %self.address.display, prefetch = self.prefetch, "consuming");
        Ok(())
    }

    async fn open_session(&self) -> Result<Session, QueueError> {
        let connection = connect(&self.address, &self.connection_name).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|err| amqp_error("open channel", &self.address, err))?;
        declare(&channel, &self.address, &self.topology).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|err| amqp_error("set prefetch", &self.address, err))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| amqp_error("enable publisher confirms", &self.address, err))?;
        let consumer = channel
            .basic_consume(
                self.address.queue.clone().into(),
                ShortString::from(format!("cloudml-{}", uuid::Uuid::new_v4())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| amqp_error("consume", &self.address, err))?;
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Ok(Session {
            connection,
            channel,
            consumer,
            generation,
        })
    }

    /// Replaces a broken session, retrying every 1 s doubling to 30 s until it works.
    async fn reconnect(&self, session: &mut Option<Session>) {
        if let Some(old) = session.take() {
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        // Deliveries of the old channel are redelivered by the broker; their ackers are useless now.
        self.ackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let mut delay = Duration::from_secs(1);
        loop {
            match self.open_session().await {
                Ok(fresh) => {
                    tracing::info!(queue = %self.address.display, "reconnected");
                    *session = Some(fresh);
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_seconds = delay.as_secs(), "reconnect failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn take_acker(&self, delivery: &Delivery) -> Option<(Acker, u64)> {
        self.ackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&delivery.receipt)
    }

    /// Publishes a copy of `delivery` with `headers` through the current channel and waits for the
    /// broker's confirm, so the original can be acknowledged without losing the message.
    async fn republish(
        &self,
        exchange: &str,
        routing_key: &str,
        delivery: &Delivery,
        extra_headers: &[(&str, AMQPValue)],
    ) -> Result<(), QueueError> {
        let session = self.session.lock().await;
        let Some(session) = session.as_ref() else {
            return Err(QueueError::new("republish", "not connected"));
        };
        let mut headers = FieldTable::default();
        for (key, value) in extra_headers {
            headers.insert(ShortString::from(key.to_string()), value.clone());
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(delivery.message_id.clone().into())
            .with_timestamp(
                delivery
                    .enqueued_at
                    .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                    .map_or_else(unix_seconds, |elapsed| elapsed.as_secs()),
            )
            .with_headers(headers);
        let confirmation = session
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.body,
                properties,
            )
            .await
            .map_err(|err| amqp_error("republish", &self.address, err))?
            .await
            .map_err(|err| amqp_error("republish", &self.address, err))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            other => Err(QueueError::new(
                "republish",
                format!("not accepted: {other:?}"),
            )),
        }
    }
}

/// Drops the flag lapin returns from ack and nack (whether the message was still unsettled).
async fn settle(
    operation: impl std::future::Future<Output = lapin::Result<bool>>,
) -> lapin::Result<()> {
    operation.await.map(|_| ())
}

fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(key))
}

fn header_count(value: Option<&AMQPValue>) -> u32 {
    match value {
        Some(AMQPValue::LongUInt(count)) => *count,
        Some(AMQPValue::LongInt(count)) => (*count).max(0) as u32,
        Some(AMQPValue::LongLongInt(count)) => (*count).max(0) as u32,
        Some(AMQPValue::ShortUInt(count)) => u32::from(*count),
        Some(AMQPValue::ShortShortUInt(count)) => u32::from(*count),
        _ => 0,
    }
}

#[async_trait]
impl TaskQueue for AmqpQueue {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut session = self.session.lock().await;
        if session.is_none() {
            self.reconnect(&mut session).await;
        }
        let mut deliveries = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while deliveries.len() < max {
            let Some(current) = session.as_mut() else {
                break;
            };
            // Wait for the first message up to `wait`; take more only if they are already there.
            let timeout = if deliveries.is_empty() {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::ZERO
            };
            let next = match tokio::time::timeout(timeout, current.consumer.next()).await {
                Err(_) => break,
                Ok(next) => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "AMQP consumer failed, reconnecting");
                    self.reconnect(&mut session).await;
                    break;
                }
                None => {
                    tracing::warn!(
                        "AMQP consumer stopped (connection or channel closed), reconnecting"
                    );
                    self.reconnect(&mut session).await;
                    break;
                }
            };
            let generation = current.generation;
            let retries = header_count(header(&message.properties, HEADER_RETRIES));
            // Quorum queues count deliveries; classic queues only flag a redelivery.
            let delivery_count = header_count(header(&message.properties, "x-delivery-count"));
            let redeliveries = delivery_count.max(u32::from(message.redelivered));
            let message_id = message.properties.message_id().as_ref().map_or_else(
                || format!("amqp-{generation}-{}", message.delivery_tag),
                ToString::to_string,
            );
            let receipt = format!("{generation}:{}", message.delivery_tag);
            let enqueued_at = message
                .properties
                .timestamp()
                .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds));
            self.ackers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(receipt.clone(), (message.acker.clone(), retries.into()));
            deliveries.push(Delivery {
                message_id,
                body: message.data,
                attempt: 1 + retries + redeliveries,
                enqueued_at,
                receipt,
            });
        }
        Ok(deliveries)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let (acker, _) = self.take_acker(delivery).ok_or_else(|| {
            QueueError::new(
                "ack",
                "channel was replaced; the broker redelivers this message",
            )
        })?;
        settle(acker.ack(BasicAckOptions::default()))
            .await
            .map_err(|err| amqp_error("ack", &self.address, err))
    }

    async fn fail(
        &self,
        delivery: &Delivery,
        kind: FailureKind,
        error: &str,
        retry_delay: Duration,
    ) -> Result<(), QueueError> {
        let (acker, retries) = self.take_acker(delivery).ok_or_else(|| {
            QueueError::new(
                "fail",
                "channel was replaced; the broker redelivers this message",
            )
        })?;
        let retries = retries as u32;
        let error_header =
            AMQPValue::LongString(error.chars().take(4000).collect::<String>().into());

        if kind == FailureKind::Transient && delivery.attempt < self.max_attempts {
            // Hold the message for the backoff delay, then requeue a copy with the retry count.
            tokio::time::sleep(retry_delay).await;
            let retry_headers = [
                (HEADER_RETRIES, AMQPValue::LongUInt(retries + 1)),
                (HEADER_ERROR, error_header),
            ];
            if let Err(err) = self
                .republish("", &self.address.queue, delivery, &retry_headers)
                .await
            {
                tracing::warn!(error = %err, "cannot requeue a copy; returning the original to the queue");
                return settle(acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }))
                .await
                .map_err(|err| amqp_error("requeue", &self.address, err));
            }
        } else {
            // Dead-letter a copy with the error in a header, since a plain reject drops the reason.
            let dead_headers = [
                (HEADER_RETRIES, AMQPValue::LongUInt(retries)),
                (HEADER_ERROR, error_header),
            ];
            let exchange = self.address.dead_letter_exchange();
            if let Err(err) = self
                .republish(&exchange, &self.address.queue, delivery, &dead_headers)
                .await
            {
                tracing::warn!(error = %err, "cannot publish to the dead-letter exchange; rejecting, so the broker dead-letters the message without its error");
                return settle(acker.nack(BasicNackOptions::default()))
                    .await
                    .map_err(|err| amqp_error("reject", &self.address, err));
            }
        }
        settle(acker.ack(BasicAckOptions::default()))
            .await
            .map_err(|err| amqp_error("ack", &self.address, err))
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let (acker, _) = self.take_acker(delivery).ok_or_else(|| {
            QueueError::new(
                "release",
                "channel was replaced; the broker redelivers this message",
            )
        })?;
        settle(acker.nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        }))
        .await
        .map_err(|err| amqp_error("release", &self.address, err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_vhost_and_queue() {
        let address = AmqpAddress::parse("amqp://guest:secret@127.0.0.1:5672/%2f/tasks").unwrap();
        assert_eq!(address.queue, "tasks");
        assert_eq!(
            address.connection_uri,
            "amqp://guest:secret@127.0.0.1:5672/%2f?heartbeat=30"
        );
        assert!(!address.display.contains("secret"), "{}", address.display);
    }

    #[test]
    fn url_with_queue_only() {
        let address = AmqpAddress::parse("amqp://127.0.0.1/tasks?heartbeat=10").unwrap();
        assert_eq!(address.queue, "tasks");
        assert_eq!(address.connection_uri, "amqp://127.0.0.1/%2f?heartbeat=10");
    }

    #[test]
    fn url_without_queue_rejected() {
        let message = AmqpAddress::parse("amqp://127.0.0.1:5672")
            .unwrap_err()
            .to_string();
        assert!(message.contains("missing queue name"), "{message}");
    }

    #[test]
    fn url_wrong_scheme_rejected() {
        let message = AmqpAddress::parse("http://127.0.0.1/tasks")
            .unwrap_err()
            .to_string();
        assert!(message.contains("expected amqp or amqps"), "{message}");
    }
}
