//! `cloudml-worker`: trains tasks and records them in MLflow. One binary for every mode.

mod lambda;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudml_shared::config::{init_logging, Overrides, Settings};
use cloudml_shared::execute::{DeliveryContext, Executor};
use cloudml_shared::queue::amqp::{AmqpQueue, Topology};
use cloudml_shared::queue::sqs::{self, SqsQueue};
use cloudml_shared::queue::{QueueUrl, TaskQueue};
use cloudml_shared::sweep::Sweep;
use cloudml_shared::tracking::MlflowClient;
use cloudml_shared::worker::{run_worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "cloudml-worker",
    version,
    about = "Train CloudML tasks and record them in MLflow"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// The mode; without one, Lambda mode when AWS_LAMBDA_RUNTIME_API is set
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Consume a queue and train its tasks until stopped (SIGTERM or SIGINT)
    Run(RunArgs),
    /// Serve AWS Lambda events (SQS batches and direct invocations) through the Lambda Runtime API
    Lambda,
    /// Train one task from a file, or from stdin with `-`, and print a JSON summary
    Once {
        /// Task file (.toml or .json), task message, or original payload; `-` reads stdin
        file: String,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Queue URL: amqp://user:password@host:5672/vhost/queue (vhost `/` is %2f and may be left out)
    #[arg(long, env = "CLOUDML_QUEUE", value_name = "URL")]
    queue: String,
    /// SQS endpoint, for emulators [default: AWS_ENDPOINT_URL, else the AWS endpoint of the region]
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Tasks trained at once by this process; also the AMQP prefetch count
    #[arg(long, default_value_t = 1, value_name = "N")]
    concurrency: u16,
    /// Stop after settling this many messages (for a KEDA ScaledJob pod) [default: no limit]
    #[arg(long, value_name = "N")]
    max_tasks: Option<usize>,
    /// Stop after the queue has been empty for this many seconds [default: never]
    #[arg(long, value_name = "SECONDS")]
    exit_when_idle: Option<u64>,
    /// On SIGTERM or SIGINT, seconds to let running tasks finish before their messages are released
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    shutdown_grace: u64,
    /// Use the existing queue as it is; declare no queue, exchange or binding
    #[arg(long)]
    no_declare: bool,
    /// Declare a quorum queue with this delivery limit instead of a classic queue
    #[arg(long, value_name = "N")]
    quorum_delivery_limit: Option<u32>,
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
    // lapin logs every connection failure itself, verbosely; the worker reports them once.
    init_logging(&settings.log_format, "info,lapin=off");

    let command = match cli.command {
        Some(command) => command,
        None if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => Command::Lambda,
        None => {
            eprintln!("error: a mode is required (once, run or lambda); see cloudml-worker --help");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Once { file } => once(&file, &settings).await,
        Command::Run(args) => run(&args, &settings).await,
        Command::Lambda => lambda_mode(&settings).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "stopped with an error");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Consumes a queue until a signal, `--max-tasks` or `--exit-when-idle` stops it.
async fn run(args: &RunArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let mlflow = MlflowClient::new(&settings.tracking())?;
    let (queue, runtime): (Arc<dyn TaskQueue>, &str) = match QueueUrl::parse(&args.queue)? {
        QueueUrl::Amqp(address) => {
            let topology = Topology {
                no_declare: args.no_declare,
                quorum_delivery_limit: args.quorum_delivery_limit,
            };
            let queue = AmqpQueue::new(address, topology, args.concurrency, settings.max_attempts);
            queue.connect().await?;
            (Arc::new(queue), "amqp")
        }
        QueueUrl::Sqs(address) => {
            let client = sqs::client(args.endpoint_url.as_deref()).await;
            (Arc::new(SqsQueue::connect(client, &address).await?), "sqs")
        }
    };
    let executor = Arc::new(Executor::new(mlflow, settings.train_options()?, runtime));

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let config = WorkerConfig {
        concurrency: usize::from(args.concurrency.max(1)),
        max_tasks: args.max_tasks,
        exit_when_idle: args.exit_when_idle.map(Duration::from_secs),
        // Long polling (SQS allows up to 20 s), shorter when an idle limit must be noticed sooner.
        poll_wait: Duration::from_secs(args.exit_when_idle.map_or(20, |idle| idle.clamp(1, 20))),
        retry_base_delay: settings.retry_base_delay(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    let summary = run_worker(queue, executor, config, shutdown, None).await;
    let code = i32::from(summary.failed > 0);
    if summary.released > 0 {
        // Released tasks may still train on blocking threads, which cannot be interrupted and which
        // the runtime would wait for on return. Their messages are back in the queue already.
        std::process::exit(code);
    }
    Ok(ExitCode::from(code as u8))
}

/// Cancels `shutdown` on the first SIGTERM (Kubernetes, Lambda) or SIGINT (Ctrl-C).
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};

    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("SIGTERM received, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, stopping"),
    }
    shutdown.cancel();
}

async fn lambda_mode(settings: &Settings) -> anyhow::Result<ExitCode> {
    let executor = Executor::new(
        MlflowClient::new(&settings.tracking())?,
        settings.train_options()?,
        "lambda",
    );
    lambda::serve(Arc::new(executor)).await?;
    Ok(ExitCode::SUCCESS)
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
    let summary = lambda::summary(&report);
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
