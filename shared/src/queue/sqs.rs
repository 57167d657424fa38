//! Amazon SQS backend over `aws-sdk-sqs`, with credentials and region from the AWS default chain.
//!
//! Settling follows SQS's redrive model: a message is deleted only after its MLflow run is
//! FINISHED. A failed message is made visible again after a backoff, so the queue's redrive policy
//! moves it to the dead-letter queue after `maxReceiveCount` receives. The worker does not delete a
//! message it could not train.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use futures::StreamExt;

use super::{Delivery, FailureKind, QueueError, TaskQueue};

/// Maximum entries in one `SendMessageBatch` request (an SQS limit).
const BATCH_ENTRIES: usize = 10;
/// Largest total body size of one batch request, in bytes (the SQS limit for a message, and
/// conservatively for a batch).
const BATCH_BYTES: usize = 256 * 1024;
/// Maximum visibility timeout SQS accepts, in seconds.
const MAX_VISIBILITY_SECONDS: i32 = 43_200;

/// A queue given as `sqs://NAME` or as its URL.
#[derive(Debug, Clone)]
pub struct SqsAddress {
    pub name_or_url: String,
}

impl SqsAddress {
    pub fn parse(url: &str) -> Result<Self, QueueError> {
        let name_or_url = match url.strip_prefix("sqs://") {
            Some(name) if !name.is_empty() && !name.contains('/') => name.to_string(),
            Some(_) => {
                return Err(QueueError::new(
                    "parse URL",
                    format!("invalid SQS queue {url:?}, expected sqs://NAME or the queue URL"),
                ))
            }
            None => url.to_string(),
        };
        Ok(SqsAddress { name_or_url })
    }
}

/// Builds an SQS client from the AWS default chain (environment, profile, IMDS, ...).
/// `AWS_ENDPOINT_URL` or `endpoint` points it at an emulator.
pub async fn client(endpoint: Option<&str>) -> Client {
    let shared = aws_config::load_from_env().await;
    let mut builder = aws_sdk_sqs::config::Builder::from(&shared);
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Client::from_conf(builder.build())
}

fn sqs_error<E: std::error::Error + 'static>(
    operation: &'static str,
    err: aws_sdk_sqs::error::SdkError<E>,
) -> QueueError {
    // The SDK's Display is terse ("service error"), so the sources are included.
    let message = crate::error::error_chain(&err);
    QueueError::new(operation, message)
}

/// Resolves a name or URL to the queue URL.
pub async fn queue_url(client: &Client, address: &SqsAddress) -> Result<String, QueueError> {
    if address.name_or_url.contains("://") {
        return Ok(address.name_or_url.clone());
    }
    let response = client
        .get_queue_url()
        .queue_name(&address.name_or_url)
        .send()
        .await
        .map_err(|err| sqs_error("get queue URL", err))?;
    response.queue_url().map(str::to_string).ok_or_else(|| {
        QueueError::new(
            "get queue URL",
            format!("no URL for queue {:?}", address.name_or_url),
        )
    })
}

/// A message to send: body and the ids that go into its attributes.
pub struct Outgoing {
    pub task_id: String,
    pub sweep_id: Option<String>,
    pub body: String,
}

/// A message SQS did not accept after retries.
#[derive(Debug, Clone)]
pub struct SendFailure {
    pub task_id: String,
    pub reason: String,
}

fn string_attribute(value: &str) -> Option<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .ok()
}

