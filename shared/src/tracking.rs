//! A focused MLflow tracking client over the REST API (`/api/2.0/mlflow`).
//!
//! No maintained Rust crate covers batched logging, the artifact proxy and retries, so this module
//! implements the few endpoints a worker needs. Credentials come from `MLFLOW_TRACKING_TOKEN` or
//! `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` and are never logged.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::error_chain;

/// Server limits for one `runs/log-batch` request (MLflow REST API documentation).
const BATCH_MAX_METRICS: usize = 1000;
const BATCH_MAX_PARAMS: usize = 100;
const BATCH_MAX_TAGS: usize = 100;
const BATCH_MAX_ENTRIES: usize = 1000;
/// Kept below the server's 1 MB request limit to leave room for the JSON envelope.
const BATCH_MAX_BYTES: usize = 900_000;
/// Maximum param value length MLflow 3 stores, in characters. Longer values are cut and marked.
const MAX_PARAM_VALUE_CHARS: usize = 6000;
/// Maximum tag value length MLflow stores, in characters.
const MAX_TAG_VALUE_CHARS: usize = 8000;

/// How to reach the tracking server.
#[derive(Clone)]
pub struct TrackingConfig {
    pub uri: String,
    pub auth: Auth,
    /// Retries after the first attempt for connection errors, 5xx and 429.
    pub retries: usize,
}

#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Bearer(String),
    Basic {
        username: String,
        password: String,
    },
}

impl fmt::Debug for TrackingConfig {
    /// Shows the URI and the kind of credentials, never their values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match self.auth {
            Auth::None => "none",
            Auth::Bearer(_) => "bearer token",
            Auth::Basic { .. } => "basic",
        };
        f.debug_struct("TrackingConfig")
            .field("uri", &self.uri)
            .field("auth", &auth)
            .field("retries", &self.retries)
            .finish()
    }
}

impl TrackingConfig {
    /// Reads credentials from the standard `MLFLOW_TRACKING_*` variables.
    pub fn with_env_credentials(uri: String, retries: usize) -> Self {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let auth = if let Some(token) = variable("MLFLOW_TRACKING_TOKEN") {
            Auth::Bearer(token)
        } else if let Some(username) = variable("MLFLOW_TRACKING_USERNAME") {
            Auth::Basic {
                username,
                password: variable("MLFLOW_TRACKING_PASSWORD").unwrap_or_default(),
            }
        } else {
            Auth::None
        };
        TrackingConfig { uri, auth, retries }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("invalid MLflow tracking URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error(
        "MLflow server at {uri} is unreachable ({endpoint}): {message}; check MLFLOW_TRACKING_URI"
    )]
    Unreachable {
        uri: String,
        endpoint: String,
        message: String,
    },
    #[error("MLflow {endpoint} failed with HTTP {status}: {code} {message}")]
    Api {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response from MLflow {endpoint}: {message}")]
    Decode { endpoint: String, message: String },
    #[error(
        "run {run_id} stores artifacts at {artifact_uri}, which this client cannot write; \
         start the server with --artifacts-destination so it proxies artifacts"
    )]
    ArtifactStore {
        run_id: String,
        artifact_uri: String,
    },
}

