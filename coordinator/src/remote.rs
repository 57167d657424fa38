//! `cloudml enqueue` and `cloudml status`: tasks on a shared queue for worker fleets.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cloudml_shared::config::Settings;
use cloudml_shared::execute::TAG_SWEEP_ID;
use cloudml_shared::queue::amqp::{self, Outgoing, Topology};
use cloudml_shared::queue::QueueUrl;
use cloudml_shared::sweep::Sweep;
use cloudml_shared::tracking::MlflowClient;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Publishes confirms kept in flight at once; pipelining makes enqueueing thousands of tasks fast.
const CONFIRM_WINDOW: usize = 256;

pub async fn enqueue(file: &Path, queue: &str, topology: Topology) -> anyhow::Result<ExitCode> {
    let sweep = Sweep::from_file(file)?;
    let QueueUrl::Amqp(address) = QueueUrl::parse(queue)?;
    let messages = sweep
        .tasks
        .iter()
        .map(|expanded| {
            Ok(Outgoing {
                task_id: expanded.task.id.clone(),
                sweep_id: expanded.task.sweep_id.clone(),
                body: expanded.task.to_message()?,
            })
        })
        .collect::<Result<Vec<_>, cloudml_shared::task::TaskError>>()?;
    let total = messages.len();

    let progress = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} confirmed")
    {
        progress.set_style(style.progress_chars("=> "));
    }
    let started = std::time::Instant::now();
    let failures = amqp::publish(
        &address,
        &topology,
        messages,
        CONFIRM_WINDOW,
        &mut |count| progress.inc(count as u64),
    )
    .await?;
    progress.finish_and_clear();

    for failure in &failures {
        eprintln!("not enqueued: task {}: {}", failure.task_id, failure.reason);
    }
    eprintln!(
        "enqueued {} of {total} task{} to {} in {:.2} s",
        total - failures.len(),
        if total == 1 { "" } else { "s" },
        address.display,
        started.elapsed().as_secs_f64()
    );
    // The sweep id alone on stdout, for scripts: `cloudml status --sweep "$(cloudml enqueue ...)"`.
    println!("{}", sweep.id);
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn status(
    queue: &str,
    sweep: Option<&str>,
    experiment: Option<&str>,
    settings: &Settings,
) -> anyhow::Result<ExitCode> {
    let QueueUrl::Amqp(address) = QueueUrl::parse(queue)?;
    let depth = amqp::depth(&address).await?;
    println!("queue {}", address.display);
    println!("  ready:          {}", depth.ready);
    println!("  consumers:      {}", depth.consumers);
    println!(
        "  dead-lettered:  {} (in {})",
        depth.dead_lettered,
        address.dead_letter_queue()
    );
    // NOTE: AMQP reports no unacknowledged count; the RabbitMQ management API or
    // `rabbitmqctl list_queues messages_unacknowledged` shows it.

    if let Some(sweep_id) = sweep {
        let experiment =
            experiment.context("--sweep needs --experiment, the MLflow experiment of the sweep")?;
        let mlflow = MlflowClient::new(&settings.tracking())?;
        let experiment_id = mlflow.get_or_create_experiment(experiment).await?;
        let runs = mlflow
            .search_runs_by_tag(&experiment_id, TAG_SWEEP_ID, sweep_id)
            .await?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for run in &runs {
            *counts
                .entry(format!("{:?}", run.status).to_uppercase())
                .or_default() += 1;
        }
        println!(
            "sweep {sweep_id} in experiment {experiment:?}: {} runs",
            runs.len()
        );
        for (status, count) in counts {
            println!("  {status:<9} {count}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn delete_queue(queue: &str) -> anyhow::Result<ExitCode> {
    let QueueUrl::Amqp(address) = QueueUrl::parse(queue)?;
    amqp::delete_topology(&address).await?;
    eprintln!(
        "deleted {}, {} and {}",
        address.display,
        address.dead_letter_queue(),
        address.dead_letter_exchange()
    );
    Ok(ExitCode::SUCCESS)
}
