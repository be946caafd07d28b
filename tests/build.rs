//! Compiles the example and test plugins to wasm32-wasip2 and exposes their paths to the tests
//! as constants in `$OUT_DIR/plugins.rs` (`stepwise-plugin-http-status` → `HTTP_STATUS_WASM`).

use std::fmt::Write;

/// Every plugin the suite uses.
const PLUGINS: &[&str] = &[
    "stepwise-plugin-event-pipeline",
    "stepwise-plugin-http-status",
    "stepwise-plugin-misbehave",
    "stepwise-plugin-other-world",
];

/// Other builds of `misbehave`, for the registry's tests: a second version of the same
/// plugin, and components that must be rejected on upload.
const MISBEHAVE_VARIANTS: &[(&str, &str)] = &[
    ("variant-b", "misbehave-b"),
    ("describe-trap", "misbehave-describe-trap"),
    ("describe-loop", "misbehave-describe-loop"),
    ("duplicate-steps", "misbehave-duplicate-steps"),
];

fn main() {
    let mut built = stepwise_plugin_build::build_plugins(PLUGINS);
    built.extend(stepwise_plugin_build::build_plugin_variants(
        "stepwise-plugin-misbehave",
        MISBEHAVE_VARIANTS,
    ));
    let mut constants = String::new();
    for (name, path) in built {
        let constant = name
            .trim_start_matches("stepwise-plugin-")
            .replace('-', "_")
            .to_uppercase();
        writeln!(
            constants,
            "pub const {constant}_WASM: &str = {:?};",
            path.display().to_string()
        )
        .expect("writing to a string");
    }
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::write(format!("{out_dir}/plugins.rs"), constants).expect("writing plugins.rs");
}