/// Sends messages with `SendMessageBatch`, `in_flight` batches at a time. Entries that fail are
/// retried twice (after 0.5 s and 1 s) and then reported one by one. FIFO queues get the task id
/// as message group id and deduplication id.
pub async fn send(
    client: &Client,
    url: &str,
    messages: Vec<Outgoing>,
    in_flight: usize,
    on_sent: &(dyn Fn(usize) + Sync),
) -> Vec<SendFailure> {
    let fifo = url.ends_with(".fifo");
    let mut batches: Vec<Vec<Outgoing>> = Vec::new();
    let mut bytes = 0;
    for message in messages {
        let size = message.body.len();
        let full = batches
            .last()
            .is_none_or(|batch| batch.len() == BATCH_ENTRIES || bytes + size > BATCH_BYTES);
        if full {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(batch) = batches.last_mut() {
            batch.push(message);
        }
    }

    let results: Vec<Vec<SendFailure>> = futures::stream::iter(batches)
        .map(|batch| send_batch(client, url, batch, fifo, on_sent))
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await;
    results.into_iter().flatten().collect()
}

async fn send_batch(
    client: &Client,
    url: &str,
    batch: Vec<Outgoing>,
    fifo: bool,
    on_sent: &(dyn Fn(usize) + Sync),
) -> Vec<SendFailure> {
    let mut pending: HashMap<String, Outgoing> = batch
        .into_iter()
        .enumerate()
        .map(|(index, message)| (index.to_string(), message))
        .collect();
    let mut last_errors: HashMap<String, String> = HashMap::new();
    let mut failures = Vec::new();
    let mut delay = Duration::from_millis(500);

    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let entries: Vec<SendMessageBatchRequestEntry> = pending
            .iter()
            .filter_map(|(id, message)| {
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(id)
                    .message_body(&message.body)
                    .set_message_attributes(Some(attributes(message)));
                if fifo {
                    entry = entry
                        .message_group_id(&message.task_id)
                        .message_deduplication_id(&message.task_id);
                }
                entry.build().ok()
            })
            .collect();
        let response = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await;
        match response {
            Ok(output) => {
                for sent in output.successful() {
                    if pending.remove(sent.id()).is_some() {
                        on_sent(1);
                    }
                }
                for failed in output.failed() {
                    let reason = format!("{}: {}", failed.code(), failed.message().unwrap_or(""));
                    // Sender faults (invalid body, too large) fail the same way on every retry.
                    if failed.sender_fault() {
                        if let Some(message) = pending.remove(failed.id()) {
                            failures.push(SendFailure {
                                task_id: message.task_id,
                                reason,
                            });
                        }
                    } else {
                        last_errors.insert(failed.id().to_string(), reason);
                    }
                }
            }
            Err(err) => {
                let reason = sqs_error("send message batch", err).to_string();
                for id in pending.keys() {
                    last_errors.insert(id.clone(), reason.clone());
                }
            }
        }
        if pending.is_empty() {
            break;
        }
    }

    for (id, message) in pending {
        failures.push(SendFailure {
            task_id: message.task_id,
            reason: last_errors
                .get(&id)
                .cloned()
                .unwrap_or_else(|| "not sent".to_string()),
        });
    }
    failures
}

fn attributes(message: &Outgoing) -> HashMap<String, MessageAttributeValue> {
    let mut attributes = HashMap::new();
    if let Some(value) = string_attribute(&message.task_id) {
        attributes.insert("task_id".to_string(), value);
    }
    if let Some(value) = message.sweep_id.as_deref().and_then(string_attribute) {
        attributes.insert("sweep_id".to_string(), value);
    }
    if let Ok(value) = MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(crate::task::SCHEMA_VERSION.to_string())
        .build()
    {
        attributes.insert("schema_version".to_string(), value);
    }
    attributes
}

/// Message counts of a queue and of its dead-letter queue, from `GetQueueAttributes`.
#[derive(Debug, Clone)]
pub struct SqsDepth {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
    /// The dead-letter queue's URL and visible messages, when the queue has a redrive policy.
    pub dead_letter: Option<(String, u64)>,
}

async fn count_attributes(
    client: &Client,
    url: &str,
) -> Result<HashMap<QueueAttributeName, String>, QueueError> {
    let response = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .map_err(|err| sqs_error("get queue attributes", err))?;
    Ok(response.attributes().cloned().unwrap_or_default())
}

