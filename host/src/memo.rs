//! A value derived from a text, remembered by that text: for derivations on the hot path
//! (a stored grant's TOML, a params schema's validator) whose inputs change rarely. Failures
//! are not remembered. Past `LIMIT` texts the memory starts again, so it stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;

/// Distinct texts remembered at most.
const LIMIT: usize = 256;

pub struct ByText<T> {
    entries: Mutex<Option<HashMap<String, T>>>,
}

impl<T: Clone> ByText<T> {
    pub const fn new() -> ByText<T> {
        ByText {
            entries: Mutex::new(None),
        }
    }

    /// The value for `text`, derived by `derive` the first time.
    pub fn get_or_derive<E>(
        &self,
        text: &str,
        derive: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, E> {
        let entries = || {
            self.entries
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
        };
        if let Some(value) = entries().as_ref().and_then(|entries| entries.get(text)) {
            return Ok(value.clone());
        }
        let value = derive(text)?;
        let mut remembered = entries();
        let remembered = remembered.get_or_insert_with(HashMap::new);
        if remembered.len() >= LIMIT {
            remembered.clear();
        }
        remembered.insert(text.to_owned(), value.clone());
        Ok(value)
    }
}
