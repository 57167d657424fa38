//! Task and sweep files: one task, or a base task expanded over cases, a grid and repeats.
//!
//! A sweep file has a `base` table, which is a task without `id`. Optional `cases` list tables of
//! overrides applied together, for values that must change in step, such as a dataset and its
//! output units. An optional `grid` gives each path a list of values, and every combination is
//! taken. `repeat` makes identical copies of each combination, like the original's N identical
//! invocations.
//! Override keys are paths into the task: `optimizer.learning_rate`, `model.layers[2].units`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::original::is_original_payload;
use crate::task::{Task, TaskError, SCHEMA_VERSION};

/// Most tasks one sweep may expand to, so a typo in a grid cannot enqueue millions of messages.
pub const MAX_SWEEP_TASKS: usize = 100_000;

/// A task ready to run, with the overrides that distinguish it within its sweep.
#[derive(Debug, Clone)]
pub struct ExpandedTask {
    pub task: Task,
    /// `(path, value)` for every case and grid override applied to this task, in file order.
    pub varied: Vec<(String, Value)>,
}

/// The tasks of one task or sweep file.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub id: String,
    pub name: String,
    pub tasks: Vec<ExpandedTask>,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {field} = {value}, expected {expected}")]
    Field {
        path: String,
        field: String,
        value: String,
        expected: String,
    },
    #[error("{path}: task {index} ({varied}): {error}")]
    Task {
        path: String,
        index: usize,
        varied: String,
        error: TaskError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    #[serde(default)]
    name: Option<String>,
    base: Value,
    #[serde(default)]
    cases: Vec<serde_json::Map<String, Value>>,
    #[serde(default)]
    grid: serde_json::Map<String, Value>,
    #[serde(default = "default_repeat")]
    repeat: u32,
}

fn default_repeat() -> u32 {
    1
}

impl Sweep {
    /// Reads a `.toml` or `.json` task or sweep file and expands it into validated tasks.
    pub fn from_file(path: &Path) -> Result<Sweep, SweepError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| SweepError::Read {
            path: display.clone(),
            error,
        })?;
        let default_name = path.file_stem().map_or_else(
            || "sweep".to_string(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        Sweep::from_str(&text, &display, &default_name)
    }

    /// Parses file text; `origin` names the file in errors. JSON is tried when the text starts with `{`.
    pub fn from_str(text: &str, origin: &str, default_name: &str) -> Result<Sweep, SweepError> {
        let syntax = |message: String| SweepError::Syntax {
            path: origin.to_string(),
            message,
        };
        let document: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|err| syntax(format!("invalid JSON: {err}")))?
        } else {
            let table: toml::Table =
                toml::from_str(text).map_err(|err| syntax(format!("invalid TOML: {err}")))?;
            serde_json::to_value(table).map_err(|err| syntax(err.to_string()))?
        };

        let sweep_id = uuid::Uuid::now_v7().to_string();
        if is_original_payload(&document) {
            let task = Task::from_message(text.as_bytes(), &uuid::Uuid::now_v7().to_string())
                .map_err(|error| SweepError::Task {
                    path: origin.to_string(),
                    index: 0,
                    varied: "original payload".to_string(),
                    error,
                })?;
            return Ok(Sweep {
                id: sweep_id,
                name: default_name.to_string(),
                tasks: vec![ExpandedTask {
                    task,
                    varied: Vec::new(),
                }],
            });
        }
        if document.get("base").is_none() {
            let name = default_name.to_string();
            let task = expand_one(origin, document, &sweep_id, &name, 0, Vec::new())?;
            return Ok(Sweep {
                id: sweep_id,
                name,
                tasks: vec![task],
            });
        }

        let file: SweepFile =
            serde_path_to_error::deserialize(document).map_err(|err| SweepError::Syntax {
                path: origin.to_string(),
                message: format!("{}: {}", err.path(), err.inner()),
            })?;
        if file.base.get("id").is_some() {
            return Err(SweepError::Field {
                path: origin.to_string(),
                field: "base.id".to_string(),
                value: file.base["id"].to_string(),
                expected: "no id in a sweep's base, because each task gets its own".to_string(),
            });
        }
        let name = file
            .name
            .clone()
            .unwrap_or_else(|| default_name.to_string());
        let combinations = combinations(origin, &file)?;

        let mut tasks = Vec::with_capacity(combinations.len() * file.repeat as usize);
        for varied in combinations {
            for _ in 0..file.repeat {
                let index = tasks.len();
                tasks.push(expand_one(
                    origin,
                    file.base.clone(),
                    &sweep_id,
                    &name,
                    index,
                    varied.clone(),
                )?);
            }
        }
        Ok(Sweep {
            id: sweep_id,
            name,
            tasks,
        })
    }
}

