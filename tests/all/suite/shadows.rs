//! Shadow versions (README, "Changing a plugin while the server runs"): a version that runs
//! beside the active one on every new run, decides nothing, and is promoted or dropped by its
//! comparison; the primaries, their notifications and `run --wait` never notice it.

use serde_json::{Value, json};

use crate::support::{MISBEHAVE_B_WASM, PluginFile, Setup, TestServer, Webhook, poll_until};

fn b_bytes() -> Vec<u8> {
    std::fs::read(MISBEHAVE_B_WASM).expect("reading misbehave-b")
}

fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn notifier(webhook: &Webhook, on: &str) -> String {
    format!(
        "[[notify]]\nname = \"ops\"\nurl = \"{}/ops\"\non = {on}\nretry = {{initial_ms = 100, factor = 2.0}}\n",
        webhook.base
    )
}

/// Uploads misbehave's second build as the shadow version; returns its version.
async fn shadow_b(server: &TestServer) -> String {
    let bytes = b_bytes();
    let version = version_of(&bytes);
    let (status, plugin) = server
        .put_body(
            "/v1/plugins/misbehave?mode=shadow",
            "application/wasm",
            bytes,
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(plugin["shadow_version"], version.as_str(), "{plugin}");
    assert_ne!(plugin["active_version"], version.as_str(), "{plugin}");
    let shadow: Vec<&Value> = plugin["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter(|listed| listed["shadow"] == true)
        .collect();
    assert_eq!(shadow.len(), 1, "{plugin}");
    assert_eq!(shadow[0]["version"], version.as_str());
    version
}

async fn runs(server: &TestServer, query: &str) -> Vec<Value> {
    let (status, body) = server.get_json(&format!("/v1/runs?{query}")).await;
    assert_eq!(status, 200, "{body}");
    body["runs"].as_array().cloned().unwrap_or_default()
}

async fn comparison(server: &TestServer) -> Value {
    let (status, body) = server.get_json("/v1/plugins/misbehave/shadow").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn audit_actions(server: &TestServer, action: &str) -> Vec<Value> {
    let (status, page) = server.get_json("/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{page}");
    page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|entry| entry["action"] == action)
        .cloned()
        .collect()
}

/// Waits until the comparison says the shadow ended as `state`.
async fn ended_as(server: &TestServer, state: &str) -> Value {
    poll_until(|| async {
        let body = comparison(server).await;
        (body["state"] == state).then_some(body)
    })
    .await
    .unwrap_or_else(|| panic!("the shadow did not end as {state}"))
}

#[tokio::test]
async fn an_agreeing_shadow_is_promoted_after_n_runs() {
    let webhook = Webhook::start(vec![]).await;
    let server = TestServer::start(
        Setup::default()
            .with_config(&notifier(&webhook, "[\"failed\", \"shadow_promoted\"]"))
            .with_plugin(PluginFile::misbehave(
                "shadow = { promote_after_runs = 3, max_disagreement = 0.0 }\n",
            )),
    )
    .await;
    let active = server.plugin("misbehave").await["active_version"].clone();
    let b = shadow_b(&server).await;

    let mut primaries = Vec::new();
    for _ in 0..3 {
        let id = server.trigger(json!({"plugin": "misbehave"})).await;
        let run = server.wait_until_finished(&id).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        assert_eq!(
            run["plugin_version"], active,
            "the primary decides: {run:#}"
        );
        assert!(run.get("shadow_of").is_none(), "{run:#}");
        primaries.push(id);
    }
    let body = ended_as(&server, "promoted").await;
    assert_eq!(body["ended_by"], "shadow");
    assert_eq!(
        (body["finished"].as_u64(), body["disagreed"].as_u64()),
        (Some(3), Some(0))
    );
    let plugin = server.plugin("misbehave").await;
    assert_eq!(plugin["active_version"], b.as_str(), "{plugin:#}");
    assert!(plugin["shadow_version"].is_null(), "{plugin:#}");

    // The shadow runs ran version b beside each primary, and lists show them only when asked.
    let listed = runs(&server, "plugin=misbehave").await;
    assert_eq!(listed.len(), 3, "{listed:#?}");
    let all = runs(&server, "plugin=misbehave&shadow=true").await;
    assert_eq!(all.len(), 6, "{all:#?}");
    for shadow in all.iter().filter(|run| run.get("shadow_of").is_some()) {
        assert_eq!(shadow["plugin_version"], b.as_str(), "{shadow:#}");
        assert!(
            primaries
                .iter()
                .any(|id| shadow["shadow_of"] == id.as_str())
        );
        let full = server.run(shadow["id"].as_str().expect("an id")).await;
        assert_eq!(full["steps"][0]["output"]["variant"], "b", "{full:#}");
    }

    // Decided once: one audit entry with its figures, one notification.
    let promoted = audit_actions(&server, "shadow.promoted").await;
    assert_eq!(promoted.len(), 1, "{promoted:#?}");
    assert_eq!(promoted[0]["actor"], "shadow");
    assert_eq!(promoted[0]["detail"]["finished"], "3");
    let delivered = poll_until(|| async {
        let received = webhook.received();
        (!received.is_empty()).then_some(received)
    })
    .await
    .expect("the promotion is notified");
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert_eq!(delivered[0].event, "shadow_promoted");
    assert_eq!(delivered[0].body["plugin"], "misbehave");
    assert_eq!(delivered[0].body["version"], b.as_str());
    assert_eq!(delivered[0].body["figures"]["finished"], 3);

    // New runs use the promoted version, without a shadow.
    let id = server.trigger(json!({"plugin": "misbehave"})).await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["plugin_version"], b.as_str());
    assert_eq!(runs(&server, "plugin=misbehave&shadow=true").await.len(), 7);
}

#[tokio::test]
async fn a_worse_shadow_is_dropped_and_the_primaries_never_notice() {
    let webhook = Webhook::start(vec![]).await;
    let server = TestServer::start(
        Setup::default()
            .with_config(&notifier(
                &webhook,
                "[\"failed\", \"recovered\", \"shadow_promoted\", \"shadow_dropped\"]",
            ))
            .with_plugin(PluginFile::misbehave(
                "shadow = { promote_after_runs = 10, max_disagreement = 0.1 }\n",
            )),
    )
    .await;
    let active = server.plugin("misbehave").await["active_version"].clone();
    let b = shadow_b(&server).await;
    let params = r#"{"steps": {"second": {"action": "fail_in_variant", "variant": "b"}}}"#;

    // Each `run --wait` answers for its primary alone: passed, exit 0.
    let base = server.base.clone();
    for _ in 0..2 {
        let (code, out, err) = super::cli::stepwise(&[
            "run",
            "misbehave",
            "--params",
            params,
            "--wait",
            "--server",
            &base,
        ])
        .await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.trim_end().ends_with("passed"), "{out}");
    }
    let body = ended_as(&server, "dropped").await;
    assert_eq!(body["ended_by"], "shadow");
    assert_eq!(body["primary"]["passed"], 2, "{body:#}");
    assert_eq!(body["shadow"]["failed"], 2, "{body:#}");
    assert_eq!(body["disagreements"].as_array().map(Vec::len), Some(2));
    let plugin = server.plugin("misbehave").await;
    assert_eq!(
        plugin["active_version"], active,
        "never promoted: {plugin:#}"
    );
    assert!(plugin["shadow_version"].is_null(), "{plugin:#}");
    assert_eq!(audit_actions(&server, "shadow.dropped").await.len(), 1);

    // The failed shadow runs sent nothing and moved no streak: a failing primary now is
    // reported as the series' first failure, and the only other POST is the drop.
    let failing = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "fail"}}}}),
        )
        .await;
    server.wait_until_finished(&failing).await;
    let delivered = poll_until(|| async {
        let received = webhook.received();
        (received.len() >= 2).then_some(received)
    })
    .await
    .expect("the drop and the failure are notified");
    let mut events: Vec<String> = delivered.iter().map(|sent| sent.event.clone()).collect();
    events.sort();
    assert_eq!(events, ["failed", "shadow_dropped"], "{delivered:#?}");
    let failed = delivered
        .iter()
        .find(|sent| sent.event == "failed")
        .expect("failed");
    assert_eq!(failed.body["run"]["id"], failing.as_str());
    let dropped = delivered
        .iter()
        .find(|sent| sent.event == "shadow_dropped")
        .expect("dropped");
    assert_eq!(dropped.body["version"], b.as_str());
    assert_eq!(dropped.body["figures"]["shadow_failures"], 2);
    // A run after the drop has no shadow.
    assert_eq!(runs(&server, "plugin=misbehave&shadow=true").await.len(), 5);
}

