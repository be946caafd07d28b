//! Compiles the example plugins that the demo installs.

fn main() {
    let built = stepwise_plugin_build::build_plugins(&[
        "stepwise-plugin-event-pipeline",
        "stepwise-plugin-http-status",
    ]);
    stepwise_plugin_build::write_path_constants(&built);
}
