//! A plugin's params schema (a JSON Schema from `describe`) made into its validator, the same
//! way for the upload's check and for every trigger. Its patterns run on the regex crate's
//! engine, which matches in time linear in the text, never on a backtracking one: with
//! backtracking, a pattern like `^(a+)+\b$` takes a million steps per string, and a MiB of
//! params would hold a thread for hours. A pattern that needs backtracking (lookaround,
//! backreferences) is refused. A leaf: it knows no other module.

use jsonschema::{PatternOptions, Validator};
use serde_json::Value as Json;

/// The validator of `schema` (its JSON text), or what is wrong with the schema.
pub fn compile(schema: &str) -> Result<Validator, String> {
    let schema: Json = serde_json::from_str(schema)
        .map_err(|error| format!("params schema is not JSON: {error}"))?;
    jsonschema::options()
        .with_pattern_options(PatternOptions::regex())
        .build(&schema)
        .map_err(|error| {
            // What only a backtracking engine accepts is a pattern with lookaround or
            // backreferences; anything else is wrong whatever the engine.
            if jsonschema::validator_for(&schema).is_ok() {
                format!(
                    "params schema has a pattern with lookaround or backreferences, which the \
                     host does not run (it matches patterns in linear time): {error}"
                )
            } else {
                format!("params schema is not a valid JSON Schema: {error}")
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_run_in_linear_time() {
        let validator = compile(r#"{"type": "string", "not": {"pattern": "^(a+)+\\b$"}}"#)
            .expect("a pattern the linear engine runs");
        let text = Json::String(format!("{}!", "a".repeat(40)));
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(validator.is_valid(&text));
        }
        // A backtracking engine takes about half a second per match of this text.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_pattern_that_needs_backtracking_is_refused_by_name() {
        let error = compile(r#"{"type": "string", "pattern": "^(?=a)\\w+$"}"#).unwrap_err();
        assert!(
            error.contains("lookaround or backreferences") && error.contains("^(?=a)"),
            "{error}"
        );
        let error = compile(r#"{"type": 12}"#).unwrap_err();
        assert!(error.contains("not a valid JSON Schema"), "{error}");
        let error = compile("{").unwrap_err();
        assert!(error.contains("not JSON"), "{error}");
    }
}