fn count(attributes: &HashMap<QueueAttributeName, String>, name: QueueAttributeName) -> u64 {
    attributes
        .get(&name)
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Finds the dead-letter queue's URL through the queue's `RedrivePolicy`.
pub async fn dead_letter_url(client: &Client, url: &str) -> Result<Option<String>, QueueError> {
    let attributes = count_attributes(client, url).await?;
    dead_letter_url_from(client, &attributes).await
}

/// Finds the dead-letter queue's URL from attributes already read.
async fn dead_letter_url_from(
    client: &Client,
    attributes: &HashMap<QueueAttributeName, String>,
) -> Result<Option<String>, QueueError> {
    let Some(policy) = attributes.get(&QueueAttributeName::RedrivePolicy) else {
        return Ok(None);
    };
    let policy: serde_json::Value = serde_json::from_str(policy).map_err(|err| {
        QueueError::new(
            "read redrive policy",
            format!("{policy:?} is not JSON: {err}"),
        )
    })?;
    let Some(arn) = policy
        .get("deadLetterTargetArn")
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(None);
    };
    let name = arn.rsplit(':').next().unwrap_or_default();
    queue_url(
        client,
        &SqsAddress {
            name_or_url: name.to_string(),
        },
    )
    .await
    .map(Some)
}

pub async fn depth(client: &Client, url: &str) -> Result<SqsDepth, QueueError> {
    let attributes = count_attributes(client, url).await?;
    let dead_letter = match dead_letter_url_from(client, &attributes).await? {
        Some(dlq_url) => {
            let dlq = count_attributes(client, &dlq_url).await?;
            Some((
                dlq_url,
                count(&dlq, QueueAttributeName::ApproximateNumberOfMessages),
            ))
        }
        None => None,
    };
    Ok(SqsDepth {
        visible: count(&attributes, QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(
            &attributes,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ),
        delayed: count(
            &attributes,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ),
        dead_letter,
    })
}

/// One message read from a queue without being deleted.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub message_id: String,
    pub receive_count: u32,
    pub body: String,
}

/// Reads up to `limit` messages and makes each visible again at once.
pub async fn peek(client: &Client, url: &str, limit: usize) -> Result<Vec<Peeked>, QueueError> {
    let mut seen = Vec::new();
    let mut ids = std::collections::HashSet::new();
    // A few rounds, because one receive returns a random subset of a small queue.
    for _ in 0..5 {
        if seen.len() >= limit {
            break;
        }
        let response = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(((limit - seen.len()).min(10)) as i32)
            .visibility_timeout(5)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|err| sqs_error("receive", err))?;
        for message in response.messages() {
            if let Some(receipt) = message.receipt_handle() {
                let _ = client
                    .change_message_visibility()
                    .queue_url(url)
                    .receipt_handle(receipt)
                    .visibility_timeout(0)
                    .send()
                    .await;
            }
            let message_id = message.message_id().unwrap_or_default().to_string();
            if ids.insert(message_id.clone()) {
                seen.push(Peeked {
                    message_id,
                    receive_count: system_attribute(
                        message,
                        &MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .unwrap_or(0) as u32,
                    body: message.body().unwrap_or_default().to_string(),
                });
            }
        }
        if response.messages().is_empty() {
            break;
        }
    }
    Ok(seen)
}

/// Moves every message of the dead-letter queue back to `url`; returns how many moved.
pub async fn redrive(client: &Client, dlq_url: &str, url: &str) -> Result<usize, QueueError> {
    let mut moved = 0;
    loop {
        let response = client
            .receive_message()
            .queue_url(dlq_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|err| sqs_error("receive", err))?;
        if response.messages().is_empty() {
            return Ok(moved);
        }
        for message in response.messages() {
            // Send first, delete second: a failure in between duplicates a task, which the
            // FINISHED-run check absorbs, instead of losing it.
            client
                .send_message()
                .queue_url(url)
                .message_body(message.body().unwrap_or_default())
                .set_message_attributes(message.message_attributes().cloned())
                .send()
                .await
                .map_err(|err| sqs_error("send", err))?;
            if let Some(receipt) = message.receipt_handle() {
                client
                    .delete_message()
                    .queue_url(dlq_url)
                    .receipt_handle(receipt)
                    .send()
                    .await
                    .map_err(|err| sqs_error("delete", err))?;
            }
            moved += 1;
        }
    }
}

