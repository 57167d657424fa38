//! The Python original's payload, accepted unchanged and converted to a [`Task`].
//!
//! It looks like `{"layers": [["Dense", 64, "relu", 20], ["Dropout", 0.5], ["Dense", 1, "sigmoid"]],
//! "epochs": 3, "batch_size": 128, "experiment_name": "...", "master_ip": "http://host:5000/"}`.
//! A layer is `[type, units-or-rate, activation?, input_dim?]`; the container variant sent every
//! number as a numeric string, so both forms are accepted.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::task::{
    Activation, DatasetSpec, Layer, Loss, Metric, ModelSpec, Normalization, OptimizerSpec, Task,
    TaskError, SCHEMA_VERSION,
};

/// Features in the original's synthetic data when the first layer gives no `input_dim`.
const ORIGINAL_FEATURES: u32 = 20;

/// The original payload after its numbers have been read, before conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalPayload {
    pub layers: Vec<OriginalLayer>,
    pub epochs: u32,
    pub batch_size: u32,
    pub experiment_name: String,
    /// The tracking server the original sent results to. Workers use their own configured server.
    pub master_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OriginalLayer {
    Dense {
        units: u32,
        activation: Activation,
        input_dim: Option<u32>,
    },
    Dropout {
        rate: f64,
    },
}

/// Tells an original payload (a top-level `layers` array, no `model`) from a task message.
pub fn is_original_payload(value: &Value) -> bool {
    value.get("schema_version").is_none()
        && value.get("model").is_none()
        && value.get("layers").is_some_and(Value::is_array)
}

impl OriginalPayload {
    /// Reads the payload from JSON, naming the field of the first value that does not fit.
    pub fn from_value(value: Value) -> Result<Self, TaskError> {
        let object = value
            .as_object()
            .ok_or_else(|| TaskError::Parse("original payload: expected a JSON object".into()))?;

        let layers_value = object
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| TaskError::invalid_field("layers", "missing", "an array of layers"))?;
        let layers = layers_value
            .iter()
            .enumerate()
            .map(|(index, layer)| parse_layer(index, layer))
            .collect::<Result<Vec<_>, _>>()?;

        let experiment_name = match object.get("experiment_name") {
            Some(Value::String(name)) => name.clone(),
            Some(other) => {
                return Err(TaskError::invalid_field(
                    "experiment_name",
                    other,
                    "a string",
                ))
            }
            None => {
                return Err(TaskError::invalid_field(
                    "experiment_name",
                    "missing",
                    "a string",
                ))
            }
        };
        let master_ip = match object.get("master_ip") {
            Some(Value::String(uri)) => Some(uri.clone()),
            Some(Value::Null) | None => None,
            Some(other) => {
                return Err(TaskError::invalid_field("master_ip", other, "a URL string"))
            }
        };

        Ok(OriginalPayload {
            layers,
            epochs: read_count(object.get("epochs"), "epochs")?,
            batch_size: read_count(object.get("batch_size"), "batch_size")?,
            experiment_name,
            master_ip,
        })
    }

    /// Converts to a task that trains what the original trained: binary cross-entropy, RMSprop,
    /// accuracy, on 1000x`input_dim` uniform features with 0/1 labels and a 100-row test set.
    pub fn into_task(self, id: &str) -> Result<Task, TaskError> {
        let input_dim = self.layers.iter().find_map(|layer| match layer {
            OriginalLayer::Dense { input_dim, .. } => *input_dim,
            OriginalLayer::Dropout { .. } => None,
        });
        let features = input_dim.unwrap_or(ORIGINAL_FEATURES);

        let layers = self
            .layers
            .into_iter()
            .map(|layer| match layer {
                OriginalLayer::Dense {
                    units,
                    activation,
                    input_dim,
                } => Layer::Dense {
                    units,
                    activation,
                    input_size: input_dim,
                },
                OriginalLayer::Dropout { rate } => Layer::Dropout { rate },
            })
            .collect();

        let mut tags = BTreeMap::from([("payload_format".to_string(), "original".to_string())]);
        if let Some(uri) = &self.master_ip {
            tags.insert("original_master_ip".to_string(), redact_userinfo(uri));
        }

        Ok(Task {
            schema_version: SCHEMA_VERSION,
            id: id.to_string(),
            sweep_id: None,
            experiment: self.experiment_name,
            model: ModelSpec {
                input_shape: Some(vec![features]),
                layers,
            },
            loss: Loss::BinaryCrossentropy,
            optimizer: OptimizerSpec::default(),
            metrics: vec![Metric::Accuracy],
            epochs: self.epochs,
            batch_size: self.batch_size,
            // The original drew fresh random data on every invocation; seeding from the id keeps
            // identical payloads distinct while a redelivery of one task stays reproducible.
            seed: stable_hash(id),
            dataset: DatasetSpec::Synthetic {
                train_rows: 1000,
                test_rows: 100,
                features,
                classes: 2,
            },
            normalization: Normalization::None,
            validation_split: 0.0,
            early_stopping: None,
            tags,
        })
    }
}

