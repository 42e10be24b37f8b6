//! A browser's side of an SSE stream, cheap enough to hold 20,000 at once in one process: one
//! HTTP/1.1 request over a plain socket, the chunked body decoded, and the stream cut into the
//! frames an `EventSource` would dispatch (`data`, `id`, `event`), with the bytes each took.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Read buffer per stream: small, since 20,000 streams hold one each.
const READ_BUFFER: usize = 2048;

/// One frame of the stream, as the browser's parser ends it at a blank line.
#[derive(Debug, Default)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
    /// The body bytes from the end of the previous frame to the end of this one.
    pub bytes: usize,
}

impl Frame {
    /// Whether it carries an event (not a keep-alive, a greeting or a reset).
    pub fn is_event(&self) -> bool {
        !self.data.is_empty() && self.event.is_none()
    }
}

/// An open SSE response.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    /// What is left of the current chunk.
    chunk_left: usize,
    /// Decoded body bytes not yet cut into lines.
    pending: Vec<u8>,
}

impl SseStream {
    /// `GET path` on `address`, with `Last-Event-ID` when given; returns once the response's
    /// headers say 200 and a chunked body follows.
    pub async fn open(
        address: SocketAddr,
        path: &str,
        last_event_id: Option<&str>,
    ) -> io::Result<SseStream> {
        let socket = TcpStream::connect(address).await?;
        socket.set_nodelay(true)?;
        let mut reader = BufReader::with_capacity(READ_BUFFER, socket);
        let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        );
        reader.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        reader.read_line(&mut status).await?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("status {}", status.trim())));
        }
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if header == "\r\n" {
                break;
            }
            chunked |= header
                .to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked");
        }
        if !chunked {
            return Err(io::Error::other("the SSE response is not chunked"));
        }
        Ok(SseStream {
            reader,
            chunk_left: 0,
            pending: Vec::new(),
        })
    }

    /// The next frame, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        let mut frame = Frame::default();
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                frame.bytes += line.len();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                let line = line.strip_suffix('\r').unwrap_or(&line);
                if line.is_empty() {
                    if !frame.data.is_empty() || frame.id.is_some() || frame.event.is_some() {
                        return Ok(Some(frame));
                    }
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "data" => {
                        if !frame.data.is_empty() {
                            frame.data.push('\n');
                        }
                        frame.data.push_str(value);
                    }
                    "id" => frame.id = Some(value.to_owned()),
                    "event" => frame.event = Some(value.to_owned()),
                    _ => {} // retry, comments
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Decodes more of the chunked body into `pending`; false at its end.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.chunk_left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size).await? == 0 {
                return Ok(false);
            }
            if size == "\r\n" {
                // The end of the previous chunk's data.
                size.clear();
                if self.reader.read_line(&mut size).await? == 0 {
                    return Ok(false);
                }
            }
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| io::Error::other(format!("a chunk size of {size:?}")))?;
            if size == 0 {
                return Ok(false);
            }
            self.chunk_left = size;
        }
        let mut buffer = [0; READ_BUFFER];
        let want = self.chunk_left.min(buffer.len());
        let read = self.reader.read(&mut buffer[..want]).await?;
        if read == 0 {
            return Ok(false);
        }
        self.chunk_left -= read;
        self.pending.extend_from_slice(&buffer[..read]);
        Ok(true)
    }
}
