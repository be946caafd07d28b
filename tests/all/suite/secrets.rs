//! Secrets (README, "Secrets"): the value reaches the hosts it is declared for and only those, never
//! enters the sandbox, and is stored nowhere, even when a system under check echoes it back.

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{PluginFile, Reflector, Setup, TestServer, poll_until, step_statuses};

/// A value no test writes anywhere by chance.
fn secret_value() -> String {
    format!(
        "sw-secret-{}-x/y+z",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos()
    )
}

/// The forms in which a value must never be found where the host keeps things.
fn forms_of(value: &str) -> Vec<String> {
    vec![
        value.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(value),
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    ]
}

/// A server whose `crm` secret (read from a file; sent as `authorization: Bearer …`) and
/// `crm_key` secret (sent as the query parameter `key`) may go to `listed` only, with the
/// plugin `leaky` granted both and allowed to call both reflectors, and `ungranted` allowed
/// to call `listed` without the grant. The value of `crm_key` is `value` with `-key` added.
async fn server_with_secret(
    dir: &std::path::Path,
    value: &str,
    listed: &Reflector,
    unlisted: &Reflector,
) -> TestServer {
    let file = dir.join("crm-token");
    std::fs::write(&file, format!("{value}\n")).expect("writing the secret file");
    let key_file = dir.join("crm-key");
    std::fs::write(&key_file, format!("{value}-key")).expect("writing the secret file");
    let config = format!(
        "[secrets.crm]\nfile = {:?}\nhosts = [\"http://{listed}\"]\nheader = \"authorization\"\nformat = \"Bearer {{}}\"\n\
         [secrets.crm_key]\nfile = {:?}\nhosts = [\"http://{listed}\"]\nquery = \"key\"\n",
        file.display().to_string(),
        key_file.display().to_string(),
        listed = listed.host_port
    );
    let both = format!(
        "allowed_hosts = [\"{}\", \"{}\"]\n",
        listed.host_port, unlisted.host_port
    );
    TestServer::start(
        Setup::default()
            .with_config(&config)
            .with_plugin(PluginFile::new(
                "leaky",
                crate::support::MISBEHAVE_WASM,
                format!("{both}secrets = [\"crm\", \"crm_key\"]\n"),
            ))
            .with_plugin(PluginFile::new(
                "leaky-recorded",
                crate::support::MISBEHAVE_WASM,
                format!("{both}secrets = [\"crm\", \"crm_key\"]\nrecord = \"all\"\n"),
            ))
            .with_plugin(PluginFile::new(
                "ungranted",
                crate::support::MISBEHAVE_WASM,
                both,
            )),
    )
    .await
}

/// Runs `plugin` once with a GET to `/echo` on `host_port` carrying the placeholders at the
/// secrets' places: `crm` in the `authorization` header, `crm_key` in the query parameter
/// `key`, URL-encoded as `encodeURIComponent` does.
async fn echo_run(server: &TestServer, plugin: &str, host_port: &str) -> Value {
    echo_path_run(
        server,
        plugin,
        host_port,
        "/echo?key=%7B%7Bsecret%3Acrm_key%7D%7D",
    )
    .await
}

async fn echo_path_run(
    server: &TestServer,
    plugin: &str,
    host_port: &str,
    path_and_query: &str,
) -> Value {
    let action = json!({
        "action": "http",
        "url": format!("http://{host_port}{path_and_query}"),
        "headers": {"authorization": "Bearer {{secret:crm}}"},
        "echo": true,
    });
    run_action(server, plugin, action).await
}

async fn run_action(server: &TestServer, plugin: &str, action: Value) -> Value {
    let id = server
        .trigger(json!({"plugin": plugin, "params": {"steps": {"first": action}}}))
        .await;
    server.wait_until_finished(&id).await
}

/// Every stored text of the server (the database, and every file of its data dir) that holds
/// one of `needles`.
async fn stored_anywhere(server: &TestServer, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![server.data_dir().to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading the data dir") {
            let path = entry.expect("a dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            for needle in needles {
                if bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes())
                {
                    found.push(format!("{} holds {needle}", path.display()));
                }
            }
        }
    }
    if server.database_url().starts_with("postgres") {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(server.database_url())
            .await
            .expect("connecting to the test database");
        let tables: Vec<(String,)> = sqlx::query_as(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()",
        )
        .fetch_all(&mut connection)
        .await
        .expect("listing tables");
        assert!(!tables.is_empty(), "no tables found to search");
        for (table,) in tables {
            for needle in needles {
                let (count,): (i64,) = sqlx::query_as(&format!(
                    "SELECT count(*) FROM \"{table}\" t WHERE strpos(t::text, $1) > 0"
                ))
                .bind(needle)
                .fetch_one(&mut connection)
                .await
                .expect("searching a table");
                if count > 0 {
                    found.push(format!("table {table} holds {needle} in {count} rows"));
                }
            }
        }
    }
    found
}

