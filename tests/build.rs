//! Compiles the example and test plugins to wasm32-wasip2 and exposes their paths to the tests
//! as constants in `$OUT_DIR/plugins.rs`.

use std::fmt::Write;

/// Every plugin the suite uses; `tests/all/support.rs` checks each has a test.
const PLUGINS: &[&str] = &[
    "stepwise-plugin-event-pipeline",
    "stepwise-plugin-http-status",
    "stepwise-plugin-misbehave",
];

fn main() {
    let built = stepwise_plugin_build::build_plugins(PLUGINS);
    let mut constants = String::new();
    for (package, path) in built {
        let constant = package
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