fn parse_layer(index: usize, layer: &Value) -> Result<OriginalLayer, TaskError> {
    let field = |position: usize| format!("layers[{index}][{position}]");
    let items = layer.as_array().ok_or_else(|| {
        TaskError::invalid_field(format!("layers[{index}]"), layer, "[type, size, ...]")
    })?;
    let kind = items.first().and_then(Value::as_str).ok_or_else(|| {
        TaskError::invalid_field(
            field(0),
            json_or_missing(items.first()),
            "\"Dense\" or \"Dropout\"",
        )
    })?;

    match kind.to_ascii_lowercase().as_str() {
        "dense" => {
            if items.len() > 4 {
                return Err(TaskError::invalid_field(
                    format!("layers[{index}]"),
                    layer,
                    "[\"Dense\", units, activation?, input_dim?]",
                ));
            }
            let units = read_count(items.get(1), &field(1))?;
            let activation = match items.get(2) {
                None | Some(Value::Null) => Activation::Linear,
                Some(value) => serde_json::from_value(value.clone()).map_err(|_| {
                    TaskError::invalid_field(
                        field(2),
                        value,
                        "one of relu, sigmoid, tanh, softmax, linear, elu, selu, leaky_relu, gelu",
                    )
                })?,
            };
            let input_dim = match items.get(3) {
                None | Some(Value::Null) => None,
                Some(value) => Some(read_count(Some(value), &field(3))?),
            };
            Ok(OriginalLayer::Dense {
                units,
                activation,
                input_dim,
            })
        }
        "dropout" => {
            if items.len() != 2 {
                return Err(TaskError::invalid_field(
                    format!("layers[{index}]"),
                    layer,
                    "[\"Dropout\", rate]",
                ));
            }
            let rate = read_number(items.get(1), &field(1))?;
            Ok(OriginalLayer::Dropout { rate })
        }
        _ => Err(TaskError::invalid_field(
            field(0),
            format!("{kind:?}"),
            "\"Dense\" or \"Dropout\", the layers the original payload supports",
        )),
    }
}

fn json_or_missing(value: Option<&Value>) -> String {
    value.map_or_else(|| "missing".to_string(), Value::to_string)
}

/// Reads a number given as a JSON number or a numeric string.
fn read_number(value: Option<&Value>, field: &str) -> Result<f64, TaskError> {
    let parsed = match value {
        Some(Value::Number(number)) => number.as_f64(),
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed.filter(|number| number.is_finite()).ok_or_else(|| {
        TaskError::invalid_field(field, json_or_missing(value), "a number or numeric string")
    })
}

/// Reads a positive whole number given as a JSON number or a numeric string.
fn read_count(value: Option<&Value>, field: &str) -> Result<u32, TaskError> {
    let number = read_number(value, field)?;
    if number.fract() != 0.0 || number < 1.0 || number > f64::from(u32::MAX) {
        return Err(TaskError::invalid_field(
            field,
            json_or_missing(value),
            "a whole number >= 1",
        ));
    }
    Ok(number as u32)
}

/// Removes `user:password@` from a URL so it can be recorded.
fn redact_userinfo(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            // Both setters only fail for URLs without a host, which have no userinfo to clear.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Ok(_) => uri.to_string(),
        Err(_) => "(not a URL)".to_string(),
    }
}

/// 64-bit FNV-1a, stable across builds and platforms, unlike `std`'s hasher.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original_json() -> Value {
        serde_json::json!({
            "layers": [["Dense", 64, "relu", 20], ["Dropout", 0.5], ["Dense", 64, "relu"], ["Dropout", 0.5], ["Dense", 1, "sigmoid"]],
            "epochs": 3, "batch_size": 128, "experiment_name": "lambda-test", "master_ip": "http://10.0.0.5:5000/"
        })
    }

    #[test]
    fn original_payload_converts() {
        let task = OriginalPayload::from_value(original_json())
            .unwrap()
            .into_task("abc")
            .unwrap();
        task.validate().unwrap();
        assert_eq!(task.model.layers.len(), 5);
        assert_eq!(task.model.input_shape, Some(vec![20]));
        assert_eq!(task.epochs, 3);
        assert_eq!(task.batch_size, 128);
        assert_eq!(task.loss, Loss::BinaryCrossentropy);
        assert_eq!(task.experiment, "lambda-test");
    }

    #[test]
    fn original_payload_numeric_strings() {
        let payload = serde_json::json!({
            "layers": [["Dense", "64", "relu", "20"], ["Dropout", "0.5"], ["Dense", "1", "sigmoid"]],
            "epochs": "3", "batch_size": "128", "experiment_name": "eks"
        });
        let task = OriginalPayload::from_value(payload)
            .unwrap()
            .into_task("x")
            .unwrap();
        assert_eq!(task.batch_size, 128);
        assert_eq!(task.model.layers[1], Layer::Dropout { rate: 0.5 });
    }

    #[test]
    fn original_payload_unknown_layer() {
        let payload = serde_json::json!({"layers": [["Conv2D", 3]], "epochs": 1, "batch_size": 1, "experiment_name": "e"});
        let message = OriginalPayload::from_value(payload)
            .unwrap_err()
            .to_string();
        assert!(message.contains("layers[0][0]"), "{message}");
        assert!(message.contains("Conv2D"), "{message}");
    }

    #[test]
    fn original_payload_fractional_epochs() {
        let payload = serde_json::json!({"layers": [["Dense", 1]], "epochs": "2.5", "batch_size": 1, "experiment_name": "e"});
        let message = OriginalPayload::from_value(payload)
            .unwrap_err()
            .to_string();
        assert!(message.contains("epochs = \"2.5\""), "{message}");
    }

    #[test]
    fn master_ip_credentials_redacted() {
        assert_eq!(
            redact_userinfo("http://user:secret@host:5000/"),
            "http://host:5000/"
        );
    }

    #[test]
    fn seed_differs_per_id() {
        assert_ne!(stable_hash("a"), stable_hash("b"));
        assert_eq!(stable_hash("a"), stable_hash("a"));
    }
}