/// Lists the override sets, cases times grid points, and checks the total against the limits.
fn combinations(origin: &str, file: &SweepFile) -> Result<Vec<Vec<(String, Value)>>, SweepError> {
    let field_error = |field: String, value: String, expected: &str| SweepError::Field {
        path: origin.to_string(),
        field,
        value,
        expected: expected.to_string(),
    };
    if !(1..=10_000).contains(&file.repeat) {
        return Err(field_error(
            "repeat".into(),
            file.repeat.to_string(),
            "1 <= repeat <= 10000",
        ));
    }

    let mut combinations: Vec<Vec<(String, Value)>> = if file.cases.is_empty() {
        vec![Vec::new()]
    } else {
        file.cases
            .iter()
            .map(|case| {
                case.iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect()
            })
            .collect()
    };
    for (key, values) in &file.grid {
        let values = match values {
            Value::Array(values) if !values.is_empty() => values,
            other => {
                return Err(field_error(
                    format!("grid.{key}"),
                    other.to_string(),
                    "a non-empty array of values",
                ))
            }
        };
        let total = combinations.len().saturating_mul(values.len());
        if total.saturating_mul(file.repeat as usize) > MAX_SWEEP_TASKS {
            return Err(field_error(
                "grid".into(),
                format!("more than {MAX_SWEEP_TASKS} tasks"),
                "at most 100000 tasks per sweep",
            ));
        }
        combinations = combinations
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |value| {
                    let mut next = prefix.clone();
                    next.push((key.clone(), value.clone()));
                    next
                })
            })
            .collect();
    }
    if combinations.len().saturating_mul(file.repeat as usize) > MAX_SWEEP_TASKS {
        return Err(field_error(
            "repeat".into(),
            file.repeat.to_string(),
            "at most 100000 tasks per sweep",
        ));
    }
    Ok(combinations)
}

fn expand_one(
    origin: &str,
    mut document: Value,
    sweep_id: &str,
    sweep_name: &str,
    index: usize,
    varied: Vec<(String, Value)>,
) -> Result<ExpandedTask, SweepError> {
    let task_error = |error: TaskError, varied: &[(String, Value)]| SweepError::Task {
        path: origin.to_string(),
        index,
        varied: describe_varied(varied),
        error,
    };

    for (path, value) in &varied {
        set_path(&mut document, path, value.clone()).map_err(|message| SweepError::Field {
            path: origin.to_string(),
            field: path.clone(),
            value: value.to_string(),
            expected: message,
        })?;
    }

    let object = document.as_object_mut().ok_or_else(|| SweepError::Syntax {
        path: origin.to_string(),
        message: "expected a table of task fields".to_string(),
    })?;
    object
        .entry("schema_version")
        .or_insert_with(|| Value::from(SCHEMA_VERSION));
    object
        .entry("id")
        .or_insert_with(|| Value::from(uuid::Uuid::now_v7().to_string()));
    object
        .entry("sweep_id")
        .or_insert_with(|| Value::from(sweep_id));
    let tags = object
        .entry("tags")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if let Value::Object(tags) = tags {
        tags.entry("mlflow.runName")
            .or_insert_with(|| Value::from(format!("{sweep_name}-{index:04}")));
    }

    let task = Task::from_value(document).map_err(|err| task_error(err, &varied))?;
    task.validate().map_err(|err| task_error(err, &varied))?;
    Ok(ExpandedTask { task, varied })
}

