//! The host's own hop on every connection of a MySQL source. sqlx reads a packet whole before
//! the host sees a row, and one row may be as large as the server's `max_allowed_packet` (a
//! `SELECT REPEAT('x', 8000000)`): the result limit would refuse it only once the host holds
//! it. So sqlx connects to a Unix socket of the host's, and the relay behind it reads each
//! packet's length from its header before its bytes; a packet larger than the session's bound
//! (its query's whole result budget, once the query has set one) is never read: the relay
//! closes both sides and remembers that it cut that session, for the query's error. Packets
//! within the bound pass through in small pieces, so the relay holds none of them.
//!
//! The relay reads the protocol in the clear: a source whose URL requires TLS
//! (`ssl-mode=REQUIRED` or stricter) connects directly, without it (README, "MySQL and
//! MariaDB sources").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The bound of a session until its query sets one: the greeting, the authentication and the
/// host's own statements (`SHOW GRANTS`, …) are far smaller.
const SETUP_BOUND: usize = 1 << 20;

/// The relay of one source, stopped when dropped. Its socket exists from the start; it
/// accepts from the first query on, on the runtime of that query: the plugin calls' (see
/// [`Relay::serve`]).
pub(super) struct Relay {
    socket: PathBuf,
    sessions: Sessions,
    /// The listener until the first query takes it to serve it.
    listener: Mutex<Option<std::os::unix::net::UnixListener>>,
    address: (String, u16),
    accepting: Mutex<Option<tokio::task::AbortHandle>>,
    /// Holds the socket; only the host's user may enter it.
    _dir: tempfile::TempDir,
}

/// What the relay knows of each session it carries, by the server's connection id.
#[derive(Clone, Default)]
struct Sessions(Arc<Mutex<HashMap<u64, Session>>>);

#[derive(Clone, Copy)]
struct Session {
    /// The largest packet the session may receive.
    bound: usize,
    /// The size of the packet that was past the bound, once the relay cut the session.
    cut: Option<usize>,
}

impl Sessions {
    fn with<T>(&self, change: impl FnOnce(&mut HashMap<u64, Session>) -> T) -> T {
        change(&mut self.0.lock().unwrap_or_else(|poison| poison.into_inner()))
    }

    fn bound(&self, id: u64) -> usize {
        self.with(|sessions| {
            sessions
                .get(&id)
                .map_or(SETUP_BOUND, |session| session.bound)
        })
    }
}

impl Relay {
    /// A relay to `host:port`, its socket bound.
    pub(super) fn bind(host: &str, port: u16) -> std::io::Result<Relay> {
        let dir = tempfile::Builder::new()
            .prefix("stepwise-mysql-")
            .tempdir()?;
        let socket = dir.path().join("relay.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket)?;
        listener.set_nonblocking(true)?;
        Ok(Relay {
            socket,
            sessions: Sessions::default(),
            listener: Mutex::new(Some(listener)),
            address: (host.to_owned(), port),
            accepting: Mutex::new(None),
            _dir: dir,
        })
    }

    /// Starts accepting, once, on the current runtime. Called by each query before it
    /// connects: the bytes of hostile results are then copied on the plugin calls' runtime,
    /// never on the workers that schedule the host's ticks.
    pub(super) fn serve(&self) -> std::io::Result<()> {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
        else {
            return Ok(());
        };
        let listener = UnixListener::from_std(listener)?;
        let accepting = tokio::spawn(accept(
            listener,
            self.address.clone(),
            self.sessions.clone(),
        ));
        *self
            .accepting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(accepting.abort_handle());
        Ok(())
    }

    /// The socket sqlx connects to.
    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    /// Bounds the packets session `id` may receive from now on.
    pub(super) fn bound(&self, id: u64, bound: usize) {
        self.sessions.with(|sessions| {
            sessions.insert(id, Session { bound, cut: None });
        });
    }

    /// The size of the packet past its bound, if the relay cut session `id`.
    pub(super) fn cut(&self, id: u64) -> Option<usize> {
        self.sessions
            .with(|sessions| sessions.get(&id).and_then(|session| session.cut))
    }

    /// Forgets session `id`: its query has ended.
    pub(super) fn forget(&self, id: u64) {
        self.sessions.with(|sessions| sessions.remove(&id));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(accepting) = self
            .accepting
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner())
        {
            accepting.abort();
        }
    }
}

