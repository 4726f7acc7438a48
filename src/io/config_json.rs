//! Reading diffusers' / transformers' `config.json`: every present key is parsed through serde
//! (so an error names the key), options this implementation lacks are refused by name instead of
//! silently ignored, and keys that do not change the computation are left alone.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// What is wrong with a `config.json` (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigJsonError {
    #[error("config.json is not a JSON object")]
    NotAnObject,
    #[error("_class_name is {found:?}, expected {expected:?}")]
    WrongClass { found: String, expected: String },
    #[error("{what} is not {supported}")]
    UnsupportedClass { what: String, supported: String },
    #[error("{key} = {value} is not supported{}", supported_list(supported))]
    Unsupported {
        key: String,
        value: Value,
        supported: Vec<Value>,
    },
    #[error("{key}: {source}")]
    BadValue {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// ` (supported: a, b)`, or nothing when no value is (an option not built at all).
fn supported_list(supported: &[Value]) -> String {
    if supported.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = supported.iter().map(Value::to_string).collect();
        format!(" (supported: {})", list.join(", "))
    }
}

/// A `config.json` object being read into one of our config structs.
pub struct ConfigJson<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> ConfigJson<'a> {
    /// Checks that `value` is an object and, when it names one, that its class is `class`
    /// (`_class_name` for diffusers, `architectures` for transformers).
    pub fn new(value: &'a Value, class: &str) -> Result<Self, ConfigJsonError> {
        let obj = value.as_object().ok_or(ConfigJsonError::NotAnObject)?;
        if let Some(found) = obj.get("_class_name").and_then(Value::as_str)
            && found != class
        {
            return Err(ConfigJsonError::WrongClass {
                found: found.into(),
                expected: class.into(),
            });
        }
        Ok(Self { obj })
    }

    /// The key must be absent, null, or equal to one of `supported`.
    pub fn expect(&self, key: &str, supported: &[Value]) -> Result<(), ConfigJsonError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if supported.contains(v) => Ok(()),
            Some(v) => Err(ConfigJsonError::Unsupported {
                key: key.into(),
                value: v.clone(),
                supported: supported.to_vec(),
            }),
        }
    }

    /// Sets `field` from the key when it is present and not null.
    pub fn take<T: DeserializeOwned>(
        &self,
        key: &str,
        field: &mut T,
    ) -> Result<(), ConfigJsonError> {
        if let Some(v) = self.get(key)? {
            *field = v;
        }
        Ok(())
    }

    /// The key when present and not null.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ConfigJsonError> {
        match self.obj.get(key).filter(|v| !v.is_null()) {
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|source| ConfigJsonError::BadValue {
                    key: key.into(),
                    source,
                }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_not_built_at_all_lists_no_supported_values() {
        let v = serde_json::json!({"addition_embed_type": "text_time", "act_fn": "gelu"});
        let json = ConfigJson::new(&v, "UNet2DConditionModel").unwrap();
        let e = json
            .expect("addition_embed_type", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "addition_embed_type = \"text_time\" is not supported");
        let e = json
            .expect("act_fn", &["silu".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "act_fn = \"gelu\" is not supported (supported: \"silu\")"
        );
    }
}
