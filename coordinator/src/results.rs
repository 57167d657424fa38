//! Results of a local run: per-task outcomes, the progress line and the closing table.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cloudml_shared::sweep::{describe_varied, Sweep};
use cloudml_shared::worker::TaskEvent;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub enum TaskResult {
    Pending,
    Finished {
        run_id: String,
        metrics: Vec<(String, f64)>,
        duration: Duration,
        reused: bool,
    },
    Failed {
        attempts: u32,
        error: String,
    },
}

/// Outcomes in sweep order, keyed by task id.
pub struct Results {
    order: Vec<String>,
    names: BTreeMap<String, String>,
    varied: BTreeMap<String, String>,
    outcomes: BTreeMap<String, TaskResult>,
    finished: usize,
    failed: usize,
    retries: usize,
}

impl Results {
    pub fn new(sweep: &Sweep) -> Self {
        let order: Vec<String> = sweep.tasks.iter().map(|t| t.task.id.clone()).collect();
        let names = sweep
            .tasks
            .iter()
            .map(|t| {
                let name = t
                    .task
                    .tags
                    .get("mlflow.runName")
                    .cloned()
                    .unwrap_or_else(|| t.task.id.clone());
                (t.task.id.clone(), name)
            })
            .collect();
        let varied = sweep
            .tasks
            .iter()
            .map(|t| (t.task.id.clone(), describe_varied(&t.varied)))
            .collect();
        let outcomes = order
            .iter()
            .map(|id| (id.clone(), TaskResult::Pending))
            .collect();
        Results {
            order,
            names,
            varied,
            outcomes,
            finished: 0,
            failed: 0,
            retries: 0,
        }
    }

    /// Records an event; returns a JSON line describing it for non-terminal output.
    pub fn record(&mut self, event: &TaskEvent) -> Option<String> {
        match event {
            TaskEvent::Started { .. } => None,
            TaskEvent::Finished(report) => {
                self.finished += 1;
                self.outcomes.insert(
                    report.task_id.clone(),
                    TaskResult::Finished {
                        run_id: report.run_id.clone(),
                        metrics: report.test_metrics.clone(),
                        duration: report.duration,
                        reused: report.already_finished,
                    },
                );
                Some(
                    json!({
                        "event": "finished",
                        "task_id": report.task_id,
                        "run_id": report.run_id,
                        "metrics": report.test_metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
                        "seconds": report.duration.as_secs_f64(),
                    })
                    .to_string(),
                )
            }
            TaskEvent::Retrying {
                task_id,
                attempt,
                error,
            } => {
                self.retries += 1;
                Some(json!({"event": "retrying", "task_id": task_id, "attempt": attempt, "error": error}).to_string())
            }
            TaskEvent::Failed {
                message_id,
                task_id,
                attempt,
                error,
            } => {
                self.failed += 1;
                let id = task_id.clone().unwrap_or_else(|| message_id.clone());
                self.outcomes.insert(
                    id.clone(),
                    TaskResult::Failed {
                        attempts: *attempt,
                        error: error.clone(),
                    },
                );
                Some(
                    json!({"event": "failed", "task_id": id, "attempt": attempt, "error": error})
                        .to_string(),
                )
            }
        }
    }

    /// Marks a task that exhausted its retries on transient errors as failed.
    pub fn note_dead_letter(&mut self, task_id: &str, attempts: u32, error: &str) {
        if let Some(outcome) = self.outcomes.get_mut(task_id) {
            if !matches!(outcome, TaskResult::Failed { .. }) {
                *outcome = TaskResult::Failed {
                    attempts,
                    error: error.to_string(),
                };
            }
        }
    }

    pub fn progress_message(&self) -> String {
        let mut message = format!("{} finished", self.finished);
        if self.failed > 0 {
            message.push_str(&format!(", {} failed", self.failed));
        }
        if self.retries > 0 {
            message.push_str(&format!(", {} retried", self.retries));
        }
        message
    }

    pub fn rows(&self) -> Vec<&TaskResult> {
        self.order
            .iter()
            .filter_map(|id| self.outcomes.get(id))
            .collect()
    }

    fn metric_names(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .outcomes
            .values()
            .filter_map(|outcome| match outcome {
                TaskResult::Finished { metrics, .. } => {
                    Some(metrics.iter().map(|(name, _)| name.clone()))
                }
                _ => None,
            })
            .flatten()
            .collect();
        // test_loss first, then the rest alphabetically.
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_by_key(|name| (name != "test_loss", name.clone()));
        names
    }

