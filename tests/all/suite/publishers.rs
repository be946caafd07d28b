//! Publishers on a shared server: tokens confined to plugin name patterns, and new code for a
//! plugin whose grant reaches outside the sandbox waiting, inactive, for an admin's review.

use reqwest::Method;
use serde_json::{Value, json};
use stepwise_host::config::AuthMode;
use stepwise_host::model::{PluginVersion, Role};

use crate::support::{
    MISBEHAVE_B_WASM, MISBEHAVE_PARAMS_PATTERN_WASM, MISBEHAVE_WASM, PluginFile, Setup, TestServer,
    read,
};

/// A grant that reaches outside the sandbox (a host), so that new code waits for review.
const GRANTED: &str = "allowed_hosts = [\"127.0.0.1:9\"]\n";

async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server
        .client
        .request(method, server.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    read(request.send().await.expect("request")).await
}

async fn upload(server: &TestServer, token: &str, name: &str, wasm: &str) -> (u16, Value) {
    let response = server
        .client
        .put(server.url(&format!("/v1/plugins/{name}")))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(std::fs::read(wasm).expect("reading a test plugin"))
        .send()
        .await
        .expect("uploading");
    read(response).await
}

/// A token made through `POST /v1/tokens` by `admin`; returns its secret.
async fn token(server: &TestServer, admin: &str, role: &str, plugins: Option<Value>) -> String {
    let mut body = json!({"role": role});
    if let Some(plugins) = plugins {
        body["plugins"] = plugins;
    }
    let (status, created) = call(server, Method::POST, "/v1/tokens", admin, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["secret"].as_str().expect("secret").to_owned()
}

fn version_of(wasm: &str) -> String {
    PluginVersion::of_bytes(&std::fs::read(wasm).expect("reading a test plugin")).to_string()
}

fn version<'a>(plugin: &'a Value, version: &str) -> &'a Value {
    plugin["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|entry| entry["version"] == version)
        .unwrap_or_else(|| panic!("no version {version} in {plugin}"))
}

async fn activate(server: &TestServer, token: &str, name: &str, version: &str) -> (u16, Value) {
    let path = format!("/v1/plugins/{name}/activate");
    let body = json!({"version": version});
    call(server, Method::POST, &path, token, Some(body)).await
}

async fn plugin(server: &TestServer, token: &str, name: &str) -> Value {
    let (status, plugin) = call(
        server,
        Method::GET,
        &format!("/v1/plugins/{name}"),
        token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{plugin}");
    plugin
}

/// Team A's plugins (`team-a-*`) and team B's (`crm-sync`), each with a grant, on a server
/// with tokens; returns the admin's token too.
async fn two_teams() -> (TestServer, String) {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::new("team-a-check", MISBEHAVE_WASM, GRANTED))
            .with_plugin(PluginFile::new("crm-sync", MISBEHAVE_WASM, GRANTED)),
    )
    .await;
    let admin = server.create_token(Role::Admin).await;
    (server, admin)
}

