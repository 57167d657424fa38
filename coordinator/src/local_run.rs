//! `cloudml run`: a sweep on this machine, through the embedded queue and in-process workers.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cloudml_shared::config::Settings;
use cloudml_shared::execute::Executor;
use cloudml_shared::queue::local::LocalQueue;
use cloudml_shared::sweep::Sweep;
use cloudml_shared::tracking::MlflowClient;
use cloudml_shared::worker::{run_worker, TaskEvent, WorkerConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::results::{Results, TaskResult};

pub async fn run(file: &Path, settings: &Settings, output: &str) -> anyhow::Result<ExitCode> {
    let sweep = Sweep::from_file(file)?;
    let mlflow = MlflowClient::new(&settings.tracking())?;

    // Reach MLflow before training anything, so a wrong address fails in seconds, not per task.
    let experiments: BTreeSet<&str> = sweep
        .tasks
        .iter()
        .map(|t| t.task.experiment.as_str())
        .collect();
    let mut experiment_ids = Vec::new();
    for name in experiments {
        let id = mlflow
            .get_or_create_experiment(name)
            .await
            .with_context(|| format!("cannot prepare MLflow experiment {name:?}"))?;
        experiment_ids.push((name.to_string(), id));
    }

    let total = sweep.tasks.len();
    let workers = settings.workers.min(total).max(1);
    eprintln!(
        "sweep {} ({}): {total} task{}, {workers} worker{}, MLflow at {}",
        sweep.name,
        sweep.id,
        if total == 1 { "" } else { "s" },
        if workers == 1 { "" } else { "s" },
        mlflow.uri()
    );

    let queue = Arc::new(LocalQueue::new(settings.max_attempts));
    for expanded in &sweep.tasks {
        queue.push(expanded.task.id.clone(), expanded.task.to_message()?);
    }

    let executor = Arc::new(Executor::new(
        mlflow.clone(),
        settings.train_options()?,
        "local",
    ));
    let config = WorkerConfig {
        concurrency: workers,
        poll_wait: Duration::from_millis(500),
        retry_base_delay: settings.retry_base_delay(),
        shutdown_grace: Duration::from_secs(30),
        ..WorkerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let (events_sender, mut events) = mpsc::unbounded_channel();
    let worker = tokio::spawn(run_worker(
        queue.clone(),
        executor,
        config,
        shutdown.clone(),
        Some(events_sender),
    ));

    let progress = progress_bar(total as u64);
    let started = Instant::now();
    let mut results = Results::new(&sweep);
    let mut settled = 0usize;
    let mut interrupted = false;
    while settled < total {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => break,
            },
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                progress.println("interrupted: finishing tasks in progress, starting no new ones");
                shutdown.cancel();
                continue;
            }
        };
        let line = results.record(&event);
        if let Some(line) = line.filter(|_| progress.is_hidden()) {
            eprintln!("{line}");
        }
        match event {
            TaskEvent::Finished(_) | TaskEvent::Failed { .. } => {
                settled += 1;
                progress.inc(1);
                progress.set_message(results.progress_message());
            }
            TaskEvent::Started { .. } | TaskEvent::Retrying { .. } => {}
        }
    }
    shutdown.cancel();
    let summary = worker.await.context("worker loop stopped unexpectedly")?;
    progress.finish_and_clear();

    for dead in queue.dead_letters() {
        results.note_dead_letter(&dead.message_id, dead.attempts, &dead.error);
    }
    let elapsed = started.elapsed();
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&results.to_json(&sweep, elapsed))?
        );
    } else {
        results.print_table(elapsed);
        for (name, id) in &experiment_ids {
            println!(
                "MLflow UI for experiment {name:?}: {}/#/experiments/{id}",
                mlflow.uri()
            );
        }
    }
    tracing::debug!(?summary, "worker summary");

    let all_finished = results
        .rows()
        .iter()
        .all(|row| matches!(row, TaskResult::Finished { .. }));
    Ok(if all_finished && !interrupted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Creates a progress bar on a terminal. Elsewhere it is hidden and one line per settled task is printed instead.
fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} tasks {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