fn system_attribute(
    message: &aws_sdk_sqs::types::Message,
    name: &MessageSystemAttributeName,
) -> Option<u64> {
    message
        .attributes()
        .and_then(|attributes| attributes.get(name))
        .and_then(|value| value.parse().ok())
}

/// Consumer side of an SQS queue.
pub struct SqsQueue {
    client: Client,
    url: String,
    /// The queue's visibility timeout; the heartbeat extends a message by this much.
    visibility_timeout: Duration,
}

impl SqsQueue {
    /// Resolves the queue and reads its visibility timeout.
    pub async fn connect(client: Client, address: &SqsAddress) -> Result<Self, QueueError> {
        let url = queue_url(&client, address).await?;
        let attributes = count_attributes(&client, &url).await?;
        let visibility_timeout =
            Duration::from_secs(count(&attributes, QueueAttributeName::VisibilityTimeout).max(1));
        tracing::info!(queue = %url, visibility_timeout_seconds = visibility_timeout.as_secs(), "consuming");
        Ok(SqsQueue {
            client,
            url,
            visibility_timeout,
        })
    }

    async fn set_visibility(
        &self,
        delivery: &Delivery,
        seconds: i32,
        operation: &'static str,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&delivery.receipt)
            .visibility_timeout(seconds.clamp(0, MAX_VISIBILITY_SECONDS))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| sqs_error(operation, err))
    }
}

#[async_trait]
impl TaskQueue for SqsQueue {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let response = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(|err| sqs_error("receive", err))?;
        Ok(response
            .messages()
            .iter()
            .filter_map(|message| {
                let receipt = message.receipt_handle()?.to_string();
                let sent_millis =
                    system_attribute(message, &MessageSystemAttributeName::SentTimestamp);
                Some(Delivery {
                    message_id: message.message_id().unwrap_or_default().to_string(),
                    body: message.body().unwrap_or_default().as_bytes().to_vec(),
                    attempt: system_attribute(
                        message,
                        &MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .unwrap_or(1) as u32,
                    enqueued_at: sent_millis
                        .map(|millis| UNIX_EPOCH + Duration::from_millis(millis)),
                    receipt,
                })
            })
            .collect())
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(&delivery.receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| sqs_error("delete", err))
    }

    async fn fail(
        &self,
        delivery: &Delivery,
        kind: FailureKind,
        error: &str,
        retry_delay: Duration,
    ) -> Result<(), QueueError> {
        // Every kind goes back after the backoff: SQS's redrive policy, not the worker, decides when
        // a message has been received too often and moves it to the dead-letter queue.
        tracing::debug!(message_id = %delivery.message_id, ?kind, error, "returning message after backoff");
        self.set_visibility(delivery, retry_delay.as_secs() as i32, "change visibility")
            .await
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.set_visibility(delivery, 0, "release").await
    }

    async fn heartbeat(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.set_visibility(
            delivery,
            self.visibility_timeout.as_secs() as i32,
            "heartbeat",
        )
        .await
    }

    fn heartbeat_interval(&self) -> Option<Duration> {
        // Three heartbeats per timeout leave room for one failed call.
        Some((self.visibility_timeout / 3).max(Duration::from_secs(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_by_name() {
        assert_eq!(
            SqsAddress::parse("sqs://tasks").unwrap().name_or_url,
            "tasks"
        );
    }

    #[test]
    fn address_by_url() {
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/tasks";
        assert_eq!(SqsAddress::parse(url).unwrap().name_or_url, url);
    }

    #[test]
    fn address_with_path_rejected() {
        assert!(SqsAddress::parse("sqs://a/b").is_err());
    }
}