#[tokio::test]
async fn the_comparison_counts_a_scripted_mix_exactly() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let b = shadow_b(&server).await;
    let fail_in = |variant: &str| json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "fail_in_variant", "variant": variant}}}});
    let mix = [
        json!({"plugin": "misbehave"}),
        json!({"plugin": "misbehave"}),
        fail_in("b"),
        fail_in("a"),
        json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "fail"}}}}),
    ];
    let mut primaries = Vec::new();
    for body in mix {
        let id = server.trigger(body).await;
        server.wait_until_finished(&id).await;
        primaries.push(id);
    }
    // Cancelling a primary cancels its shadow run: the pair is left out of the comparison.
    let pending = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending"}}}, "poll_interval_ms": 60000}))
        .await;
    let (status, cancelled) = server
        .post_json(&format!("/v1/runs/{pending}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    // Every shadow run has finished too (the last pair's shadow may trail its primary).
    poll_until(|| async {
        let all = runs(&server, "plugin=misbehave&shadow=true").await;
        (all.len() == 12 && all.iter().all(|run| run["finished_at"].is_string())).then_some(())
    })
    .await
    .expect("every run finished");

    let body = comparison(&server).await;
    assert_eq!(body["state"], "shadowing");
    assert_eq!(body["shadow_version"], b.as_str());
    assert!(body["policy"].is_null(), "{body:#}");
    assert_eq!(body["pairs"], 6, "{body:#}");
    assert_eq!(body["finished"], 5, "{body:#}");
    assert_eq!(body["disagreed"], 2, "{body:#}");
    let counts = json!({"passed": 3, "failed": 2, "errored": 0, "timed_out": 0, "cancelled": 1, "unfinished": 0});
    assert_eq!(body["primary"], counts, "{body:#}");
    assert_eq!(body["shadow"], counts, "{body:#}");
    let disagreements = body["disagreements"].as_array().expect("a list");
    let pairs: Vec<(String, &str, &str)> = disagreements
        .iter()
        .map(|pair| {
            (
                pair["primary"]["id"].as_str().expect("an id").to_owned(),
                pair["primary"]["status"].as_str().expect("a status"),
                pair["shadow"]["status"].as_str().expect("a status"),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            (primaries[3].clone(), "failed", "passed"),
            (primaries[2].clone(), "passed", "failed"),
        ],
        "newest first: {body:#}"
    );
    for pair in disagreements {
        let shadow = server
            .run(pair["shadow"]["id"].as_str().expect("an id"))
            .await;
        assert_eq!(shadow["shadow_of"], pair["primary"]["id"], "{shadow:#}");
        assert_eq!(
            pair["shadow"]["url"],
            format!("/v1/runs/{}", shadow["id"].as_str().expect("an id"))
        );
    }
    let first = &body["steps"][0];
    assert_eq!(first["name"], "first", "{body:#}");
    for side in ["primary", "shadow"] {
        assert_eq!(first[side]["decided"], 5, "{body:#}");
        assert_eq!(first[side]["passed"], 4, "{body:#}");
    }

    // Activating the shadow version by hand promotes it, by whoever did.
    let (status, plugin) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": b, "mode": "active"}),
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    let body = comparison(&server).await;
    assert_eq!(body["state"], "promoted", "{body:#}");
    assert_eq!(body["ended_by"], "anonymous", "{body:#}");
    assert_eq!(
        body["pairs"], 6,
        "the figures stay those of its runs: {body:#}"
    );
}

#[tokio::test]
async fn shadow_activation_is_checked_and_can_be_stopped() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let active = server.plugin("misbehave").await["active_version"]
        .as_str()
        .expect("a version")
        .to_owned();
    // The active version cannot shadow itself; an unknown version or mode is refused.
    let (status, problem) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": active, "mode": "shadow"}),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "shadow_is_active");
    let (status, problem) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": "0".repeat(64), "mode": "shadow"}),
        )
        .await;
    assert_eq!(status, 404, "{problem}");
    let (status, problem) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": active, "mode": "canary"}),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "mode");
    let (status, problem) = server
        .put_body(
            "/v1/plugins/fresh?mode=shadow",
            "application/wasm",
            b_bytes(),
        )
        .await;
    assert_eq!(status, 409, "no active version to shadow: {problem}");
    assert_eq!(server.get_json("/v1/plugins/fresh").await.0, 404);

    // Set through the activate route, stopped through DELETE: runs after it have no shadow.
    let b = version_of(&b_bytes());
    server
        .put_body(
            "/v1/plugins/misbehave?mode=shadow",
            "application/wasm",
            b_bytes(),
        )
        .await;
    let (status, problem) = server.delete("/v1/plugins/misbehave/shadow").await;
    assert_eq!(status, 200, "{problem}");
    let (status, plugin) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": b, "mode": "shadow"}),
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(plugin["shadow_version"], b.as_str());
    let id = server.trigger(json!({"plugin": "misbehave"})).await;
    server.wait_until_finished(&id).await;
    let (status, plugin) = server.delete("/v1/plugins/misbehave/shadow").await;
    assert_eq!(status, 200, "{plugin}");
    assert!(plugin["shadow_version"].is_null());
    assert_eq!(comparison(&server).await["state"], "stopped");
    let (status, problem) = server.delete("/v1/plugins/misbehave/shadow").await;
    assert_eq!(status, 409, "{problem}");
    let id = server.trigger(json!({"plugin": "misbehave"})).await;
    server.wait_until_finished(&id).await;
    assert_eq!(runs(&server, "plugin=misbehave&shadow=true").await.len(), 3);
    assert_eq!(runs(&server, "plugin=misbehave").await.len(), 2);
}

