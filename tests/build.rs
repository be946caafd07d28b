//! Compiles the example and test plugins to wasm32-wasip2 and exposes their paths to the tests
//! as constants in `$OUT_DIR/plugins.rs` (`stepwise-plugin-http-status` → `HTTP_STATUS_WASM`).

/// Every plugin the suite uses.
const PLUGINS: &[&str] = &[
    "stepwise-plugin-event-pipeline",
    "stepwise-plugin-http-status",
    "stepwise-plugin-misbehave",
    "stepwise-plugin-other-world",
];

/// Other builds of `misbehave`, for the registry's tests: a second version of the same
/// plugin, components that must be rejected on upload, and params schemas with patterns.
const MISBEHAVE_VARIANTS: &[(&str, &str)] = &[
    ("variant-b", "misbehave-b"),
    ("describe-trap", "misbehave-describe-trap"),
    ("describe-loop", "misbehave-describe-loop"),
    ("duplicate-steps", "misbehave-duplicate-steps"),
    ("describe-huge", "misbehave-describe-huge"),
    ("params-pattern", "misbehave-params-pattern"),
    ("params-lookaround", "misbehave-params-lookaround"),
];

fn main() {
    // The PostgreSQL copy of the suite exists only when there is a database to run it on.
    println!("cargo::rustc-check-cfg=cfg(postgres_suite)");
    println!("cargo::rerun-if-env-changed=STEPWISE_TEST_POSTGRES_URL");
    if std::env::var("STEPWISE_TEST_POSTGRES_URL").is_ok_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=postgres_suite");
    }
    let mut built = stepwise_plugin_build::build_plugins(PLUGINS);
    built.extend(stepwise_plugin_build::build_plugin_variants(
        "stepwise-plugin-misbehave",
        MISBEHAVE_VARIANTS,
    ));
    built.extend(stepwise_plugin_build::build_plugin_variants(
        "stepwise-plugin-event-pipeline",
        &[
            ("stores", "event-pipeline-stores"),
            ("bus", "event-pipeline-bus"),
            ("replay-bug", "event-pipeline-replay-bug"),
            (
                "replay-changed-query",
                "event-pipeline-replay-changed-query",
            ),
        ],
    ));
    stepwise_plugin_build::write_path_constants(&built);
}