#[tokio::test]
async fn a_scoped_token_acts_only_on_plugins_its_patterns_match() {
    let (server, admin) = two_teams().await;
    let publisher = token(&server, &admin, "publisher", Some(json!(["team-a-*"]))).await;
    let runner = token(&server, &admin, "runner", Some(json!(["team-a-*"]))).await;
    let pending = json!({"steps": {"first": {"action": "pending"}}});
    let version_a = version_of(MISBEHAVE_WASM);

    for (who, secret) in [("publisher", &publisher), ("runner", &runner)] {
        for (plugin, in_scope) in [("team-a-check", true), ("crm-sync", false)] {
            let expect = |what: &str, status: u16, body: &Value, success: u16| {
                if in_scope {
                    assert_eq!(status, success, "{who} {what} {plugin}: {body}");
                } else {
                    assert_eq!(status, 403, "{who} {what} {plugin}: {body}");
                    assert_eq!(body["code"], "outside_token_scope", "{body}");
                    assert!(
                        body["detail"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("team-a-*"),
                        "{body}"
                    );
                }
            };
            // Trigger, and cancel a run an admin started.
            let (status, body) = call(
                &server,
                Method::POST,
                "/v1/runs",
                secret,
                Some(json!({"plugin": plugin, "params": pending})),
            )
            .await;
            expect("trigger", status, &body, 202);
            let (_, run) = call(
                &server,
                Method::POST,
                "/v1/runs",
                &admin,
                Some(json!({"plugin": plugin, "params": pending})),
            )
            .await;
            let cancel = format!("/v1/runs/{}/cancel", run["id"].as_str().expect("id"));
            let (status, body) = call(&server, Method::POST, &cancel, secret, None).await;
            expect("cancel", status, &body, 200);
            // Schedules: create, and change or delete one an admin made.
            let schedule = json!({"plugin": plugin, "trigger": {"interval_ms": 3_600_000}});
            let (status, body) = call(
                &server,
                Method::POST,
                "/v1/schedules",
                secret,
                Some(schedule.clone()),
            )
            .await;
            expect("schedule", status, &body, 201);
            let (_, made) = call(
                &server,
                Method::POST,
                "/v1/schedules",
                &admin,
                Some(schedule),
            )
            .await;
            let path = format!("/v1/schedules/{}", made["id"].as_str().expect("id"));
            let (status, body) = call(
                &server,
                Method::PATCH,
                &path,
                secret,
                Some(json!({"paused": true})),
            )
            .await;
            expect("pause", status, &body, 200);
            let (status, body) = call(&server, Method::DELETE, &path, secret, None).await;
            expect("delete schedule", status, &body, 204);
            if who == "publisher" {
                // Upload (variant b: new bytes), and roll back to the reviewed first version.
                let (status, body) = upload(&server, secret, plugin, MISBEHAVE_B_WASM).await;
                expect("upload", status, &body, 202);
                let (status, body) = activate(&server, secret, plugin, &version_a).await;
                expect("activate", status, &body, 200);
            }
        }
    }
    // Out of scope, nothing changed: team B's plugin still runs the admin's code only.
    let crm = plugin(&server, &admin, "crm-sync").await;
    assert_eq!(
        crm["versions"].as_array().expect("versions").len(),
        1,
        "{crm}"
    );
    // Reading stays open to every token.
    let (status, _) = call(&server, Method::GET, "/v1/plugins/crm-sync", &runner, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn scopes_show_in_the_token_list_whoami_and_the_audit_log_and_fit_only_two_roles() {
    let (server, admin) = two_teams().await;
    let (status, created) = call(
        &server,
        Method::POST,
        "/v1/tokens",
        &admin,
        Some(json!({"role": "publisher", "name": "ci-team-a", "plugins": ["team-a-*", "shared"]})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["plugins"], json!(["team-a-*", "shared"]));
    let secret = created["secret"].as_str().expect("secret");
    let (_, me) = call(&server, Method::GET, "/v1/whoami", secret, None).await;
    assert_eq!(
        me,
        json!({"name": "ci-team-a", "role": "publisher", "plugins": ["team-a-*", "shared"]})
    );
    let (_, me) = call(&server, Method::GET, "/v1/whoami", &admin, None).await;
    assert_eq!(me["role"], "admin");
    assert!(me.get("plugins").is_none(), "{me}");

    let (_, list) = call(&server, Method::GET, "/v1/tokens", &admin, None).await;
    let listed = list["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|token| token["name"] == "ci-team-a")
        .expect("listed");
    assert_eq!(listed["plugins"], json!(["team-a-*", "shared"]));
    let (_, audit) = call(&server, Method::GET, "/v1/audit", &admin, None).await;
    let entry = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|entry| entry["action"] == "token.create" && entry["target"] == "ci-team-a")
        .expect("audited");
    assert_eq!(entry["detail"]["plugins"], "team-a-*,shared", "{entry}");

    for (role, plugins, field) in [
        ("admin", json!(["team-a-*"]), "plugins"),
        ("viewer", json!(["team-a-*"]), "plugins"),
        ("publisher", json!([]), "plugins"),
        ("publisher", json!(["Team A"]), "plugins"),
        ("publisher", json!("team-a-*"), "plugins"),
    ] {
        let (status, problem) = call(
            &server,
            Method::POST,
            "/v1/tokens",
            &admin,
            Some(json!({"role": role, "plugins": plugins})),
        )
        .await;
        assert_eq!(status, 422, "{role} {plugins}: {problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }
}

#[tokio::test]
async fn new_code_for_a_granted_plugin_waits_for_an_admin() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave(GRANTED))
            .with_plugin(PluginFile::new("open-check", MISBEHAVE_WASM, "")),
    )
    .await;
    let admin = server.create_token(Role::Admin).await;
    let publisher = server.create_token(Role::Publisher).await;
    let (version_a, version_b) = (version_of(MISBEHAVE_WASM), version_of(MISBEHAVE_B_WASM));

    // The publisher's new bytes are stored, not active: 202, and the version is pending.
    let (status, answer) = upload(&server, &publisher, "misbehave", MISBEHAVE_B_WASM).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["active_version"], version_a.as_str());
    let pending = version(&answer, &version_b);
    assert_eq!(pending["pending"], true, "{answer}");
    assert!(
        pending["uploaded_by"]
            .as_str()
            .unwrap_or_default()
            .starts_with("publisher-")
    );
    assert!(pending.get("reviewed_by").is_none(), "{pending}");
    // New runs still use the reviewed code.
    let (status, run) = call(
        &server,
        Method::POST,
        "/v1/runs",
        &publisher,
        Some(json!({"plugin": "misbehave"})),
    )
    .await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["plugin_version"], version_a.as_str(), "{run}");

    // The publisher cannot activate it; the admin can, and that is the review.
    let (status, problem) = activate(&server, &publisher, "misbehave", &version_b).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "review_required", "{problem}");
    assert_eq!(
        plugin(&server, &admin, "misbehave").await["active_version"],
        version_a.as_str()
    );
    let (status, answer) = activate(&server, &admin, "misbehave", &version_b).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["active_version"], version_b.as_str());
    let reviewed = version(&answer, &version_b);
    assert_eq!(reviewed["pending"], false);
    assert!(
        reviewed["reviewed_by"]
            .as_str()
            .unwrap_or_default()
            .starts_with("admin-")
    );

    // Reviewed versions are the publisher's to roll back and forth between.
    let (status, answer) = activate(&server, &publisher, "misbehave", &version_a).await;
    assert_eq!(status, 200, "{answer}");

    // An admin's upload is reviewed by uploading it.
    let version_c = version_of(MISBEHAVE_PARAMS_PATTERN_WASM);
    let (status, answer) =
        upload(&server, &admin, "misbehave", MISBEHAVE_PARAMS_PATTERN_WASM).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["active_version"], version_c.as_str());

    // A plugin that reaches nothing takes the publisher's code at once.
    let (status, answer) = upload(&server, &publisher, "open-check", MISBEHAVE_B_WASM).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["active_version"], version_b.as_str());

    // The audit log says which upload waited.
    let (_, audit) = call(&server, Method::GET, "/v1/audit", &admin, None).await;
    let waited = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|entry| entry["action"] == "plugin.upload" && entry["detail"]["pending"] == "true")
        .count();
    assert_eq!(waited, 1, "{audit}");
}