/// With two nodes deciding on one database (PostgreSQL; on SQLite, the one node), the
/// promotion, its audit entry and its notification happen once.
#[tokio::test]
async fn two_nodes_promote_once() {
    let webhook = Webhook::start(vec![]).await;
    let server = TestServer::start(
        Setup::default()
            .with_config(&notifier(&webhook, "[\"shadow_promoted\"]"))
            .with_plugin(PluginFile::misbehave(
                "shadow = { promote_after_runs = 4, max_disagreement = 0.0 }\n",
            )),
    )
    .await;
    let other = if server.database_url().starts_with("postgres") {
        Some(server.another_node(Default::default()).await)
    } else {
        None
    };
    let other = other.as_ref().unwrap_or(&server);
    let b = shadow_b(&server).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(server.trigger(json!({"plugin": "misbehave"})).await);
    }
    for id in &ids {
        server.wait_until_finished(id).await;
    }
    ended_as(&server, "promoted").await;
    assert_eq!(
        other.plugin("misbehave").await["active_version"],
        b.as_str()
    );
    poll_until(|| async { (!webhook.received().is_empty()).then_some(()) })
        .await
        .expect("the promotion is notified");
    // The decision is one conditional update: whichever node made it, it was made once.
    let seen = audit_actions(&server, "shadow.promoted").await;
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(webhook.received().len(), 1);
}