/// Formats overrides as `path=value, ...` for tables and errors.
pub fn describe_varied(varied: &[(String, Value)]) -> String {
    if varied.is_empty() {
        return "base".to_string();
    }
    varied
        .iter()
        .map(|(path, value)| match value {
            Value::String(text) => format!("{path}={text}"),
            Value::Object(object) => match object
                .get("kind")
                .or_else(|| object.get("name"))
                .and_then(Value::as_str)
            {
                Some(kind) => format!("{path}={kind}"),
                None => format!("{path}={{...}}"),
            },
            Value::Array(_) => format!("{path}=[...]"),
            other => format!("{path}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sets `value` at a path such as `model.layers[2].units`, creating missing object keys.
fn set_path(document: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let segments = parse_path(path)?;
    let mut current = document;
    for segment in segments {
        current = match segment {
            PathSegment::Key(key) => match current {
                Value::Object(object) => object.entry(key).or_insert(Value::Null),
                Value::Null => {
                    *current = Value::Object(serde_json::Map::new());
                    match current {
                        Value::Object(object) => object.entry(key).or_insert(Value::Null),
                        _ => unreachable!("just replaced with an object"),
                    }
                }
                _ => {
                    return Err(format!(
                        "a path into a table, but {key:?} is below a non-table value"
                    ))
                }
            },
            PathSegment::Index(position) => match current {
                Value::Array(items) => {
                    let length = items.len();
                    items.get_mut(position).ok_or_else(|| {
                        format!("an index below {length}, the length of that array")
                    })?
                }
                _ => {
                    return Err(format!(
                        "[{position}] applied to an array, but the value there is not one"
                    ))
                }
            },
        };
    }
    *current = value;
    Ok(())
}

enum PathSegment {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Result<Vec<PathSegment>, String> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if key.is_empty() && segments.is_empty() {
            return Err("a path such as optimizer.learning_rate or model.layers[0].units".into());
        }
        if !key.is_empty() {
            segments.push(PathSegment::Key(key.to_string()));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped
                .find(']')
                .ok_or_else(|| "a closing ] after an index".to_string())?;
            let position = stripped[..end]
                .parse::<usize>()
                .map_err(|_| format!("a whole-number index, not {:?}", &stripped[..end]))?;
            segments.push(PathSegment::Index(position));
            rest = &stripped[end + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("a path without trailing text {rest:?}"));
        }
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        experiment = "sweep-test"
        loss = "sparse_categorical_crossentropy"
        epochs = 2
        batch_size = 16
        optimizer = { name = "adam" }
        dataset = { kind = "example", name = "iris" }
        model = { layers = [ { type = "dense", units = 8, activation = "relu" }, { type = "dense", units = 3, activation = "softmax" } ] }
    "#;

    fn sweep_text(extra: &str) -> String {
        let base = BASE
            .lines()
            .map(|line| line.trim())
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        format!("{extra}\n[base]\n{base}\n")
    }

    #[test]
    fn single_task_file_gets_id() {
        let sweep = Sweep::from_str(BASE, "task.toml", "task").unwrap();
        assert_eq!(sweep.tasks.len(), 1);
        assert!(!sweep.tasks[0].task.id.is_empty());
    }

    #[test]
    fn grid_times_repeat() {
        let text = format!(
            "repeat = 2\n{}[grid]\n\"optimizer.learning_rate\" = [0.001, 0.01]\n\"model.layers[0].units\" = [4, 8, 16]\n",
            sweep_text("")
        );
        let sweep = Sweep::from_str(&text, "s.toml", "s").unwrap();
        assert_eq!(sweep.tasks.len(), 12);
        let ids: std::collections::BTreeSet<_> = sweep.tasks.iter().map(|t| &t.task.id).collect();
        assert_eq!(ids.len(), 12);
    }

    #[test]
    fn grid_sets_nested_value() {
        let text = format!(
            "{}[grid]\n\"model.layers[0].units\" = [5]\n",
            sweep_text("")
        );
        let sweep = Sweep::from_str(&text, "s.toml", "s").unwrap();
        assert_eq!(
            sweep.tasks[0].task.model.layers[0],
            crate::task::Layer::Dense {
                units: 5,
                activation: crate::task::Activation::Relu,
                input_size: None,
            }
        );
    }

    #[test]
    fn grid_index_out_of_range() {
        let text = format!(
            "{}[grid]\n\"model.layers[7].units\" = [5]\n",
            sweep_text("")
        );
        let message = Sweep::from_str(&text, "s.toml", "s")
            .unwrap_err()
            .to_string();
        assert!(message.contains("model.layers[7].units"), "{message}");
    }

    #[test]
    fn invalid_grid_value_names_task() {
        let text = format!(
            "{}[grid]\n\"model.layers[0].units\" = [0]\n",
            sweep_text("")
        );
        let message = Sweep::from_str(&text, "s.toml", "s")
            .unwrap_err()
            .to_string();
        assert!(message.contains("model.layers[0].units = 0"), "{message}");
    }

    #[test]
    fn oversized_grid_rejected() {
        let values = (0..400)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let text = format!(
            "{}[grid]\n\"seed\" = [{values}]\n\"epochs\" = [{values}]\n",
            sweep_text("")
        );
        let message = Sweep::from_str(&text, "s.toml", "s")
            .unwrap_err()
            .to_string();
        assert!(message.contains("at most 100000 tasks"), "{message}");
    }
}
