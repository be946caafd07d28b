//! The least an application's MQTT 5 client needs (`mqtt://host:port`, no credentials): it
//! publishes at QoS 1, returning once the broker has the message, subscribes, and reads
//! what its subscriptions deliver. The tests and the bench play the application with it.

use std::io::{Error, Result};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

pub struct Publisher {
    stream: BufStream<TcpStream>,
    next_id: u16,
}

impl Publisher {
    pub async fn connect(url: &str) -> Result<Publisher> {
        let address = url
            .strip_prefix("mqtt://")
            .ok_or_else(|| Error::other(format!("{url} is not an mqtt:// URL")))?;
        let tcp = TcpStream::connect(address.trim_end_matches('/')).await?;
        let mut client = Publisher {
            stream: BufStream::new(tcp),
            next_id: 0,
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "stepwise-app-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // MQTT 5, a clean start, keep-alive 60 s, no properties.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0];
        put_bytes(&mut body, id.as_bytes());
        client.send(0x10, &body).await?;
        let (first, body) = client.read().await?;
        if first >> 4 != 2 || body.get(1) != Some(&0) {
            return Err(Error::other(format!("the broker refused: {body:?}")));
        }
        Ok(client)
    }

    async fn send(&mut self, first: u8, body: &[u8]) -> Result<()> {
        let mut packet = vec![first];
        let mut length = body.len();
        loop {
            let byte = (length % 128) as u8;
            length /= 128;
            packet.push(if length > 0 { byte | 0x80 } else { byte });
            if length == 0 {
                break;
            }
        }
        packet.extend_from_slice(body);
        self.stream.write_all(&packet).await?;
        self.stream.flush().await
    }

    /// The next packet: its first byte and its body.
    async fn read(&mut self) -> Result<(u8, Vec<u8>)> {
        let first = self.stream.read_u8().await?;
        let (mut length, mut shift) = (0usize, 0);
        loop {
            let byte = self.stream.read_u8().await?;
            length |= usize::from(byte & 0x7F) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((first, body))
    }

    fn packet_id(&mut self) -> [u8; 2] {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id.to_be_bytes()
    }

    /// Publishes at QoS 1 with these user properties (`retain` if asked), and returns once the
    /// broker has acknowledged it.
    pub async fn publish(
        &mut self,
        topic: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
        retain: bool,
    ) -> Result<()> {
        let mut body = Vec::new();
        put_bytes(&mut body, topic.as_bytes());
        let id = self.packet_id();
        body.extend_from_slice(&id);
        let mut properties = Vec::new();
        for (name, value) in headers {
            properties.push(0x26);
            put_bytes(&mut properties, name.as_bytes());
            put_bytes(&mut properties, value.as_bytes());
        }
        if properties.len() >= 128 {
            return Err(Error::other("user properties past one length byte"));
        }
        body.push(properties.len() as u8);
        body.extend_from_slice(&properties);
        body.extend_from_slice(payload);
        self.send(0x32 | u8::from(retain), &body).await?;
        loop {
            let (first, body) = self.read().await?;
            if first >> 4 == 4 && body.get(..2) == Some(&id[..]) {
                return match body.get(2) {
                    Some(reason) if *reason >= 0x80 => {
                        Err(Error::other(format!("PUBACK {reason:#04x}")))
                    }
                    _ => Ok(()),
                };
            }
        }
    }

    /// Subscribes at QoS 0 and returns once the broker confirms it.
    pub async fn subscribe(&mut self, filter: &str) -> Result<()> {
        let id = self.packet_id();
        let mut body = id.to_vec();
        body.push(0);
        put_bytes(&mut body, filter.as_bytes());
        body.push(0);
        self.send(0x82, &body).await?;
        loop {
            let (first, body) = self.read().await?;
            if first >> 4 == 9 && body.get(..2) == Some(&id[..]) {
                return match body.get(3..) {
                    Some(reasons) if reasons.iter().all(|reason| *reason < 0x80) => Ok(()),
                    _ => Err(Error::other(format!("SUBACK {body:?}"))),
                };
            }
        }
    }

    /// The payload of the next message a subscription delivers.
    pub async fn next_message(&mut self) -> Result<Vec<u8>> {
        loop {
            let (first, body) = self.read().await?;
            if first >> 4 != 3 {
                continue;
            }
            let malformed = || Error::other("a malformed PUBLISH");
            let topic = usize::from(u16::from_be_bytes([
                *body.first().ok_or_else(malformed)?,
                *body.get(1).ok_or_else(malformed)?,
            ]));
            let mut at = 2 + topic;
            if (first >> 1) & 3 > 0 {
                at += 2;
            }
            let properties = usize::from(*body.get(at).ok_or_else(malformed)?);
            return body
                .get(at + 1 + properties..)
                .map(<[u8]>::to_vec)
                .ok_or_else(malformed);
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}