impl TrackingError {
    /// Tells whether trying again later may succeed, because the server was unreachable, overloaded or failing.
    pub fn is_transient(&self) -> bool {
        match self {
            TrackingError::Unreachable { .. } => true,
            TrackingError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    fn error_code(&self) -> Option<&str> {
        match self {
            TrackingError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Run status values of the MLflow API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Running,
    Scheduled,
    Finished,
    Failed,
    Killed,
}

/// The parts of an MLflow run's `info` the worker uses.
#[derive(Debug, Clone, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    pub status: RunStatus,
    #[serde(default)]
    pub artifact_uri: String,
    #[serde(default)]
    pub run_name: Option<String>,
}

/// One metric value; `step` is the epoch for per-epoch metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub key: String,
    pub value: f64,
    pub timestamp: i64,
    #[serde(default)]
    pub step: i64,
}

/// Client for one tracking server. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct MlflowClient {
    http: reqwest::Client,
    base: String,
    auth: Auth,
    retries: usize,
}

impl fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowClient")
            .field("base", &self.base)
            .finish()
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

impl MlflowClient {
    pub fn new(config: &TrackingConfig) -> Result<Self, TrackingError> {
        let url = url::Url::parse(&config.uri);
        let shown_uri = match &url {
            Ok(url) => redacted(url),
            Err(_) => config.uri.clone(),
        };
        let invalid = |reason: &str| TrackingError::InvalidUri {
            uri: shown_uri.clone(),
            reason: reason.to_string(),
        };
        let url = url.map_err(|err| invalid(&err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("expected an http:// or https:// tracking server"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials in the URI are not accepted; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|err| invalid(&err.to_string()))?;
        Ok(MlflowClient {
            http,
            base: config.uri.trim_end_matches('/').to_string(),
            auth: config.auth.clone(),
            retries: config.retries,
        })
    }

    /// Returns the server's address, for messages and links to the UI.
    pub fn uri(&self) -> &str {
        &self.base
    }

    /// Sends one request, retrying connection errors, 5xx and 429 with exponential backoff
    /// (0.2 s doubling to at most 5 s, with jitter, `retries` times).
    async fn request(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        body: Option<Value>,
    ) -> Result<Value, TrackingError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let attempt = || async {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(body) = &body {
                request = if method == reqwest::Method::GET {
                    request.query(&query_pairs(body))
                } else {
                    request.json(body)
                };
            }
            self.send(request, endpoint).await
        };
        attempt
            .retry(self.backoff())
            .when(TrackingError::is_transient)
            .notify(|err, delay| {
                tracing::warn!(endpoint, error = %err, retry_in_ms = delay.as_millis() as u64, "MLflow request failed, retrying");
            })
            .await
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.retries)
            .with_jitter()
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        endpoint: &str,
    ) -> Result<Value, TrackingError> {
        let request = match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic { username, password } => request.basic_auth(username, Some(password)),
        };
        let response = request
            .send()
            .await
            .map_err(|err| TrackingError::Unreachable {
                uri: self.base.clone(),
                endpoint: endpoint.to_string(),
                message: error_chain(&err),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| TrackingError::Unreachable {
                uri: self.base.clone(),
                endpoint: endpoint.to_string(),
                message: error_chain(&err),
            })?;
        if !status.is_success() {
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let message = body
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| text.chars().take(300).collect(), str::to_string);
            return Err(TrackingError::Api {
                endpoint: endpoint.to_string(),
                status: status.as_u16(),
                code: body
                    .get("error_code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                message,
            });
        }
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).map_err(|err| TrackingError::Decode {
            endpoint: endpoint.to_string(),
            message: err.to_string(),
        })
    }

    /// Returns the id of the named experiment, creating it when missing. Safe when many workers race:
    /// the loser of a concurrent create reads the winner's experiment.
    pub async fn get_or_create_experiment(&self, name: &str) -> Result<String, TrackingError> {
        if let Some(id) = self.find_experiment(name).await? {
            return Ok(id);
        }
        match self
            .request(
                reqwest::Method::POST,
                "experiments/create",
                Some(json!({ "name": name })),
            )
            .await
        {
            Ok(body) => string_field(&body, "experiment_id", "experiments/create"),
            Err(err) if err.error_code() == Some("RESOURCE_ALREADY_EXISTS") => {
                self.find_experiment(name).await?.ok_or(err)
            }
            Err(err) => Err(err),
        }
    }

