//! Run files: a model description and, optionally, a training recipe in one TOML or JSON
//! file (our presets).

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::config::ModelConfigFile;
use crate::error::{Error, Result};

/// A run preset: the model and, optionally, the training recipe (our TOML presets).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    pub model: ModelConfigFile,
    #[serde(default)]
    pub train: super::TrainConfigFile,
}

impl RunFile {
    /// Parse a preset file; `.json` as JSON, anything else as TOML. A file without a
    /// `[model]` table is read as a bare model table.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, is_json).map_err(|msg| Error::parse(path, msg))
    }

    /// Parse preset text (TOML or JSON).
    pub fn parse(text: &str, is_json: bool) -> std::result::Result<Self, String> {
        if is_json {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if v.get("model").is_some() {
                serde_json::from_value(v).map_err(|e| e.to_string())
            } else {
                let model = serde_json::from_value(v).map_err(|e| e.to_string())?;
                Ok(RunFile {
                    model,
                    train: Default::default(),
                })
            }
        } else {
            let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
            if v.contains_key("model") {
                toml::from_str(text).map_err(|e| e.to_string())
            } else {
                let model = toml::from_str(text).map_err(|e| e.to_string())?;
                Ok(RunFile {
                    model,
                    train: Default::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let err = RunFile::parse("[model]\nd_model = 8\nn_layer = 2\n", false).unwrap_err();
        assert!(err.contains("n_layer"), "{err}");
    }
}
