//! Helpers for the integration tests of every crate. Not part of the stable API.

use std::time::Duration;

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

/// An experiment name no other test uses, so tests can run in parallel against one server.
pub fn unique_experiment(test: &str) -> String {
    format!("test-{test}-{}", uuid::Uuid::now_v7())
}

/// A loopback address where nothing listens, for unreachable-server cases.
pub fn closed_loopback_uri() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
