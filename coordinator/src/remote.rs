//! `cloudml enqueue`, `status`, `dlq` and `delete-queue`: tasks on a shared queue for worker fleets.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cloudml_shared::config::Settings;
use cloudml_shared::execute::TAG_SWEEP_ID;
use cloudml_shared::queue::amqp::{self, Topology};
use cloudml_shared::queue::{sqs, QueueUrl};
use cloudml_shared::sweep::Sweep;
use cloudml_shared::tracking::MlflowClient;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Publisher confirms kept in flight at once; pipelining makes enqueueing thousands of tasks fast.
const CONFIRM_WINDOW: usize = 256;
/// `SendMessageBatch` requests in flight at once.
const SQS_BATCHES_IN_FLIGHT: usize = 8;

/// A queue named on the command line, with the options to reach it.
pub struct QueueTarget<'a> {
    pub url: &'a str,
    pub topology: Topology,
    pub endpoint_url: Option<&'a str>,
    /// RabbitMQ management API; by default the broker's host on port 15672.
    pub management_url: Option<&'a str>,
}

fn progress_bar(total: usize, label: &str) -> ProgressBar {
    let progress = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {label}"
    )) {
        progress.set_style(style.progress_chars("=> "));
    }
    progress
}

pub async fn enqueue(file: &Path, target: &QueueTarget<'_>) -> anyhow::Result<ExitCode> {
    let sweep = Sweep::from_file(file)?;
    // Encoding checks each message against the 256 KiB limit before anything is sent.
    let mut bodies = Vec::with_capacity(sweep.tasks.len());
    for expanded in &sweep.tasks {
        let body = expanded
            .task
            .to_message()
            .with_context(|| format!("task {} cannot be enqueued", expanded.task.id))?;
        bodies.push((
            expanded.task.id.clone(),
            expanded.task.sweep_id.clone(),
            body,
        ));
    }
    let total = bodies.len();
    let started = std::time::Instant::now();

    let (failures, destination): (Vec<(String, String)>, String) =
        match QueueUrl::parse(target.url)? {
            QueueUrl::Amqp(address) => {
                let progress = progress_bar(total, "confirmed");
                let messages = bodies
                    .into_iter()
                    .map(|(task_id, sweep_id, body)| amqp::Outgoing {
                        task_id,
                        sweep_id,
                        body,
                    })
                    .collect();
                let failures = amqp::publish(
                    &address,
                    &target.topology,
                    messages,
                    CONFIRM_WINDOW,
                    &mut |count| progress.inc(count as u64),
                )
                .await?;
                progress.finish_and_clear();
                let failures = failures
                    .into_iter()
                    .map(|f| (f.task_id, f.reason))
                    .collect();
                (failures, address.display.clone())
            }
            QueueUrl::Sqs(address) => {
                let client = sqs::client(target.endpoint_url).await;
                let url = sqs::queue_url(&client, &address).await?;
                let progress = progress_bar(total, "sent");
                let messages = bodies
                    .into_iter()
                    .map(|(task_id, sweep_id, body)| sqs::Outgoing {
                        task_id,
                        sweep_id,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    })
                    .collect();
                let failures =
                    sqs::send(&client, &url, messages, SQS_BATCHES_IN_FLIGHT, &|count| {
                        progress.inc(count as u64)
                    })
                    .await;
                progress.finish_and_clear();
                let failures = failures
                    .into_iter()
                    .map(|f| (f.task_id, f.reason))
                    .collect();
                (failures, url)
            }
        };

    for (task_id, reason) in &failures {
        eprintln!("not enqueued: task {task_id}: {reason}");
    }
    eprintln!(
        "enqueued {} of {total} task{} to {destination} in {:.2} s",
        total - failures.len(),
        if total == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    // The sweep id alone on stdout, for scripts: `cloudml status --sweep "$(cloudml enqueue ...)"`.
    if failures.len() < total {
        println!("{}", sweep.id);
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn status(
    target: &QueueTarget<'_>,
    sweep: Option<&str>,
    experiment: Option<&str>,
    settings: &Settings,
) -> anyhow::Result<ExitCode> {
    match QueueUrl::parse(target.url)? {
        QueueUrl::Amqp(address) => {
            let depth = amqp::depth(&address).await?;
            println!("queue {}", address.display);
            println!("  ready:          {}", depth.ready);
            println!("  consumers:      {}", depth.consumers);
            // AMQP reports no unacknowledged count; the management API does.
            let management_url = target
                .management_url
                .unwrap_or(&address.default_management_url);
            match amqp::management_counts(&address, management_url).await {
                Ok((_, unacknowledged)) => println!("  unacknowledged: {unacknowledged}"),
                Err(err) => println!(
                    "  unacknowledged: unknown ({err}; enable the rabbitmq_management plugin or pass --management-url)"
                ),
            }
            println!(
                "  dead-lettered:  {} (in {})",
                depth.dead_lettered,
                address.dead_letter_queue()
            );
        }
        QueueUrl::Sqs(address) => {
            let client = sqs::client(target.endpoint_url).await;
            let url = sqs::queue_url(&client, &address).await?;
            let depth = sqs::depth(&client, &url).await?;
            println!("queue {url}");
            println!("  visible:        {}", depth.visible);
            println!("  in flight:      {}", depth.in_flight);
            println!("  delayed:        {}", depth.delayed);
            match depth.dead_letter {
                Some((dlq_url, count)) => println!("  dead-lettered:  {count} (in {dlq_url})"),
                None => println!("  dead-lettered:  no redrive policy, so no dead-letter queue"),
            }
        }
    }

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

/// `cloudml dlq show` (with `redrive = false`) or `cloudml dlq redrive`.
pub async fn dead_letters(
    target: &QueueTarget<'_>,
    redrive: bool,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    match QueueUrl::parse(target.url)? {
        QueueUrl::Amqp(address) => {
            anyhow::ensure!(
                !redrive,
                "redrive is implemented for SQS; on RabbitMQ use a shovel from {} to {}",
                address.dead_letter_queue(),
                address.queue
            );
            for letter in amqp::peek_dead_letters(&address, limit).await? {
                println!(
                    "{}\t{}\t{}",
                    letter.message_id,
                    letter.error.unwrap_or_default(),
                    excerpt(&String::from_utf8_lossy(&letter.body))
                );
            }
        }
        QueueUrl::Sqs(address) => {
            let client = sqs::client(target.endpoint_url).await;
            let url = sqs::queue_url(&client, &address).await?;
            let dlq_url = sqs::dead_letter_url(&client, &url)
                .await?
                .with_context(|| {
                    format!("queue {url} has no redrive policy, so no dead-letter queue")
                })?;
            if redrive {
                let moved = sqs::redrive(&client, &dlq_url, &url).await?;
                eprintln!(
                    "moved {moved} message{} from {dlq_url} to {url}",
                    if moved == 1 { "" } else { "s" }
                );
            } else {
                for message in sqs::peek(&client, &dlq_url, limit).await? {
                    println!(
                        "{}\treceived {} times\t{}",
                        message.message_id,
                        message.receive_count,
                        excerpt(&message.body)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn excerpt(body: &str) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > 120 {
        format!("{}...", flat.chars().take(117).collect::<String>())
    } else {
        flat
    }
}

pub async fn delete_queue(target: &QueueTarget<'_>) -> anyhow::Result<ExitCode> {
    match QueueUrl::parse(target.url)? {
        QueueUrl::Amqp(address) => {
            amqp::delete_topology(&address).await?;
            eprintln!(
                "deleted {}, {} and {}",
                address.display,
                address.dead_letter_queue(),
                address.dead_letter_exchange()
            );
        }
        QueueUrl::Sqs(_) => anyhow::bail!(
            "delete-queue only manages RabbitMQ topology; SQS queues belong to your infrastructure templates"
        ),
    }
    Ok(ExitCode::SUCCESS)
}
