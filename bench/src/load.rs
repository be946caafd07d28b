//! A load generator in the manner of `wrk`: keep-alive HTTP/1.1 connections on one thread of
//! their own, each sending a request, reading its answer and sending the next, for a fixed
//! time. It shares no thread with the server's runtime, and a request costs it one write and
//! one read, not an HTTP client's bookkeeping: what is measured is the server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a load run measured.
pub struct Load {
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
}

impl Load {
    pub fn per_second(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// `request` (a whole HTTP/1.1 request) over `connections` connections to `addr` for
/// `duration`. Blocks; call it from `spawn_blocking`. Any answer but a 2xx is an error.
pub fn hammer(
    addr: SocketAddr,
    request: Vec<u8>,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let request = std::sync::Arc::new(request);
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::with_capacity(connections);
        for _ in 0..connections {
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let mut buffer = Vec::with_capacity(16 * 1024);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    stream.write_all(&request).await?;
                    read_answer(&mut stream, &mut buffer).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                }
                anyhow::Ok(latencies)
            }));
        }
        let mut latencies_ms = Vec::new();
        for task in tasks {
            latencies_ms.extend(task.await??);
        }
        Ok(Load {
            latencies_ms,
            elapsed: started.elapsed(),
        })
    })
}

/// A request with a JSON body, ready to send again and again.
pub fn post_json(host: &str, path: &str, authorization: Option<&str>, body: &str) -> Vec<u8> {
    let authorization = authorization
        .map(|value| format!("authorization: {value}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\n{authorization}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes()
}

/// Reads one answer (headers, then `content-length` bytes of body) and checks its status.
async fn read_answer(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    buffer.clear();
    let (head, length) = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end])?;
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            break (end + 4, length);
        }
        read_more(stream, buffer).await?;
    };
    let status = buffer.get(9..12).unwrap_or_default();
    anyhow::ensure!(
        status.first() == Some(&b'2'),
        "the server answered {}",
        String::from_utf8_lossy(&buffer[..head.min(buffer.len())])
    );
    while buffer.len() < head + length {
        read_more(stream, buffer).await?;
    }
    Ok(())
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 8192];
    let read = stream.read(&mut chunk).await?;
    anyhow::ensure!(read > 0, "the server closed the connection");
    buffer.extend_from_slice(&chunk[..read]);
    Ok(())
}