/// A recorded run whose host echoes the secrets it received: the recording (downloaded, and
/// as the database holds it) has the placeholders where the values went, never a value, in
/// any form: raw, encoded, or as the list of bytes a body or reply is recorded as.
#[tokio::test]
async fn a_recording_holds_no_secret_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    let value = secret_value();
    let (listed, unlisted) = (Reflector::start().await, Reflector::start().await);
    let server = server_with_secret(dir.path(), &value, &listed, &unlisted).await;
    let run = echo_run(&server, "leaky-recorded", &listed.host_port).await;
    assert_eq!(run["status"], "passed", "{run}");
    assert_eq!(listed.received()[0], format!("Bearer {value}"));
    let id = run["id"].as_str().expect("id");
    let recording = server.recording(id).await;
    assert!(recording.contains(r#""call":"http""#), "{recording}");
    assert!(recording.contains("Bearer {{secret:crm}}"), "{recording}");
    let key = format!("{value}-key");
    for secret in [&value, &key] {
        let as_bytes = serde_json::to_string(secret.as_bytes()).expect("json");
        for form in forms_of(secret)
            .into_iter()
            .chain([as_bytes.trim_matches(['[', ']']).to_owned()])
        {
            assert!(
                !recording.contains(&form),
                "the recording holds {form}: {recording}"
            );
        }
    }
    // Nor anything else the server stored (the recording is kept compressed).
    let found = stored_anywhere(&server, &forms_of(&value)).await;
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test]
async fn a_secret_reaches_its_host_and_nothing_keeps_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let value = secret_value();
    let (listed, unlisted) = (Reflector::start().await, Reflector::start().await);
    let server = server_with_secret(dir.path(), &value, &listed, &unlisted).await;

    // The listed host receives the values, in the header and in the query.
    let run = echo_run(&server, "leaky", &listed.host_port).await;
    assert_eq!(run["status"], "passed", "{run}");
    let received = listed.received();
    assert_eq!(received[0], format!("Bearer {value}"), "{received:?}");
    let key = format!("{value}-key");
    assert!(
        received[1].contains(&key.replace('/', "%2F").replace('+', "%2B")),
        "the query did not carry the value: {received:?}"
    );

    // It echoed the values back raw, base64- and URL-encoded, in its body and a header; the
    // host redacted the response before the plugin read it, so the plugin's own transform
    // of it (reversing it) holds no value either, and only placeholders were kept.
    let output = run["steps"][0]["output"].to_string();
    assert!(output.contains("{{secret:crm}}"), "{output}");
    assert!(output.contains("{{secret:crm_key}}"), "{output}");
    assert!(
        run["steps"][0]["output"]["headers"]
            .to_string()
            .contains("Bearer {{secret:crm}}"),
        "{output}"
    );
    let attempts = server.attempts(run["id"].as_str().unwrap()).await;
    let logs = serde_json::to_string(&attempts).unwrap();
    assert!(logs.contains("{{secret:crm}}"), "{logs}");
    for secret in [&value, &key] {
        let reversed: String = secret.chars().rev().collect();
        for form in forms_of(secret).into_iter().chain([reversed]) {
            assert!(!output.contains(&form), "output holds {form}: {output}");
            assert!(!logs.contains(&form), "logs hold {form}: {logs}");
        }
    }

    // To a host the secret does not list: refused before anything is sent, and the log says
    // which secret and why.
    let run = echo_run(&server, "leaky", &unlisted.host_port).await;
    assert_eq!(step_statuses(&run)[0], "failed", "{run}");
    assert!(
        unlisted.received().is_empty(),
        "an unlisted host was called"
    );
    let attempts = server.attempts(run["id"].as_str().unwrap()).await;
    let log = serde_json::to_string(&attempts[0]["logs"]).unwrap();
    assert!(
        log.contains("secret \\\"crm\\\" may not be sent to http://127.0.0.1"),
        "{log}"
    );

    // A placeholder where the host does not fill it, or malformed: refused, nothing sent.
    let calls_before = listed.received().len();
    for path in [
        "/echo/%7B%7Bsecret:crm%7D%7D",
        "/echo?key={{secret:crm",
        "/echo?%7B%7Bsecret:crm%7D%7D=1",
    ] {
        let run = echo_path_run(&server, "leaky", &listed.host_port, path).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{path}: {run}");
        let attempts = server.attempts(run["id"].as_str().unwrap()).await;
        let log = serde_json::to_string(&attempts[0]["logs"]).unwrap();
        assert!(log.contains("may not leave the host"), "{path}: {log}");
    }
    assert_eq!(
        listed.received().len(),
        calls_before,
        "an unfilled placeholder was sent"
    );

    // A plugin without the grant: refused too, even to the listed host.
    let calls_before = listed.received().len();
    let run = echo_run(&server, "ungranted", &listed.host_port).await;
    assert_eq!(step_statuses(&run)[0], "failed", "{run}");
    assert_eq!(
        listed.received().len(),
        calls_before,
        "sent without a grant"
    );
    let attempts = server.attempts(run["id"].as_str().unwrap()).await;
    let log = serde_json::to_string(&attempts[0]["logs"]).unwrap();
    assert!(log.contains("not granted to this plugin"), "{log}");

    // The operator sees names, hosts and grants; never a value.
    let (status, secrets) = server.get_json("/v1/secrets").await;
    assert_eq!(status, 200, "{secrets}");
    assert_eq!(secrets["secrets"][0]["name"], "crm", "{secrets}");
    assert_eq!(
        secrets["secrets"][0]["hosts"],
        json!([format!("http://{}", listed.host_port)])
    );
    assert_eq!(
        secrets["secrets"][0]["granted_to"],
        json!(["leaky", "leaky-recorded"])
    );
    assert_eq!(secrets["secrets"][0]["header"], "authorization");
    assert_eq!(secrets["secrets"][0]["format"], "Bearer {}");
    assert_eq!(secrets["secrets"][1]["query"], "key");
    let (_, plugin) = server.get_json("/v1/plugins/leaky").await;
    assert_eq!(
        plugin["grant"]["secrets"],
        json!(["crm", "crm_key"]),
        "{plugin}"
    );
    for form in forms_of(&value) {
        assert!(!secrets.to_string().contains(&form), "{secrets}");
    }

    let stored = stored_anywhere(&server, &forms_of(&value)).await;
    assert!(stored.is_empty(), "the value was stored: {stored:?}");
}

