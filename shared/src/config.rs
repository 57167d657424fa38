//! Settings shared by both binaries, layered: defaults < `cloudml.toml` < environment < flags.
//!
//! Environment variables are `CLOUDML_<KEY>` (for example `CLOUDML_THREADS_PER_TASK=2`); the
//! tracking server also comes from the standard `MLFLOW_TRACKING_URI`, which `CLOUDML_TRACKING_URI`
//! overrides.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tracking::TrackingConfig;
use crate::train::{parse_device, TrainOptions};

/// File read from the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "cloudml.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    /// MLflow tracking server, `http(s)://host:port`.
    pub tracking_uri: String,
    /// Retries of a failed MLflow request (connection errors, 5xx, 429).
    pub tracking_retries: usize,
    /// In-process workers for `cloudml run`, or tasks at once for `cloudml-worker run`.
    pub workers: usize,
    /// libtorch intra-op threads per task.
    pub threads_per_task: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Deliveries of a task before it is dead-lettered (embedded queue).
    pub max_attempts: u32,
    /// First retry delay after a transient failure, in seconds; doubled per attempt.
    pub retry_base_delay_seconds: f64,
    /// `text` or `json`; `auto` picks text on a terminal and JSON elsewhere.
    pub log_format: String,
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub tracking_uri: Option<String>,
    pub workers: Option<usize>,
    pub threads_per_task: Option<usize>,
    pub device: Option<String>,
    pub log_format: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Loads settings from all layers. `config_file`, when given, must exist.
    pub fn load(
        config_file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let error = |err: config::ConfigError| ConfigError(err.to_string());
        let default_workers = std::thread::available_parallelism().map_or(1, usize::from);

        let mut builder = config::Config::builder()
            .set_default("tracking_uri", "http://127.0.0.1:5000")
            .map_err(error)?
            .set_default("tracking_retries", 5)
            .map_err(error)?
            .set_default("workers", default_workers as i64)
            .map_err(error)?
            .set_default("threads_per_task", 1)
            .map_err(error)?
            .set_default("device", "cpu")
            .map_err(error)?
            .set_default("max_attempts", 3)
            .map_err(error)?
            .set_default("retry_base_delay_seconds", 5.0)
            .map_err(error)?
            .set_default("log_format", "auto")
            .map_err(error)?;

        let file: PathBuf =
            config_file.map_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE), Path::to_path_buf);
        if config_file.is_some() && !file.exists() {
            return Err(ConfigError(format!(
                "config file {} not found",
                file.display()
            )));
        }
        check_file_keys(&file)?;
        builder = builder.add_source(
            config::File::from(file)
                .format(config::FileFormat::Toml)
                .required(false),
        );

        if let Ok(uri) = std::env::var("MLFLOW_TRACKING_URI") {
            if !uri.is_empty() {
                builder = builder.set_override("tracking_uri", uri).map_err(error)?;
            }
        }
        builder = builder.add_source(config::Environment::with_prefix("CLOUDML").try_parsing(true));
        // The environment source above sits below overrides, so MLFLOW_TRACKING_URI must not beat
        // CLOUDML_TRACKING_URI: apply the latter again explicitly.
        if let Ok(uri) = std::env::var("CLOUDML_TRACKING_URI") {
            builder = builder.set_override("tracking_uri", uri).map_err(error)?;
        }

        let flags = [
            (
                "tracking_uri",
                overrides.tracking_uri.clone().map(config::Value::from),
            ),
            (
                "workers",
                overrides
                    .workers
                    .map(|value| config::Value::from(value as i64)),
            ),
            (
                "threads_per_task",
                overrides
                    .threads_per_task
                    .map(|value| config::Value::from(value as i64)),
            ),
            ("device", overrides.device.clone().map(config::Value::from)),
            (
                "log_format",
                overrides.log_format.clone().map(config::Value::from),
            ),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                builder = builder.set_override(key, value).map_err(error)?;
            }
        }

        let settings: Settings = builder
            .build()
            .map_err(error)?
            .try_deserialize()
            .map_err(error)?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError(format!(
                "workers = {}, expected 1 to 1024",
                self.workers
            )));
        }
        if self.threads_per_task == 0 || self.threads_per_task > 256 {
            return Err(ConfigError(format!(
                "threads_per_task = {}, expected 1 to 256",
                self.threads_per_task
            )));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError("max_attempts = 0, expected at least 1".into()));
        }
        if !(self.retry_base_delay_seconds >= 0.0 && self.retry_base_delay_seconds <= 3600.0) {
            return Err(ConfigError(format!(
                "retry_base_delay_seconds = {}, expected 0 to 3600",
                self.retry_base_delay_seconds
            )));
        }
        if !matches!(self.log_format.as_str(), "auto" | "text" | "json") {
            return Err(ConfigError(format!(
                "log_format = {:?}, expected auto, text or json",
                self.log_format
            )));
        }
        parse_device(&self.device).map_err(ConfigError)?;
        Ok(())
    }

    pub fn tracking(&self) -> TrackingConfig {
        TrackingConfig::with_env_credentials(self.tracking_uri.clone(), self.tracking_retries)
    }

    /// Returns the training options, checking that a requested CUDA device exists.
    pub fn train_options(&self) -> Result<TrainOptions, ConfigError> {
        let device = parse_device(&self.device).map_err(ConfigError)?;
        if let tch::Device::Cuda(index) = device {
            let available = if tch::Cuda::is_available() {
                tch::Cuda::device_count()
            } else {
                0
            };
            if index as i64 >= available {
                return Err(ConfigError(format!(
                    "device = {:?}, but libtorch sees {available} CUDA device(s); use cpu, or a CUDA build of libtorch on a GPU machine",
                    self.device
                )));
            }
        }
        Ok(TrainOptions {
            threads: self.threads_per_task,
            device,
        })
    }

    pub fn retry_base_delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.retry_base_delay_seconds)
    }
}

/// Keys a settings file may contain.
const KNOWN_KEYS: &[&str] = &[
    "tracking_uri",
    "tracking_retries",
    "workers",
    "threads_per_task",
    "device",
    "max_attempts",
    "retry_base_delay_seconds",
    "log_format",
];

/// Rejects unknown keys in the settings file, so a typo does not silently leave a default in force.
fn check_file_keys(file: &Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(());
    };
    let table: toml::Table = toml::from_str(&text)
        .map_err(|err| ConfigError(format!("{} is not valid TOML: {err}", file.display())))?;
    for key in table.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(ConfigError(format!(
                "{}: unknown setting {key:?}, expected one of {}",
                file.display(),
                KNOWN_KEYS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Starts `tracing` output on stderr: readable text on a terminal, JSON lines elsewhere (Lambda,
/// Kubernetes). `CLOUDML_LOG` (or `RUST_LOG`) sets the filter, `default_filter` otherwise.
pub fn init_logging(format: &str, default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    let filter = std::env::var("CLOUDML_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|value| EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let json = match format {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.compact().try_init()
    };
    // A second initialisation (tests) keeps the first subscriber.
    drop(result);
}