#[tokio::test]
async fn activating_another_version_ends_the_shadow() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    shadow_b(&server).await;
    let other = std::fs::read(crate::support::MISBEHAVE_PARAMS_PATTERN_WASM).expect("a variant");
    let (status, plugin) = server.upload("misbehave", other.clone()).await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(plugin["active_version"], version_of(&other).as_str());
    assert!(plugin["shadow_version"].is_null(), "{plugin:#}");
    let body = comparison(&server).await;
    assert_eq!(body["state"], "stopped", "{body:#}");
    assert_eq!(body["ended_by"], "anonymous");
}

/// A shadow runs under the plugin's grant: a publisher's unreviewed code for a plugin whose
/// grant reaches outside the sandbox is no more a shadow than it is active, until an admin
/// says so.
#[tokio::test]
async fn a_publisher_cannot_shadow_unreviewed_code_under_a_grant_that_reaches_out() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(stepwise_host::config::AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave("allowed_hosts = [\"127.0.0.1:9\"]\n")),
    )
    .await;
    let publisher = server
        .create_token(stepwise_host::model::Role::Publisher)
        .await;
    let admin = server.create_token(stepwise_host::model::Role::Admin).await;
    let bytes = b_bytes();
    let version = version_of(&bytes);
    let response = server
        .client
        .put(server.url("/v1/plugins/misbehave?mode=shadow"))
        .bearer_auth(&publisher)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("uploading");
    let (status, plugin) = crate::support::read(response).await;
    assert_eq!(status, 202, "stored, waiting for review: {plugin}");
    assert!(plugin["shadow_version"].is_null(), "{plugin:#}");
    let activate = |token: &str| {
        server
            .client
            .post(server.url("/v1/plugins/misbehave/activate"))
            .bearer_auth(token)
            .json(&json!({"version": version, "mode": "shadow"}))
            .send()
    };
    let (status, problem) = crate::support::read(activate(&publisher).await.expect("a call")).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "review_required");
    let (status, plugin) = crate::support::read(activate(&admin).await.expect("a call")).await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(plugin["shadow_version"], version.as_str());
}
