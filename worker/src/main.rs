//! `cloudml-worker`: trains tasks and records them in MLflow. One binary for every mode.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudml_shared::config::{init_logging, Overrides, Settings};
use cloudml_shared::execute::{DeliveryContext, Executor};
use cloudml_shared::sweep::Sweep;
use cloudml_shared::tracking::MlflowClient;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "cloudml-worker",
    version,
    about = "Train CloudML tasks and record them in MLflow"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every mode; each overrides `cloudml.toml` and `CLOUDML_*` variables.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Settings file [default: ./cloudml.toml when present]
    #[arg(long, global = true, env = "CLOUDML_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// MLflow tracking server URL [default: MLFLOW_TRACKING_URI, else http://127.0.0.1:5000]
    #[arg(long, global = true, value_name = "URL")]
    tracking_uri: Option<String>,
    /// libtorch intra-op threads per task [default: 1]
    #[arg(long, global = true, value_name = "N")]
    threads_per_task: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto [default: cpu]
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
    /// Log format on stderr: auto, text or json [default: auto, JSON when not a terminal]
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one task from a file, or from stdin with `-`, and print a JSON summary
    Once {
        /// Task file (.toml or .json), task message, or original payload; `-` reads stdin
        file: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        tracking_uri: cli.global.tracking_uri.clone(),
        workers: None,
        threads_per_task: cli.global.threads_per_task,
        device: cli.global.device.clone(),
        log_format: cli.global.log_format.clone(),
    };
    let settings = match Settings::load(cli.global.config.as_deref(), &overrides) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings.log_format, "info");

    let result = match cli.command {
        Command::Once { file } => once(&file, &settings).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "task failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Trains a single task without a queue.
async fn once(file: &str, settings: &Settings) -> anyhow::Result<ExitCode> {
    let (text, origin) = if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        (text, "stdin".to_string())
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        (text, file.to_string())
    };
    let stem = std::path::Path::new(&origin).file_stem().map_or_else(
        || "task".to_string(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    let sweep = Sweep::from_str(&text, &origin, &stem)?;
    let [expanded] = sweep.tasks.as_slice() else {
        anyhow::bail!(
            "{origin} expands to {} tasks; `once` trains one task, use `cloudml run` for sweeps",
            sweep.tasks.len()
        );
    };

    let executor = Executor::new(
        MlflowClient::new(&settings.tracking())?,
        settings.train_options()?,
        "once",
    );
    let context = DeliveryContext {
        attempt: 1,
        message_id: None,
        queue_wait: None,
    };
    let report = executor.execute(&expanded.task, &context).await?;
    let summary = json!({
        "task_id": report.task_id,
        "run_id": report.run_id,
        "experiment_id": report.experiment_id,
        "status": "FINISHED",
        "already_finished": report.already_finished,
        "metrics": report.test_metrics.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "duration_seconds": report.duration.as_secs_f64(),
    });
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
