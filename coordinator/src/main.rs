//! `cloudml`: the coordinator CLI. Turns task and sweep files into tasks and runs them.

mod invoke;
mod local_run;
mod remote;
mod results;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cloudml_shared::config::{init_logging, Overrides, Settings};
use cloudml_shared::queue::amqp::Topology;
use cloudml_shared::sweep::{describe_varied, Sweep};
use remote::QueueTarget;

#[derive(Debug, Parser)]
#[command(
    name = "cloudml",
    version,
    about = "Train many models in parallel and record every run in MLflow"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every command; each overrides `cloudml.toml` and `CLOUDML_*` variables.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Settings file [default: ./cloudml.toml when present]
    #[arg(long, global = true, env = "CLOUDML_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// MLflow tracking server URL [default: MLFLOW_TRACKING_URI, else http://127.0.0.1:5000]
    #[arg(long, global = true, value_name = "URL")]
    tracking_uri: Option<String>,
    /// Log format on stderr: auto, text or json [default: auto, text on a terminal]
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a task or sweep file on this machine with in-process workers and an embedded queue
    Run(RunArgs),
    /// Publish the tasks of a task or sweep file to a queue for worker fleets
    Enqueue {
        /// Task or sweep file (.toml or .json), or an original payload (.json)
        file: PathBuf,
        #[command(flatten)]
        queue: QueueArgs,
    },
    /// Show a queue's depth and, with --sweep, how many of a sweep's runs are in each state
    Status {
        #[command(flatten)]
        queue: QueueArgs,
        /// Sweep id printed by `cloudml enqueue`
        #[arg(long, requires = "experiment")]
        sweep: Option<String>,
        /// MLflow experiment of the sweep's tasks
        #[arg(long)]
        experiment: Option<String>,
    },
    /// Invoke the worker's Lambda function N times at once with one task, and report each result
    Invoke {
        /// Task file (.toml or .json), or with --payload-format original, an original payload
        file: PathBuf,
        /// Lambda function name or ARN
        #[arg(long, value_name = "NAME")]
        function: String,
        /// Concurrent invocations
        #[arg(long, default_value_t = 1, value_name = "N")]
        concurrency: usize,
        /// Payload sent: `task` (a task message with a fresh id per invocation) or `original` (the file unchanged)
        #[arg(long, default_value = "task", value_parser = ["task", "original"])]
        payload_format: String,
        /// Lambda endpoint, for emulators [default: AWS_ENDPOINT_URL, else the AWS endpoint of the region]
        #[arg(long, value_name = "URL")]
        endpoint_url: Option<String>,
    },
    /// Show or redrive the dead-letter queue of a task queue
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Delete a RabbitMQ queue with its dead-letter queue and exchange, and every message in them
    DeleteQueue {
        #[command(flatten)]
        queue: QueueArgs,
    },
    /// Print the settings in force after defaults, cloudml.toml, CLOUDML_* variables and flags
    Config,
    /// Check a task or sweep file without running it
    Validate {
        /// Task or sweep file (.toml or .json), or an original payload (.json)
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Print dead-lettered messages without removing them
    Show {
        #[command(flatten)]
        queue: QueueArgs,
        /// Messages to print at most
        #[arg(long, default_value_t = 20, value_name = "N")]
        limit: usize,
    },
    /// Move every dead-lettered message back to the task queue (SQS)
    Redrive {
        #[command(flatten)]
        queue: QueueArgs,
    },
}

#[derive(Debug, Args)]
struct QueueArgs {
    /// Queue: amqp://user:password@host:5672/vhost/queue (vhost `/` is %2f and may be left out),
    /// sqs://NAME, or an SQS queue URL
    #[arg(long, env = "CLOUDML_QUEUE", value_name = "URL")]
    queue: String,
    /// SQS endpoint, for emulators [default: AWS_ENDPOINT_URL, else the AWS endpoint of the region]
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// RabbitMQ management API, for the unacknowledged count [default: http://BROKER_HOST:15672]
    #[arg(long, env = "CLOUDML_RABBITMQ_MANAGEMENT_URL", value_name = "URL")]
    management_url: Option<String>,
    /// Use the existing queue as it is; declare no queue, exchange or binding
    #[arg(long)]
    no_declare: bool,
    /// Declare a quorum queue with this delivery limit instead of a classic queue
    #[arg(long, value_name = "N")]
    quorum_delivery_limit: Option<u32>,
}

