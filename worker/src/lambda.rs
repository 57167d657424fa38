//! AWS Lambda mode: SQS event batches (partial batch failures) and direct `Invoke` calls.
//!
//! The executor, its HTTP connection pool and libtorch are set up once per execution environment
//! and reused by every event it serves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use cloudml_shared::execute::{DeliveryContext, Executor, TaskReport};
use cloudml_shared::task::Task;
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};

/// Time kept free before the invocation's deadline to report results to the Runtime API.
const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Serves Lambda events until the runtime stops the process.
pub async fn serve(executor: Arc<Executor>) -> anyhow::Result<()> {
    warm_up_libtorch();
    let handler = Arc::new(Handler {
        executor,
        longest_task: Mutex::new(Duration::ZERO),
    });
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let handler = handler.clone();
        async move { handler.handle(event).await }
    }))
    .await
    .map_err(|err| anyhow::anyhow!("Lambda runtime stopped: {err}"))
}

/// Loads libtorch's kernels during the init phase, which Lambda does not bill on provisioned
/// concurrency and which does not count towards the first event's duration.
fn warm_up_libtorch() {
    let started = std::time::Instant::now();
    let warm = tch::Tensor::from_slice(&[1.0f32, 2.0]).sum(tch::Kind::Float);
    tracing::info!(
        value = warm.double_value(&[]),
        millis = started.elapsed().as_millis() as u64,
        "libtorch ready"
    );
}

struct Handler {
    executor: Arc<Executor>,
    /// Maximum task duration seen in this execution environment, to judge whether another fits.
    longest_task: Mutex<Duration>,
}

impl Handler {
    async fn handle(&self, event: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Error> {
        let (payload, context) = event.into_parts();
        let deadline = deadline_from(context.deadline, SystemTime::now());
        tracing::debug!(deadline_ms = context.deadline, request_id = %context.request_id, "event received");
        if is_sqs_event(&payload) {
            let event: SqsEvent = serde_json::from_value(payload)?;
            let response = self.handle_sqs(event, deadline).await;
            return Ok(serde_json::to_value(response)?);
        }

        // Direct Invoke: a task message or the original payload, named by the request id.
        let body = serde_json::to_vec(&payload)?;
        let task = Task::from_message(&body, &context.request_id)?;
        let report = self
            .executor
            .execute(
                &task,
                &DeliveryContext {
                    attempt: 1,
                    message_id: Some(context.request_id.clone()),
                    queue_wait: None,
                },
            )
            .await?;
        self.observe(report.duration);
        Ok(summary(&report))
    }

    /// Trains each record in turn and names the ones that failed or were not started, so SQS
    /// deletes the rest and retries these.
    async fn handle_sqs(&self, event: SqsEvent, deadline: SystemTime) -> SqsBatchResponse {
        let mut failures = Vec::new();
        for (index, record) in event.records.iter().enumerate() {
            let message_id = record.message_id.clone().unwrap_or_default();
            let remaining = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if !fits(remaining, self.longest()) {
                tracing::warn!(
                    remaining_millis = remaining.as_millis() as u64,
                    unstarted = event.records.len() - index,
                    "not enough time left for another task; returning the rest of the batch"
                );
                failures.extend(
                    event.records[index..]
                        .iter()
                        .map(|record| record.message_id.clone().unwrap_or_default()),
                );
                break;
            }

            let body = record.body.clone().unwrap_or_default();
            let task = match Task::from_message(body.as_bytes(), &message_id) {
                Ok(task) => task,
                Err(err) => {
                    tracing::error!(message_id, error = %err, "message rejected");
                    failures.push(message_id);
                    continue;
                }
            };
            let attribute = |name: &str| {
                record
                    .attributes
                    .get(name)
                    .and_then(|value| value.parse::<u64>().ok())
            };
            let context = DeliveryContext {
                attempt: attribute("ApproximateReceiveCount").unwrap_or(1) as u32,
                message_id: Some(message_id.clone()),
                queue_wait: attribute("SentTimestamp").and_then(|millis| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH + Duration::from_millis(millis))
                        .ok()
                }),
            };
            match self.executor.execute(&task, &context).await {
                Ok(report) => self.observe(report.duration),
                Err(err) => {
                    tracing::warn!(message_id, task_id = %task.id, error = %err, "task failed");
                    failures.push(message_id);
                }
            }
        }
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures
            .into_iter()
            .map(|item_identifier| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = item_identifier;
                failure
            })
            .collect();
        response
    }

    fn longest(&self) -> Duration {
        *self
            .longest_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn observe(&self, duration: Duration) {
        let mut longest = self
            .longest_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *longest = (*longest).max(duration);
    }
}

/// Epoch milliseconds below this (2001-09-09) cannot be a deadline, so they are read as a duration.
const EARLIEST_EPOCH_DEADLINE_MS: u64 = 1_000_000_000_000;

/// Converts the Runtime API's `Lambda-Runtime-Deadline-Ms` to a time. AWS sends epoch milliseconds.
// NOTE: the cargo-lambda 1.9 emulator sends the function timeout in milliseconds instead. Such small
// values are read as time from now, because no real deadline is that small.
fn deadline_from(deadline_ms: u64, now: SystemTime) -> SystemTime {
    if deadline_ms < EARLIEST_EPOCH_DEADLINE_MS {
        now + Duration::from_millis(deadline_ms)
    } else {
        UNIX_EPOCH + Duration::from_millis(deadline_ms)
    }
}

/// Tells whether a task as long as the longest seen so far still fits before the deadline.
fn fits(remaining: Duration, longest_task: Duration) -> bool {
    remaining > longest_task + DEADLINE_MARGIN
}

fn is_sqs_event(payload: &Value) -> bool {
    payload
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|records| records.first())
        .and_then(|record| record.get("eventSource"))
        .and_then(Value::as_str)
        == Some("aws:sqs")
}

/// The JSON result of one task, as `once` prints it and a direct invocation returns it.
pub fn summary(report: &TaskReport) -> Value {
    json!({
        "task_id": report.task_id,
        "run_id": report.run_id,
        "experiment_id": report.experiment_id,
        "status": "FINISHED",
        "already_finished": report.already_finished,
        "metrics": report.test_metrics.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "duration_seconds": report.duration.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_task_fits() {
        assert!(fits(Duration::from_secs(10), Duration::from_secs(3)));
    }

    #[test]
    fn another_task_does_not_fit() {
        assert!(!fits(Duration::from_secs(4), Duration::from_secs(3)));
    }

    #[test]
    fn deadline_epoch_or_duration() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            deadline_from(1_800_000_060_000, now),
            now + Duration::from_secs(60)
        );
        assert_eq!(deadline_from(600_000, now), now + Duration::from_secs(600));
    }

    #[test]
    fn sqs_event_recognised() {
        let event = json!({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]});
        assert!(is_sqs_event(&event));
        assert!(!is_sqs_event(&json!({"layers": []})));
    }
}
