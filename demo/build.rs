//! Compiles the example plugins that the demo installs: `event-pipeline` with and without the
//! steps that read the demo's MariaDB and Redis stores and its NATS bus.

fn main() {
    let mut built = stepwise_plugin_build::build_plugins(&[
        "stepwise-plugin-event-pipeline",
        "stepwise-plugin-http-status",
    ]);
    built.extend(stepwise_plugin_build::build_plugin_variants(
        "stepwise-plugin-event-pipeline",
        &[
            ("stores", "event-pipeline-stores"),
            ("bus", "event-pipeline-bus"),
            ("stores,bus", "event-pipeline-stores-bus"),
        ],
    ));
    stepwise_plugin_build::write_path_constants(&built);
}
