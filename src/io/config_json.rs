//! Reading diffusers' / transformers' `config.json`: every present key is parsed through serde
//! (so an error names the key), options this implementation lacks are refused by name instead of
//! silently ignored, and keys that do not change the computation are left alone.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A `config.json` object being read into one of our config structs.
pub struct ConfigJson<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> ConfigJson<'a> {
    /// Checks that `value` is an object and, when it names one, that its class is `class`
    /// (`_class_name` for diffusers, `architectures` for transformers).
    pub fn new(value: &'a Value, class: &str) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or("config.json is not a JSON object")?;
        if let Some(found) = obj.get("_class_name").and_then(Value::as_str)
            && found != class
        {
            return Err(format!("_class_name is {found:?}, expected {class:?}"));
        }
        Ok(Self { obj })
    }

    /// The key must be absent, null, or equal to one of `supported`.
    pub fn expect(&self, key: &str, supported: &[Value]) -> Result<(), String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if supported.contains(v) => Ok(()),
            Some(v) => Err(format!(
                "{key} = {v} is not supported (supported: {})",
                supported
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Sets `field` from the key when it is present and not null.
    pub fn take<T: DeserializeOwned>(&self, key: &str, field: &mut T) -> Result<(), String> {
        if let Some(v) = self.obj.get(key).filter(|v| !v.is_null()) {
            *field = serde_json::from_value(v.clone()).map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(())
    }

    /// The key when present and not null.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.obj.get(key).filter(|v| !v.is_null()) {
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| format!("{key}: {e}")),
            None => Ok(None),
        }
    }
}