#[tokio::test]
async fn code_staged_before_a_grant_needs_a_review_after_it() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let admin = server.create_token(Role::Admin).await;
    let publisher = server.create_token(Role::Publisher).await;
    let (version_a, version_b) = (version_of(MISBEHAVE_WASM), version_of(MISBEHAVE_B_WASM));
    // While the grant is empty the publisher's code goes live; then they roll back, keeping
    // their unreviewed version in store.
    let (status, answer) = upload(&server, &publisher, "misbehave", MISBEHAVE_B_WASM).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = activate(&server, &publisher, "misbehave", &version_a).await;
    assert_eq!(status, 200);
    // The admin grants a host to the code that runs now.
    let (status, answer) = server
        .client
        .put(server.url("/v1/plugins/misbehave/grant"))
        .bearer_auth(&admin)
        .header("content-type", "application/toml")
        .body(GRANTED)
        .send()
        .await
        .map(|response| (response.status().as_u16(), response))
        .expect("setting the grant");
    assert_eq!(status, 200, "{:?}", answer.text().await);
    // The staged version now needs an admin.
    let (status, problem) = activate(&server, &publisher, "misbehave", &version_b).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "review_required");
    let plugin = plugin(&server, &admin, "misbehave").await;
    assert_eq!(version(&plugin, &version_b)["pending"], true, "{plugin}");
    assert_eq!(version(&plugin, &version_a)["pending"], false, "{plugin}");
}

#[tokio::test]
async fn the_policy_can_let_publishers_activate_granted_plugins() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_config("[policy]\npublishers_activate_granted = true\n")
            .with_plugin(PluginFile::misbehave(GRANTED)),
    )
    .await;
    let publisher = server.create_token(Role::Publisher).await;
    let (status, answer) = upload(&server, &publisher, "misbehave", MISBEHAVE_B_WASM).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["active_version"],
        version_of(MISBEHAVE_B_WASM).as_str()
    );
    let listed = version(&answer, &version_of(MISBEHAVE_B_WASM));
    assert_eq!(listed["pending"], false, "{answer}");
}