#[tokio::test]
async fn a_placeholder_goes_nowhere_but_its_secrets_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let value = secret_value();
    let (listed, unlisted) = (Reflector::start().await, Reflector::start().await);
    let server = server_with_secret(dir.path(), &value, &listed, &unlisted).await;
    let url = format!("http://{}/echo", listed.host_port);

    // In a header the server echoes (a request id), or in another query parameter, as a
    // runner's params would put it there through a plugin that copies them into a request:
    // refused before anything is sent.
    for action in [
        json!({"action": "http", "url": url, "headers": {"x-request-id": "{{secret:crm}}"}, "echo": true}),
        json!({"action": "http", "url": format!("{url}?email={{{{secret:crm}}}}"), "echo": true}),
        json!({"action": "http", "url": format!("{url}?email=%7B%7Bsecret%3Acrm_key%7D%7D"), "echo": true}),
    ] {
        let run = run_action(&server, "leaky", action.clone()).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{action}: {run}");
        let attempts = server.attempts(run["id"].as_str().unwrap()).await;
        let log = serde_json::to_string(&attempts[0]["logs"]).unwrap();
        assert!(log.contains("goes only in its"), "{action}: {log}");
    }
    assert!(listed.received().is_empty(), "{:?}", listed.received());

    // TRACE (a server answers it with the request it received) and CONNECT are refused.
    for method in ["TRACE", "CONNECT"] {
        let action = json!({"action": "http", "url": url, "method": method, "echo": true});
        let run = run_action(&server, "leaky", action).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{method}: {run}");
        let attempts = server.attempts(run["id"].as_str().unwrap()).await;
        let log = serde_json::to_string(&attempts[0]["logs"]).unwrap();
        assert!(
            log.contains(&format!("method {method} is refused")),
            "{log}"
        );
    }
    assert!(listed.received().is_empty(), "{:?}", listed.received());

    // Without a placeholder the host still sets the value at its place, and only there: the
    // plugin sees only placeholders in what comes back.
    let run = run_action(
        &server,
        "leaky",
        json!({"action": "http", "url": url, "echo": true}),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run}");
    assert_eq!(listed.received()[0], format!("Bearer {value}"));
    let output = run["steps"][0]["output"].to_string();
    assert!(output.contains("Bearer {{secret:crm}}"), "{output}");
    assert!(!output.contains(&value), "{output}");
}