async fn accept(listener: UnixListener, address: (String, u16), sessions: Sessions) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of descriptors, most likely: sqlx's connect times out meanwhile, and
                // the loop must not spin on the error.
                tracing::warn!(%error, "the MySQL relay could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (address, sessions) = (address.clone(), sessions.clone());
        tokio::spawn(async move {
            // sqlx's own timeout covers the connect: its error is the query's.
            let Ok(server) = TcpStream::connect((address.0.as_str(), address.1)).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            relay(client, server, &sessions).await;
        });
    }
}

/// Carries one connection until either side ends it or a reply passes its bound.
async fn relay(client: UnixStream, server: TcpStream, sessions: &Sessions) {
    let (mut from_client, mut to_client) = client.into_split();
    let (from_server, mut to_server) = server.into_split();
    let requests = tokio::io::copy(&mut from_client, &mut to_server);
    let mut id = None;
    let replies = replies(from_server, &mut to_client, sessions, &mut id);
    // Whichever ends first ends both: the halves are dropped, which closes the sockets.
    tokio::select! {
        _ = requests => {}
        _ = replies => {}
    }
    if let Some(id) = id {
        // A session that was cut is forgotten by its query, which reads why.
        sessions.with(|sessions| {
            if sessions
                .get(&id)
                .is_some_and(|session| session.cut.is_none())
            {
                sessions.remove(&id);
            }
        });
    }
}

/// Copies the server's packets to the client, each only once its length is within the
/// session's bound. The first packet is the server's greeting, which names the session.
async fn replies(
    mut server: impl AsyncRead + Unpin,
    client: &mut (impl AsyncWrite + Unpin),
    sessions: &Sessions,
    id: &mut Option<u64>,
) -> std::io::Result<()> {
    let mut header = [0u8; 4];
    loop {
        server.read_exact(&mut header).await?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        let bound = id.map_or(SETUP_BOUND, |id| sessions.bound(id));
        if length > bound {
            if let Some(id) = *id {
                sessions.with(|sessions| {
                    sessions.insert(
                        id,
                        Session {
                            bound,
                            cut: Some(length),
                        },
                    );
                });
            }
            return Ok(());
        }
        client.write_all(&header).await?;
        if id.is_none() {
            let mut greeting = vec![0; length];
            server.read_exact(&mut greeting).await?;
            *id = session_id(&greeting);
            client.write_all(&greeting).await?;
        } else {
            let copied = tokio::io::copy(&mut (&mut server).take(length as u64), client).await?;
            if copied < length as u64 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The connection id of a greeting (protocol 10: the version byte, the server's version up
/// to a NUL, then the id in four bytes, little-endian); `None` for anything else, such as an
/// error in place of a greeting.
fn session_id(greeting: &[u8]) -> Option<u64> {
    let rest = greeting.strip_prefix(&[10])?;
    let end = rest.iter().position(|&byte| byte == 0)?;
    let id = rest.get(end + 1..end + 5)?;
    Some(u32::from_le_bytes(id.try_into().ok()?).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_greeting_names_its_session_and_an_error_does_not() {
        let mut greeting = vec![10];
        greeting.extend_from_slice(b"10.11.19-MariaDB\0");
        greeting.extend_from_slice(&77u32.to_le_bytes());
        greeting.extend_from_slice(b"salt and capabilities");
        assert_eq!(session_id(&greeting), Some(77));
        assert_eq!(session_id(b"\xff\x10\x04Too many connections"), None);
        assert_eq!(session_id(&[10, b'x']), None);
    }

    #[tokio::test]
    async fn a_packet_past_the_bound_is_never_read_and_the_session_is_marked_cut() {
        let sessions = Sessions::default();
        let mut greeting = vec![10];
        greeting.extend_from_slice(b"v\0");
        greeting.extend_from_slice(&9u32.to_le_bytes());
        let packet = |payload: &[u8]| {
            let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
            packet.push(0);
            packet.extend_from_slice(payload);
            packet
        };
        let mut wire = packet(&greeting);
        wire.extend(packet(&[1; 100]));
        // The header of 2 MiB, and only a little of its payload: the relay must stop at the
        // header, without waiting for the rest.
        wire.extend_from_slice(&[0, 0, 0x20, 1]);
        wire.extend_from_slice(&[2; 10]);
        let mut client = Vec::new();
        let mut id = None;
        sessions.with(|sessions| {
            sessions.insert(
                9,
                Session {
                    bound: 1000,
                    cut: None,
                },
            )
        });
        replies(&wire[..], &mut client, &sessions, &mut id)
            .await
            .expect("cut without an error");
        assert_eq!(id, Some(9));
        assert_eq!(client, wire[..wire.len() - 14]);
        assert_eq!(sessions.with(|sessions| sessions[&9].cut), Some(0x20_0000));
    }
}