impl QueueArgs {
    fn target(&self) -> QueueTarget<'_> {
        QueueTarget {
            url: &self.queue,
            topology: Topology {
                no_declare: self.no_declare,
                quorum_delivery_limit: self.quorum_delivery_limit,
            },
            endpoint_url: self.endpoint_url.as_deref(),
            management_url: self.management_url.as_deref(),
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Task or sweep file (.toml or .json), or an original payload (.json)
    file: PathBuf,
    /// Tasks trained at once [default: number of CPU cores]
    #[arg(long, short = 'w', value_name = "N")]
    workers: Option<usize>,
    /// libtorch intra-op threads per task [default: 1]
    #[arg(long, value_name = "N")]
    threads_per_task: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto [default: cpu]
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Result format on stdout: table or json
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Run(args) => Overrides {
            tracking_uri: cli.global.tracking_uri.clone(),
            workers: args.workers,
            threads_per_task: args.threads_per_task,
            device: args.device.clone(),
            log_format: cli.global.log_format.clone(),
        },
        Command::Validate { .. }
        | Command::Config
        | Command::Enqueue { .. }
        | Command::Status { .. }
        | Command::Dlq { .. }
        | Command::Invoke { .. }
        | Command::DeleteQueue { .. } => Overrides {
            tracking_uri: cli.global.tracking_uri.clone(),
            log_format: cli.global.log_format.clone(),
            ..Overrides::default()
        },
    };
    let settings = match Settings::load(cli.global.config.as_deref(), &overrides) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    // Progress bars own the terminal during runs; only warnings and errors are logged by default.
    init_logging(&settings.log_format, "warn,lapin=off");

    let result = match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Config => print_settings(&settings),
        Command::Invoke {
            file,
            function,
            concurrency,
            payload_format,
            endpoint_url,
        } => {
            let original = payload_format == "original";
            invoke::invoke(
                &file,
                &function,
                concurrency,
                original,
                endpoint_url.as_deref(),
            )
            .await
        }
        Command::DeleteQueue { queue } => remote::delete_queue(&queue.target()).await,
        Command::Enqueue { file, queue } => remote::enqueue(&file, &queue.target()).await,
        Command::Status {
            queue,
            sweep,
            experiment,
        } => {
            remote::status(
                &queue.target(),
                sweep.as_deref(),
                experiment.as_deref(),
                &settings,
            )
            .await
        }
        Command::Dlq {
            action: DlqAction::Show { queue, limit },
        } => remote::dead_letters(&queue.target(), false, limit).await,
        Command::Dlq {
            action: DlqAction::Redrive { queue },
        } => remote::dead_letters(&queue.target(), true, 0).await,
        Command::Run(args) => local_run::run(&args.file, &settings, &args.output).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn print_settings(settings: &Settings) -> anyhow::Result<ExitCode> {
    // Credentials live only in MLFLOW_TRACKING_* variables, never in Settings, so this prints none.
    println!("{}", toml::to_string(settings)?);
    Ok(ExitCode::SUCCESS)
}

fn validate(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let sweep = Sweep::from_file(file)?;
    println!(
        "{}: valid, {} task{} (sweep {})",
        file.display(),
        sweep.tasks.len(),
        if sweep.tasks.len() == 1 { "" } else { "s" },
        sweep.name
    );
    for (index, expanded) in sweep.tasks.iter().enumerate().take(20) {
        println!("  {index:>4}  {}", describe_varied(&expanded.varied));
    }
    if sweep.tasks.len() > 20 {
        println!("  ... and {} more", sweep.tasks.len() - 20);
    }
    Ok(ExitCode::SUCCESS)
}
