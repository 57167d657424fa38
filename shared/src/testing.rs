//! Helpers for the integration tests of every crate. Not part of the stable API.

use crate::tracking::{Auth, MlflowClient, TrackingConfig};

/// Variable through which `scripts/test.sh` passes the MLflow server it started.
pub const TRACKING_URI_VARIABLE: &str = "CLOUDML_TEST_TRACKING_URI";

/// URI of the test MLflow server. Panics with instructions when the tests run without one.
pub fn tracking_uri() -> String {
    std::env::var(TRACKING_URI_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{TRACKING_URI_VARIABLE} is not set: these tests need a real MLflow server; \
             run scripts/test.sh, which starts one"
        )
    })
}

pub fn mlflow() -> MlflowClient {
    let config = TrackingConfig {
        uri: tracking_uri(),
        auth: Auth::None,
        retries: 3,
    };
    MlflowClient::new(&config).expect("test tracking URI is valid")
}

/// Returns an experiment name no other test uses, so tests can run in parallel against one server.
pub fn unique_experiment(test: &str) -> String {
    format!("test-{test}-{}", uuid::Uuid::now_v7())
}

/// Returns a loopback address where nothing listens, for unreachable-server cases.
pub fn closed_loopback_uri() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Creates an SQS queue and its dead-letter queue on the emulator named by `AWS_ENDPOINT_URL`
/// (scripts/test.sh starts moto), with a redrive policy after `max_receive_count` receives.
/// Returns the task queue's URL and the dead-letter queue's URL.
pub async fn create_sqs_queue(
    name: &str,
    visibility_timeout: u32,
    max_receive_count: u32,
) -> (String, String) {
    use aws_sdk_sqs::types::QueueAttributeName;

    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: the SQS tests need moto on loopback; run scripts/test.sh, which starts it")
    });
    assert!(
        endpoint.starts_with("http://127.0.0.1:"),
        "AWS_ENDPOINT_URL = {endpoint}, expected a loopback emulator"
    );
    let client = crate::queue::sqs::client(None).await;
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .expect("create dead-letter queue");
    let dlq_url = dlq.queue_url().expect("dead-letter queue URL").to_string();
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("dead-letter queue attributes")
        .attributes()
        .and_then(|attributes| attributes.get(&QueueAttributeName::QueueArn).cloned())
        .expect("dead-letter queue ARN");
    let policy = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count.to_string()});
    let queue = client
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_timeout.to_string(),
        )
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .send()
        .await
        .expect("create task queue");
    (
        queue.queue_url().expect("task queue URL").to_string(),
        dlq_url,
    )
}

/// Creates a FIFO SQS queue (`NAME.fifo`) on the emulator and returns its URL.
pub async fn create_sqs_fifo_queue(name: &str) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;

    let client = crate::queue::sqs::client(None).await;
    client
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .expect("create FIFO queue")
        .queue_url()
        .expect("FIFO queue URL")
        .to_string()
}
