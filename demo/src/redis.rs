//! The least a writer of Redis needs: one command sent as an array of bulk strings, and the
//! first line of its reply. The demo's pipeline counts events with it; the tests and the bench
//! set up their Redis servers with it.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The `host:port` of a `redis://host:port` URL.
pub fn address(url: &str) -> &str {
    url.trim_start_matches("redis://").trim_end_matches('/')
}

/// Sends `command` to the server at `url` (`redis://host:port`, no credentials) on a new
/// connection and returns the reply's first line (`+OK`, `:1`, `$3`, `-ERR …`).
pub async fn command(url: &str, command: &[&[u8]]) -> std::io::Result<String> {
    let mut stream = tokio::io::BufStream::new(tokio::net::TcpStream::connect(address(url)).await?);
    let mut wire = format!("*{}\r\n", command.len()).into_bytes();
    for argument in command {
        wire.extend_from_slice(format!("${}\r\n", argument.len()).as_bytes());
        wire.extend_from_slice(argument);
        wire.extend_from_slice(b"\r\n");
    }
    stream.write_all(&wire).await?;
    stream.flush().await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    Ok(line.trim_end().to_owned())
}
