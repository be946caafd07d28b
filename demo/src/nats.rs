//! The least a publisher on NATS needs: one connection that publishes messages (with
//! headers) and asks the JetStream API, each reply read whole. The demo's collector publishes
//! its events with it; the tests and the bench set up their NATS servers with it.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// The `host:port` of a `nats://host:port` URL.
pub fn address(url: &str) -> &str {
    url.trim_start_matches("nats://").trim_end_matches('/')
}

/// A connection to a NATS server without credentials.
pub struct Publisher {
    stream: BufStream<TcpStream>,
    next: u64,
}

impl Publisher {
    pub async fn connect(url: &str) -> std::io::Result<Publisher> {
        let mut stream = BufStream::new(TcpStream::connect(address(url)).await?);
        let mut info = String::new();
        stream.read_line(&mut info).await?;
        if !info.starts_with("INFO ") {
            return Err(std::io::Error::other(format!(
                "{url} is not a NATS server: {info}"
            )));
        }
        stream
            .write_all(
                b"CONNECT {\"verbose\":false,\"headers\":true,\"no_responders\":true}\r\nPING\r\n",
            )
            .await?;
        stream.flush().await?;
        let mut publisher = Publisher { stream, next: 0 };
        publisher.until_pong().await?;
        Ok(publisher)
    }

    /// Reads until the server's `PONG`, which follows everything sent before the `PING`.
    async fn until_pong(&mut self) -> std::io::Result<()> {
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::other(
                    "the NATS server closed the connection",
                ));
            }
            if line.starts_with("PONG") {
                return Ok(());
            }
            if line.starts_with("-ERR") {
                return Err(std::io::Error::other(line.trim_end().to_owned()));
            }
        }
    }

    /// Publishes `payload` on `subject` with `headers`, and returns once the server has it.
    pub async fn publish(
        &mut self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut head = String::from("NATS/1.0\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut wire = format!(
            "HPUB {subject} {} {}\r\n{head}",
            head.len(),
            head.len() + payload.len()
        )
        .into_bytes();
        wire.extend_from_slice(payload);
        wire.extend_from_slice(b"\r\nPING\r\n");
        self.stream.write_all(&wire).await?;
        self.stream.flush().await?;
        self.until_pong().await
    }

    /// Sends a request (a JetStream API call: `$JS.API.STREAM.CREATE.EVENTS`, …) and returns
    /// its JSON answer.
    pub async fn request(&mut self, subject: &str, body: &Value) -> std::io::Result<Value> {
        self.next += 1;
        let sid = self.next;
        let inbox = format!("_INBOX.stepwise-demo.{sid}.{}", std::process::id());
        let body = body.to_string();
        let wire = format!(
            "SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\nPUB {subject} {inbox} {}\r\n{body}\r\n",
            body.len()
        );
        self.stream.write_all(wire.as_bytes()).await?;
        self.stream.flush().await?;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::other(
                    "the NATS server closed the connection",
                ));
            }
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            let (headers, total) = match words.first().copied() {
                Some("MSG") => (0, words.last().and_then(|n| n.parse().ok()).unwrap_or(0)),
                Some("HMSG") => (
                    words[words.len() - 2].parse().unwrap_or(0),
                    words.last().and_then(|n| n.parse().ok()).unwrap_or(0),
                ),
                Some("PING") => {
                    self.stream.write_all(b"PONG\r\n").await?;
                    continue;
                }
                _ => continue,
            };
            let mut bytes = vec![0; total + 2];
            self.stream.read_exact(&mut bytes).await?;
            if words.get(2) != Some(&sid.to_string().as_str()) {
                continue;
            }
            if headers > 0 && total == headers {
                return Err(std::io::Error::other(format!(
                    "{subject}: {}",
                    String::from_utf8_lossy(&bytes[..headers]).trim()
                )));
            }
            return serde_json::from_slice(&bytes[headers..total])
                .map_err(|error| std::io::Error::other(format!("{subject}: {error}")));
        }
    }
}
