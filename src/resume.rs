//! What may change between the config a checkpoint was trained with and the config a run
//! resumes it with.
//!
//! Each config section says which of its own fields break resume, beside the section
//! ([`ResumeRules`]); `Config::breaks_resume` asks every section (an exhaustive destructuring,
//! so a new section cannot be forgotten). A breaking change is refused by name with what it
//! would do ("lora.alpha: 8.0 -> 16.0 changes the adapters' scale"); every other difference is
//! allowed and listed as a note (`train.max_steps`, the learning rate, logging, sampling...).

use std::collections::BTreeMap;

use serde::Serialize;

/// One changed config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The dotted key, e.g. `lora.alpha`.
    pub key: String,
    pub old: String,
    pub new: String,
    /// What the change would do to the resumed run (breaking changes), e.g. "changes the
    /// adapters' scale".
    pub consequence: &'static str,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)?;
        if !self.consequence.is_empty() {
            write!(f, " {}", self.consequence)?;
        }
        Ok(())
    }
}

/// A config section's rules for resuming: the changes from `old` (the checkpoint's) to `self`
/// that make the checkpoint meaningless or resume inexact. `prefix` is the section's key
/// (`"lora"`, `"model"`).
pub trait ResumeRules {
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<Change>;
}

/// A value as the resolved TOML shows it; `(unset)` for a missing option.
fn show<T: Serialize + ?Sized>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(v) => v.to_string(),
        Err(_) => "(unset)".into(),
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The field `name` of a section, when it changed from `old` to `new`.
pub fn field<T: Serialize + PartialEq + ?Sized>(
    prefix: &str,
    name: &str,
    old: &T,
    new: &T,
    consequence: &'static str,
) -> Option<Change> {
    (old != new).then(|| Change {
        key: join(prefix, name),
        old: show(old),
        new: show(new),
        consequence,
    })
}

/// Every key below `prefix` that differs between `old` and `new` (a section all of whose
/// fields break resume, such as `model`).
pub fn every_key<T: Serialize>(
    prefix: &str,
    old: &T,
    new: &T,
    consequence: &'static str,
) -> Vec<Change> {
    differences(prefix, old, new)
        .into_iter()
        .map(|(key, old, new)| Change {
            key,
            old,
            new,
            consequence,
        })
        .collect()
}

/// `(key, old, new)` for every leaf key below `prefix` whose value differs, sorted by key.
pub fn differences<T: Serialize>(prefix: &str, old: &T, new: &T) -> Vec<(String, String, String)> {
    let flat = |v: &T| {
        let mut out = BTreeMap::new();
        if let Ok(value) = toml::Value::try_from(v) {
            flatten(prefix, &value, &mut out);
        }
        out
    };
    let (a, b) = (flat(old), flat(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let unset = || "(unset)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            (
                k.clone(),
                a.get(k).cloned().unwrap_or_else(unset),
                b.get(k).cloned().unwrap_or_else(unset),
            )
        })
        .collect()
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&join(prefix, k), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, PartialEq)]
    struct Section {
        a: f64,
        b: Option<usize>,
        inner: Inner,
    }

    #[derive(Serialize, PartialEq)]
    struct Inner {
        c: Vec<usize>,
    }

    #[test]
    fn changes_name_the_key_both_values_and_the_consequence() {
        let c = field("lora", "alpha", &8.0, &16.0, "changes the adapters' scale").unwrap();
        assert_eq!(
            c.to_string(),
            "lora.alpha: 8.0 -> 16.0 changes the adapters' scale"
        );
        assert!(field("lora", "rank", &4, &4, "").is_none());
        let old = Section {
            a: 1.0,
            b: None,
            inner: Inner { c: vec![1, 2] },
        };
        let new = Section {
            a: 1.0,
            b: Some(3),
            inner: Inner { c: vec![1, 3] },
        };
        let lines: Vec<String> = every_key("model", &old, &new, "changes the model")
            .iter()
            .map(Change::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "model.b: (unset) -> 3 changes the model",
                "model.inner.c: [1, 2] -> [1, 3] changes the model"
            ]
        );
    }
}