    async fn find_experiment(&self, name: &str) -> Result<Option<String>, TrackingError> {
        let endpoint = "experiments/get-by-name";
        match self
            .request(
                reqwest::Method::GET,
                endpoint,
                Some(json!({ "experiment_name": name })),
            )
            .await
        {
            Ok(body) => {
                let experiment = body.get("experiment").cloned().unwrap_or(Value::Null);
                if experiment.get("lifecycle_stage").and_then(Value::as_str) == Some("deleted") {
                    return Err(TrackingError::Api {
                        endpoint: endpoint.to_string(),
                        status: 400,
                        code: "EXPERIMENT_DELETED".to_string(),
                        message: format!(
                            "experiment {name:?} is deleted; restore it in MLflow or choose another experiment name"
                        ),
                    });
                }
                string_field(&experiment, "experiment_id", endpoint).map(Some)
            }
            Err(err) if err.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Creates a run in RUNNING state with its tags.
    pub async fn create_run(
        &self,
        experiment_id: &str,
        run_name: Option<&str>,
        tags: &[(String, String)],
    ) -> Result<RunInfo, TrackingError> {
        let mut body = json!({
            "experiment_id": experiment_id,
            "start_time": now_millis(),
            "tags": tags.iter().map(|(key, value)| json!({"key": key, "value": truncate(value, MAX_TAG_VALUE_CHARS)})).collect::<Vec<_>>(),
        });
        if let Some(name) = run_name {
            body["run_name"] = json!(name);
        }
        let response = self
            .request(reqwest::Method::POST, "runs/create", Some(body))
            .await?;
        run_info(&response["run"]["info"], "runs/create")
    }

    /// Lists runs in experiments whose tag `key` equals `value`, newest first, following pages.
    pub async fn search_runs_by_tag(
        &self,
        experiment_id: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<RunInfo>, TrackingError> {
        let filter = format!("tags.`{key}` = '{}'", value.replace('\'', "\\'"));
        let mut runs = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut body = json!({
                "experiment_ids": [experiment_id],
                "filter": filter,
                "max_results": 1000,
                "order_by": ["attributes.start_time DESC"],
            });
            if let Some(token) = &page_token {
                body["page_token"] = json!(token);
            }
            let response = self
                .request(reqwest::Method::POST, "runs/search", Some(body))
                .await?;
            for run in response
                .get("runs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                runs.push(run_info(&run["info"], "runs/search")?);
            }
            page_token = response
                .get("next_page_token")
                .and_then(Value::as_str)
                .filter(|token| !token.is_empty())
                .map(str::to_string);
            if page_token.is_none() {
                return Ok(runs);
            }
        }
    }

    /// Logs metrics, params and tags in as few `runs/log-batch` requests as the server limits allow.
    pub async fn log_batch(
        &self,
        run_id: &str,
        metrics: &[MetricPoint],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<(), TrackingError> {
        for batch in plan_batches(metrics, params, tags) {
            let body = json!({
                "run_id": run_id,
                "metrics": batch.metrics,
                "params": batch.params.iter().map(|(key, value)| json!({"key": key, "value": value})).collect::<Vec<_>>(),
                "tags": batch.tags.iter().map(|(key, value)| json!({"key": key, "value": value})).collect::<Vec<_>>(),
            });
            self.request(reqwest::Method::POST, "runs/log-batch", Some(body))
                .await?;
        }
        Ok(())
    }

    pub async fn set_tag(&self, run_id: &str, key: &str, value: &str) -> Result<(), TrackingError> {
        let body =
            json!({"run_id": run_id, "key": key, "value": truncate(value, MAX_TAG_VALUE_CHARS)});
        self.request(reqwest::Method::POST, "runs/set-tag", Some(body))
            .await?;
        Ok(())
    }

    /// Ends a run with `status` (FINISHED, FAILED or KILLED).
    pub async fn end_run(&self, run_id: &str, status: RunStatus) -> Result<(), TrackingError> {
        let body = json!({"run_id": run_id, "status": status, "end_time": now_millis()});
        self.request(reqwest::Method::POST, "runs/update", Some(body))
            .await?;
        Ok(())
    }

    /// Returns the whole run (`info` and `data`) as the server sends it.
    pub async fn get_run(&self, run_id: &str) -> Result<Value, TrackingError> {
        let response = self
            .request(
                reqwest::Method::GET,
                "runs/get",
                Some(json!({"run_id": run_id})),
            )
            .await?;
        Ok(response.get("run").cloned().unwrap_or(Value::Null))
    }

    pub async fn metric_history(
        &self,
        run_id: &str,
        key: &str,
    ) -> Result<Vec<MetricPoint>, TrackingError> {
        let endpoint = "metrics/get-history";
        let response = self
            .request(
                reqwest::Method::GET,
                endpoint,
                Some(json!({"run_id": run_id, "metric_key": key, "max_results": 25000})),
            )
            .await?;
        let metrics = response
            .get("metrics")
            .cloned()
            .unwrap_or_else(|| json!([]));
        serde_json::from_value(metrics).map_err(|err| TrackingError::Decode {
            endpoint: endpoint.to_string(),
            message: err.to_string(),
        })
    }

    /// Uploads a file to the run's artifacts through the server's artifact proxy.
    pub async fn upload_artifact(
        &self,
        run: &RunInfo,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<(), TrackingError> {
        let url = format!("{}/{path}", self.artifact_url(run)?);
        let endpoint = "mlflow-artifacts/artifacts";
        let attempt = || async {
            let request = self
                .http
                .put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.clone());
            self.send(request, endpoint).await
        };
        attempt
            .retry(self.backoff())
            .when(TrackingError::is_transient)
            .notify(|err, delay| {
                tracing::warn!(endpoint, error = %err, retry_in_ms = delay.as_millis() as u64, "artifact upload failed, retrying");
            })
            .await?;
        Ok(())
    }

    /// Lists the run's artifact files under `path` (empty for the root), as the proxy reports them.
    pub async fn list_artifacts(
        &self,
        run: &RunInfo,
        path: &str,
    ) -> Result<Vec<Value>, TrackingError> {
        let prefix = artifact_prefix(run)?;
        let full_path = if path.is_empty() {
            prefix
        } else {
            format!("{prefix}/{path}")
        };
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts", self.base);
        let request = self.http.get(&url).query(&[("path", full_path)]);
        let response = self.send(request, "mlflow-artifacts/artifacts").await?;
        Ok(response
            .get("files")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Downloads one artifact file through the proxy.
    pub async fn download_artifact(
        &self,
        run: &RunInfo,
        path: &str,
    ) -> Result<Vec<u8>, TrackingError> {
        let url = format!("{}/{path}", self.artifact_url(run)?);
        let unreachable = |err: reqwest::Error| TrackingError::Unreachable {
            uri: self.base.clone(),
            endpoint: "mlflow-artifacts/artifacts".to_string(),
            message: error_chain(&err),
        };
        let response = self.http.get(&url).send().await.map_err(unreachable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(TrackingError::Api {
                endpoint: "mlflow-artifacts/artifacts".to_string(),
                status: status.as_u16(),
                code: String::new(),
                message: format!("cannot download {path}"),
            });
        }
        Ok(response.bytes().await.map_err(unreachable)?.to_vec())
    }

    fn artifact_url(&self, run: &RunInfo) -> Result<String, TrackingError> {
        Ok(format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}",
            self.base,
            artifact_prefix(run)?
        ))
    }
}

/// Formats a URL without its `user:password@` part.
fn redacted(url: &url::Url) -> String {
    let mut url = url.clone();
    // Both setters fail only for URLs that cannot carry credentials, which have none to hide.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// `mlflow-artifacts:/1/<run>/artifacts` (or with `//host`) becomes `1/<run>/artifacts`.
fn artifact_prefix(run: &RunInfo) -> Result<String, TrackingError> {
    let rest = run
        .artifact_uri
        .strip_prefix("mlflow-artifacts:")
        .ok_or_else(|| TrackingError::ArtifactStore {
            run_id: run.run_id.clone(),
            artifact_uri: run.artifact_uri.clone(),
        })?;
    let path = match rest.strip_prefix("//") {
        Some(with_host) => with_host.find('/').map_or("", |slash| &with_host[slash..]),
        None => rest,
    };
    Ok(path.trim_matches('/').to_string())
}

fn run_info(value: &Value, endpoint: &str) -> Result<RunInfo, TrackingError> {
    serde_json::from_value(value.clone()).map_err(|err| TrackingError::Decode {
        endpoint: endpoint.to_string(),
        message: format!("run info: {err}"),
    })
}

fn string_field(value: &Value, field: &str, endpoint: &str) -> Result<String, TrackingError> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| TrackingError::Decode {
            endpoint: endpoint.to_string(),
            message: format!("missing {field}"),
        })
}

fn query_pairs(body: &Value) -> Vec<(String, String)> {
    body.as_object()
        .map(|object| {
            object
                .iter()
                .map(|(key, value)| {
                    let text = value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string);
                    (key.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn truncate(value: &str, max_chars: usize) -> String {
    if value.chars().count() <= max_chars {
        return value.to_string();
    }
    let mut cut: String = value.chars().take(max_chars - 3).collect();
    cut.push_str("...");
    cut
}

/// One `runs/log-batch` request's share of the data.
#[derive(Debug, Default)]
struct Batch {
    metrics: Vec<MetricPoint>,
    params: Vec<(String, String)>,
    tags: Vec<(String, String)>,
    bytes: usize,
}

impl Batch {
    fn entries(&self) -> usize {
        self.metrics.len() + self.params.len() + self.tags.len()
    }

    fn is_empty(&self) -> bool {
        self.entries() == 0
    }
}

/// Splits the data into requests within the server's count and size limits, params first so that a
/// failure part-way leaves the run's configuration recorded.
fn plan_batches(
    metrics: &[MetricPoint],
    params: &[(String, String)],
    tags: &[(String, String)],
) -> Vec<Batch> {
    let mut batches = Vec::new();
    let mut current = Batch::default();
    let flush = |current: &mut Batch, batches: &mut Vec<Batch>| {
        if !current.is_empty() {
            batches.push(std::mem::take(current));
        }
    };

    for (key, value) in params {
        let value = truncate(value, MAX_PARAM_VALUE_CHARS);
        let size = key.len() + value.len() + 32;
        if current.params.len() == BATCH_MAX_PARAMS
            || current.entries() == BATCH_MAX_ENTRIES
            || current.bytes + size > BATCH_MAX_BYTES
        {
            flush(&mut current, &mut batches);
        }
        current.bytes += size;
        current.params.push((key.clone(), value));
    }
    for (key, value) in tags {
        let value = truncate(value, MAX_TAG_VALUE_CHARS);
        let size = key.len() + value.len() + 32;
        if current.tags.len() == BATCH_MAX_TAGS
            || current.entries() == BATCH_MAX_ENTRIES
            || current.bytes + size > BATCH_MAX_BYTES
        {
            flush(&mut current, &mut batches);
        }
        current.bytes += size;
        current.tags.push((key.clone(), value));
    }
    for metric in metrics {
        let size = metric.key.len() + 96;
        if current.metrics.len() == BATCH_MAX_METRICS
            || current.entries() == BATCH_MAX_ENTRIES
            || current.bytes + size > BATCH_MAX_BYTES
        {
            flush(&mut current, &mut batches);
        }
        current.bytes += size;
        current.metrics.push(metric.clone());
    }
    flush(&mut current, &mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(count: usize, prefix: &str) -> Vec<(String, String)> {
        (0..count)
            .map(|index| (format!("{prefix}{index}"), "v".to_string()))
            .collect()
    }

    #[test]
    fn batches_respect_param_limit() {
        let batches = plan_batches(&[], &pairs(250, "p"), &[]);
        let sizes: Vec<_> = batches.iter().map(|batch| batch.params.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn batches_respect_entry_limit() {
        let metrics: Vec<_> = (0..2500)
            .map(|step| MetricPoint {
                key: "loss".into(),
                value: 1.0,
                timestamp: 0,
                step,
            })
            .collect();
        let batches = plan_batches(&metrics, &pairs(50, "p"), &pairs(10, "t"));
        assert!(batches
            .iter()
            .all(|batch| batch.entries() <= BATCH_MAX_ENTRIES));
        assert_eq!(
            batches
                .iter()
                .map(|batch| batch.metrics.len())
                .sum::<usize>(),
            2500
        );
    }

    #[test]
    fn batches_respect_byte_limit() {
        let big: Vec<_> = (0..100)
            .map(|index| (format!("p{index}"), "x".repeat(5000)))
            .collect();
        let tags: Vec<_> = (0..100)
            .map(|index| (format!("t{index}"), "y".repeat(7000)))
            .collect();
        let batches = plan_batches(&[], &big, &tags);
        assert!(batches.len() >= 2);
        assert!(batches.iter().all(|batch| batch.bytes <= BATCH_MAX_BYTES));
    }

    #[test]
    fn artifact_prefix_strips_scheme() {
        let run = RunInfo {
            run_id: "r".into(),
            experiment_id: "1".into(),
            status: RunStatus::Running,
            artifact_uri: "mlflow-artifacts:/1/r/artifacts".into(),
            run_name: None,
        };
        assert_eq!(artifact_prefix(&run).unwrap(), "1/r/artifacts");
    }

    #[test]
    fn uri_credentials_rejected() {
        let config = TrackingConfig {
            uri: "http://user:secret@127.0.0.1:5000".into(),
            auth: Auth::None,
            retries: 0,
        };
        let message = MlflowClient::new(&config).unwrap_err().to_string();
        assert!(message.contains("credentials in the URI"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn debug_hides_token() {
        let config = TrackingConfig {
            uri: "http://127.0.0.1:5000".into(),
            auth: Auth::Bearer("s3cr3t".into()),
            retries: 0,
        };
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
