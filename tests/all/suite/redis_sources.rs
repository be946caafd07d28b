//! Redis sources against a real server (`STEPWISE_TEST_REDIS_URL`): every typed read, and
//! every escape refused: no command but the typed reads reaches the server (no write, no
//! `EVAL`, whatever a key holds), a value past the result limit is refused before the host
//! reads it, and one call's commands are counted, so a `SCAN` loop ends.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer, redis_command, redis_prefix, redis_url};

async fn redis_server(url: &str) -> TestServer {
    TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"cache\"]\n[limits]\nmax_errors = 1\n",
            ))
            .with_source("cache", url.to_owned(), true),
    )
    .await
}

/// Runs one typed call through `misbehave` and returns the finished run.
async fn kv(server: &TestServer, call: &str, args: Value) -> Value {
    let action = json!({"action": "kv", "source": "cache", "call": call, "args": args});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": action}}}))
        .await;
    server.wait_until_finished(&id).await
}

/// The result of a call that passed.
async fn read(server: &TestServer, call: &str, args: Value) -> Value {
    let run = kv(server, call, args.clone()).await;
    assert_eq!(run["status"], "passed", "{call} {args}: {run:#}");
    run["steps"][0]["output"]["result"].clone()
}

fn message(run: &Value) -> String {
    run["steps"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn admin(url: &str, command: &[&str]) -> String {
    let command: Vec<&[u8]> = command.iter().map(|part| part.as_bytes()).collect();
    redis_command(url, &command).await
}

#[tokio::test]
async fn a_redis_source_answers_every_typed_read() {
    let Some(url) = redis_url() else {
        return;
    };
    let p = redis_prefix("reads");
    let key = |name: &str| format!("{p}{name}");
    admin(&url, &["SET", &key("s"), "hello"]).await;
    admin(&url, &["SET", &key("t"), "v", "EX", "1000"]).await;
    admin(&url, &["HSET", &key("h"), "f1", "v1", "f2", "v2"]).await;
    admin(&url, &["SADD", &key("set"), "a", "b"]).await;
    admin(&url, &["RPUSH", &key("list"), "x", "y", "z"]).await;
    admin(&url, &["ZADD", &key("z"), "1.5", "m1", "2", "m2"]).await;
    admin(&url, &["XADD", &key("stream"), "1-1", "k", "v"]).await;
    admin(&url, &["XADD", &key("stream"), "2-1", "k", "w"]).await;
    let server = redis_server(&url).await;

    assert_eq!(read(&server, "get", json!([key("s")])).await, "hello");
    assert_eq!(
        read(&server, "get", json!([key("missing")])).await,
        Value::Null
    );
    assert_eq!(
        read(&server, "mget", json!([[key("s"), key("missing")]])).await,
        json!(["hello", null])
    );
    assert_eq!(read(&server, "exists", json!([key("s")])).await, true);
    assert_eq!(
        read(&server, "exists", json!([key("missing")])).await,
        false
    );
    assert_eq!(read(&server, "ttl", json!([key("s")])).await, -1);
    assert_eq!(read(&server, "ttl", json!([key("missing")])).await, -2);
    let ttl = read(&server, "ttl", json!([key("t")])).await;
    assert!(ttl.as_i64().is_some_and(|ttl| ttl > 900), "{ttl}");
    assert_eq!(read(&server, "type", json!([key("h")])).await, "hash");
    assert_eq!(read(&server, "hget", json!([key("h"), "f1"])).await, "v1");
    assert_eq!(
        read(&server, "hgetall", json!([key("h")])).await,
        json!({"f1": "v1", "f2": "v2"})
    );
    assert_eq!(
        read(&server, "hmget", json!([key("h"), ["f2", "nope"]])).await,
        json!(["v2", null])
    );
    assert_eq!(
        read(&server, "smembers", json!([key("set")])).await,
        json!(["a", "b"])
    );
    assert_eq!(
        read(&server, "sismember", json!([key("set"), "a"])).await,
        true
    );
    assert_eq!(read(&server, "scard", json!([key("set")])).await, 2);
    assert_eq!(
        read(&server, "lrange", json!([key("list"), 0, -1])).await,
        json!(["x", "y", "z"])
    );
    assert_eq!(read(&server, "llen", json!([key("list")])).await, 3);
    assert_eq!(
        read(&server, "zrange", json!([key("z"), 0, -1])).await,
        json!([["m1", 1.5], ["m2", 2.0]])
    );
    assert_eq!(read(&server, "zscore", json!([key("z"), "m2"])).await, 2.0);
    assert_eq!(
        read(&server, "zscore", json!([key("z"), "none"])).await,
        Value::Null
    );
    assert_eq!(read(&server, "zcard", json!([key("z")])).await, 2);
    assert_eq!(
        read(&server, "xrange", json!([key("stream"), "-", "+", 10])).await,
        json!([{"id": "1-1", "fields": {"k": "v"}}, {"id": "2-1", "fields": {"k": "w"}}])
    );
    assert_eq!(
        read(&server, "xrevrange", json!([key("stream"), "+", "-", 1])).await,
        json!([{"id": "2-1", "fields": {"k": "w"}}])
    );
    // A scan pages through the prefix's keys until its cursor is back at "0".
    let mut cursor = "0".to_owned();
    let mut keys = Vec::new();
    for _ in 0..100 {
        let page = read(&server, "scan", json!([cursor, format!("{p}*"), 1000])).await;
        keys.extend(page["keys"].as_array().expect("keys").iter().cloned());
        cursor = page["cursor"].as_str().expect("a cursor").to_owned();
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(cursor, "0");
    assert_eq!(keys.len(), 7, "{keys:?}");

    let run = kv(&server, "get", json!([key("h")])).await;
    assert!(
        message(&run).starts_with("query failed: WRONGTYPE"),
        "{run:#}"
    );
    let run = kv(&server, "scan", json!(["0", "*", 100000])).await;
    assert!(
        message(&run).contains("count must be between 1 and 1000"),
        "{run:#}"
    );
}

#[tokio::test]
async fn a_redis_write_or_eval_is_refused() {
    let Some(url) = redis_url() else {
        return;
    };
    let p = redis_prefix("writes");
    let pwned = format!("{p}pwned");
    let server = redis_server(&url).await;
    // Whatever a key or pattern holds, it is one argument of the typed read: never a second
    // command, inline or in the protocol's own framing.
    for key in [
        format!("x\r\nSET {pwned} 1\r\n"),
        format!(
            "x\r\n*3\r\n$3\r\nSET\r\n${}\r\n{pwned}\r\n$1\r\n1\r\n",
            pwned.len()
        ),
        format!("x\r\nEVAL \"redis.call('set', '{pwned}', 1)\" 0\r\n"),
    ] {
        let run = kv(&server, "get", json!([key])).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        let run = kv(&server, "scan", json!(["0", key, 10])).await;
        assert_eq!(run["status"], "passed", "{run:#}");
    }
    assert_eq!(admin(&url, &["EXISTS", &pwned]).await, ":0");
    // Through `sql`, a Redis source is no source at all.
    let action = json!({"action": "sql", "source": "cache", "statement": "SET x 1"});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": action}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert!(message(&run).starts_with("denied:"), "{run:#}");
}

#[tokio::test]
async fn a_huge_redis_value_is_refused_before_the_host_reads_it() {
    let Some(url) = redis_url() else {
        return;
    };
    let p = redis_prefix("huge");
    let big = format!("{p}big");
    admin(&url, &["SET", &big, &"x".repeat(8_000_000)]).await;
    let wide = format!("{p}wide");
    let value = "y".repeat(100_000);
    for field in 0..60 {
        admin(&url, &["HSET", &wide, &format!("f{field}"), &value]).await;
    }
    admin(&url, &["SET", &format!("{p}small"), "fine"]).await;
    let server = redis_server(&url).await;
    for (call, args) in [("get", json!([big])), ("hgetall", json!([wide]))] {
        let run = kv(&server, call, args).await;
        assert_eq!(run["status"], "errored", "{call}: {run:#}");
        assert!(
            message(&run).contains("kv result size limit of 4194304 bytes exceeded"),
            "{call}: {run:#}"
        );
    }
    // The connection cut off mid-reply is not reused: the next read is whole.
    assert_eq!(
        read(&server, "get", json!([format!("{p}small")])).await,
        "fine"
    );
    admin(&url, &["DEL", &big, &wide]).await;
}

#[tokio::test]
async fn a_scan_loop_ends_at_the_command_limit() {
    let Some(url) = redis_url() else {
        return;
    };
    let server = redis_server(&url).await;
    let action = json!({"action": "kv_scan_loop", "source": "cache"});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": action}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        message(&run).contains("kv command limit of 1000 per call exceeded"),
        "{run:#}"
    );
}

/// At start, the host names a source whose ACL user may write in a warning with the recipe,
/// and does not warn about a user of that recipe; a `rediss://` source speaks TLS and checks
/// the server's certificate: a server whose certificate no web PKI root signed is named
/// unreachable, with the TLS error.
#[tokio::test]
async fn at_start_a_writable_acl_user_is_warned_about_and_rediss_checks_the_certificate() {
    let Some(url) = redis_url() else {
        return;
    };
    let address = stepwise_demo::redis::address(&url);
    let reader = format!("stepwise-reader-{}", uuid::Uuid::now_v7());
    let recipe = [
        "ACL",
        "SETUSER",
        &reader,
        "on",
        ">pw",
        "~*",
        "resetchannels",
        "-@all",
        "+@read",
    ];
    assert_eq!(admin(&url, &recipe).await, "+OK");
    let dir = tempfile::tempdir().expect("temp dir");
    // A Redis server of its own with TLS, when the machine has one that speaks it.
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let tls_server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .args(["--tls-port", &tls_port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok();
    let tls_started = tls_server.is_some();
    if !tls_started {
        eprintln!(
            "SKIPPED: rediss:// against a server with an untrusted certificate (no redis-server on PATH)"
        );
    }
    let mut sources = format!(
        "[sources.writer]\nurl = \"{url}\"\n[sources.reader]\nurl = \"redis://{reader}:pw@{address}\"\n"
    );
    if tls_started {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the TLS Redis server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        sources.push_str(&format!(
            "[sources.untrusted]\nurl = \"rediss://localhost:{tls_port}\"\n"
        ));
    }
    let log = super::escapes::start_log(dir.path(), &sources);
    if let Some(mut server) = tls_server {
        let _ = server.kill();
        let _ = server.wait();
    }
    admin(&url, &["ACL", "DELUSER", &reader]).await;
    let warning = |source: &str| {
        log.lines()
            .find(|line| line.contains("WARN") && line.contains(&format!("source={source}")))
            .map(str::to_owned)
    };
    let writer = warning("writer").unwrap_or_else(|| panic!("no warning names the writer: {log}"));
    assert!(
        writer.contains("may write") && writer.contains("ACL SETUSER") && writer.contains("+@read"),
        "{writer}"
    );
    assert_eq!(warning("reader"), None, "{log}");
    if tls_started {
        let untrusted = warning("untrusted")
            .unwrap_or_else(|| panic!("no warning names the untrusted source: {log}"));
        assert!(
            untrusted.contains("TLS") && untrusted.contains("certificate"),
            "{untrusted}"
        );
    }
}

/// A recorded run's reads replay from its recording after the keys are gone: `stepwise dev
/// --replay` answers them as Redis did, typed as the interface returns them.
#[tokio::test]
async fn a_recorded_read_replays_after_the_keys_are_gone() {
    let Some(url) = redis_url() else {
        return;
    };
    let p = redis_prefix("replay");
    let hash = format!("{p}h");
    admin(&url, &["HSET", &hash, "f1", "v1", "f2", "v2"]).await;
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"cache\"]\nrecord = \"all\"\n",
            ))
            .with_source("cache", url.clone(), true),
    )
    .await;
    let run = kv(&server, "hgetall", json!([hash])).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let id = run["id"].as_str().expect("id");
    let text = server.recording(id).await;
    assert!(text.contains(r#""call":"kv""#), "{text}");
    assert!(text.contains("HGETALL"), "{text}");

    admin(&url, &["DEL", &hash]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("kv.rec");
    std::fs::write(&file, &text).expect("writing");
    let (code, out) = super::recordings::replay(crate::support::MISBEHAVE_WASM, &file, &[]).await;
    assert_eq!(code, 0, "{out}");
    // The step's output holds what the recording answered: the keys are gone from Redis.
    assert!(out.contains("replayed: passed"), "{out}");
    assert!(out.contains(r#""f1""#) && out.contains(r#""v2""#), "{out}");
}