#[test]
fn a_secret_with_hosts_must_say_where_it_goes_and_be_long() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = |config: &str| crate::support::settings_from_config(dir.path(), config);
    let error = settings("[secrets.crm]\nenv = \"X\"\nhosts = [\"https://crm.example.com\"]\n")
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("no place in their requests"),
        "{error:#}"
    );
    let error = settings(
        "[secrets.crm]\nenv = \"X\"\nhosts = [\"https://crm.example.com\"]\nheader = \"host\"\n",
    )
    .unwrap_err();
    assert!(format!("{error:#}").contains("reserved"), "{error:#}");
    // Values are judged when read: short ones and PINs stop the host.
    for (value, why) in [
        ("short-value", "at least 16"),
        ("12345678901234567890", "digits only"),
    ] {
        let file = dir.path().join("value");
        std::fs::write(&file, value).unwrap();
        let settings = settings(&format!(
            "[secrets.crm]\nfile = {:?}\nhosts = [\"https://crm.example.com\"]\nquery = \"key\"\n",
            file.display().to_string()
        ))
        .expect("the config parses");
        let error = stepwise_host::load_secrets(&settings)
            .and_then(stepwise_host::capabilities::secrets::SecretSet::new)
            .unwrap_err();
        assert!(format!("{error:#}").contains(why), "{error:#}");
    }
}

#[tokio::test]
async fn a_rotated_secret_file_is_read_again_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (listed, unlisted) = (Reflector::start().await, Reflector::start().await);
    let server = server_with_secret(dir.path(), &secret_value(), &listed, &unlisted).await;
    let rotated = secret_value() + "-rotated";
    std::fs::write(dir.path().join("crm-token"), &rotated).expect("rotating the secret");
    // Every server of this process reloads; each keeps serving with its own values.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
    let seen = poll_until(|| async {
        let run = echo_run(&server, "leaky", &listed.host_port).await;
        assert_eq!(run["status"], "passed", "{run}");
        listed
            .received()
            .iter()
            .any(|value| value == &format!("Bearer {rotated}"))
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "the rotated value was never sent");
}

#[tokio::test]
async fn a_grant_may_name_only_declared_secrets() {
    let listed = Reflector::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = server_with_secret(dir.path(), &secret_value(), &listed, &listed).await;
    let (status, body) = server
        .upload_with_grant(
            "other",
            std::fs::read(crate::support::MISBEHAVE_WASM).unwrap(),
            "secrets = [\"missing\"]\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("missing"),
        "{body}"
    );
}

#[test]
fn an_unreadable_secret_stops_the_host_from_starting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = crate::support::settings_from_config(
        dir.path(),
        "[secrets.crm]\nenv = \"STEPWISE_TEST_SECRET_THAT_IS_NOT_SET\"\nhosts = [\"https://crm.example.com\"]\nheader = \"authorization\"\n",
    )
    .expect("the config parses");
    let error = stepwise_host::load_secrets(&settings).unwrap_err();
    assert!(
        format!("{error:#}").contains("STEPWISE_TEST_SECRET_THAT_IS_NOT_SET is not set"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_sql_source_url_takes_its_credentials_from_a_secret() {
    let Some(url) = crate::support::postgres_url() else {
        return;
    };
    let table = crate::support::postgres_table(&url, "stepwise_secret_source").await;
    let reader = crate::support::postgres_reader_url(&url, &table).await;
    // The role's name is the secret: without it filled in, the URL names no role at all. A
    // role of its own, since a secret must be at least 16 bytes long.
    let user = "stepwise_reader_from_a_secret";
    let pool = sqlx::PgPool::connect(&url).await.expect("connecting");
    for statement in [
        format!(
            "DO $$ BEGIN CREATE ROLE {user} LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ),
        format!("GRANT SELECT ON {table} TO {user}"),
    ] {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .expect("creating the role");
    }
    let (scheme, rest) = reader.split_once("://").expect("a URL");
    let (_, host) = rest.split_once('@').expect("a user");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pg-user");
    std::fs::write(&file, user).expect("writing the secret file");
    let config = format!(
        "[secrets.pg_user]\nfile = {:?}\n[sources.warehouse]\nurl = \"{scheme}://{{{{secret:pg_user}}}}@{host}\"\nread_only = true\n",
        file.display().to_string()
    );
    let server = TestServer::start(Setup::default().with_config(&config).with_plugin(
        PluginFile::misbehave("sql_sources = [\"warehouse\"]\n[limits]\nmax_errors = 1\n"),
    ))
    .await;
    let statement = format!("SELECT name FROM {table}");
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "sql", "source": "warehouse", "statement": statement}}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["steps"][0]["status"], "passed", "{run:#}");
    assert_eq!(
        run["steps"][0]["output"]["rows"],
        json!([["one"]]),
        "{run:#}"
    );
}