    pub fn print_table(&self, elapsed: Duration) {
        let metric_names = self.metric_names();
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        let mut header = vec![
            "run".to_string(),
            "run id".to_string(),
            "varied".to_string(),
            "status".to_string(),
        ];
        header.extend(metric_names.iter().cloned());
        header.push("seconds".to_string());
        table.set_header(header);

        let mut failures = Vec::new();
        for id in &self.order {
            let name = self.names.get(id).cloned().unwrap_or_default();
            let varied = self.varied.get(id).cloned().unwrap_or_default();
            let mut row = vec![Cell::new(name)];
            match self.outcomes.get(id) {
                Some(TaskResult::Finished {
                    run_id,
                    metrics,
                    duration,
                    reused,
                }) => {
                    row.push(Cell::new(run_id));
                    row.push(Cell::new(varied));
                    row.push(Cell::new(if *reused {
                        "FINISHED (earlier)"
                    } else {
                        "FINISHED"
                    }));
                    for metric in &metric_names {
                        let value = metrics
                            .iter()
                            .find(|(name, _)| name == metric)
                            .map(|(_, value)| *value);
                        row.push(
                            Cell::new(
                                value.map_or_else(String::new, |value| format!("{value:.4}")),
                            )
                            .set_alignment(CellAlignment::Right),
                        );
                    }
                    row.push(
                        Cell::new(format!("{:.2}", duration.as_secs_f64()))
                            .set_alignment(CellAlignment::Right),
                    );
                }
                Some(TaskResult::Failed { attempts, error }) => {
                    row.push(Cell::new("-"));
                    row.push(Cell::new(varied));
                    row.push(Cell::new(format!(
                        "FAILED ({attempts} attempt{})",
                        if *attempts == 1 { "" } else { "s" }
                    )));
                    row.extend(metric_names.iter().map(|_| Cell::new("")));
                    row.push(Cell::new(""));
                    failures.push((
                        self.names.get(id).cloned().unwrap_or_default(),
                        error.clone(),
                    ));
                }
                Some(TaskResult::Pending) | None => {
                    row.push(Cell::new("-"));
                    row.push(Cell::new(varied));
                    row.push(Cell::new("NOT RUN"));
                    row.extend(metric_names.iter().map(|_| Cell::new("")));
                    row.push(Cell::new(""));
                }
            }
            table.add_row(row);
        }
        println!("{table}");
        let pending = self.order.len() - self.finished - self.failed;
        println!(
            "{} finished, {} failed{} in {:.1} s",
            self.finished,
            self.failed,
            if pending > 0 {
                format!(", {pending} not run")
            } else {
                String::new()
            },
            elapsed.as_secs_f64()
        );
        for (name, error) in failures {
            println!("{name}: {error}");
        }
    }

    pub fn to_json(&self, sweep: &Sweep, elapsed: Duration) -> Value {
        let tasks: Vec<Value> = self
            .order
            .iter()
            .map(|id| {
                let mut entry = json!({
                    "task_id": id,
                    "run_name": self.names.get(id),
                    "varied": self.varied.get(id),
                });
                match self.outcomes.get(id) {
                    Some(TaskResult::Finished {
                        run_id,
                        metrics,
                        duration,
                        reused,
                    }) => {
                        entry["status"] = json!("FINISHED");
                        entry["run_id"] = json!(run_id);
                        entry["metrics"] =
                            json!(metrics.iter().cloned().collect::<BTreeMap<_, _>>());
                        entry["seconds"] = json!(duration.as_secs_f64());
                        entry["reused_earlier_run"] = json!(reused);
                    }
                    Some(TaskResult::Failed { attempts, error }) => {
                        entry["status"] = json!("FAILED");
                        entry["attempts"] = json!(attempts);
                        entry["error"] = json!(error);
                    }
                    Some(TaskResult::Pending) | None => entry["status"] = json!("NOT_RUN"),
                }
                entry
            })
            .collect();
        json!({
            "sweep_id": sweep.id,
            "sweep_name": sweep.name,
            "seconds": elapsed.as_secs_f64(),
            "tasks": tasks,
        })
    }
}
