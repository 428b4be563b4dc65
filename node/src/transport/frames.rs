//! Framing on the control stream: `u32 BE length | body`, bounded reads and
//! the texts that describe a closed connection.

use std::fmt;

use quinn::{ConnectionError, ReadExactError, RecvStream};
use storemesh_protocol::wire::FRAME_BYTES_MAX;

use super::events::sanitize;
use super::*;

pub(super) fn check_outbound_frame(frame: &[u8]) -> Result<(), SendError> {
    if frame.len() < 5 {
        return Err(SendError::InvalidFrame(format!(
            "{} bytes is shorter than a length prefix and a version byte",
            frame.len()
        )));
    }
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len != frame.len() - 4 {
        return Err(SendError::InvalidFrame(format!(
            "length prefix says {len} bytes but {} follow",
            frame.len() - 4
        )));
    }
    if len > FRAME_BYTES_MAX {
        return Err(SendError::InvalidFrame(format!(
            "frame of {len} bytes exceeds the {FRAME_BYTES_MAX}-byte limit"
        )));
    }
    Ok(())
}

pub(super) enum FrameError {
    Conn(ConnectionError),
    /// The stream ended cleanly at a frame boundary.
    Eof,
    Protocol(String),
    Other(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Conn(e) => write!(f, "{e}"),
            FrameError::Eof => f.write_str("stream finished"),
            FrameError::Protocol(s) | FrameError::Other(s) => f.write_str(s),
        }
    }
}

pub(super) fn read_error(e: quinn::ReadError) -> FrameError {
    match e {
        quinn::ReadError::ConnectionLost(c) => FrameError::Conn(c),
        quinn::ReadError::Reset(code) => {
            FrameError::Other(format!("peer reset the stream (code {code})"))
        }
        other => FrameError::Other(other.to_string()),
    }
}

pub(super) fn write_error(e: quinn::WriteError) -> FrameError {
    match e {
        quinn::WriteError::ConnectionLost(c) => FrameError::Conn(c),
        other => FrameError::Other(other.to_string()),
    }
}

/// Reads one `u32 BE length | body` frame; never allocates more than `limit`.
pub(super) async fn read_frame(recv: &mut RecvStream, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(FrameError::Eof),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Protocol(format!(
                "stream ended inside a length prefix ({n} bytes)"
            )))
        }
        Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Protocol("empty frame".into()));
    }
    if len > limit {
        return Err(FrameError::Protocol(format!(
            "frame of {len} bytes exceeds the {limit}-byte limit"
        )));
    }
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(body),
        Err(ReadExactError::FinishedEarly(n)) => Err(FrameError::Protocol(format!(
            "stream ended inside a frame ({n} of {len} bytes)"
        ))),
        Err(ReadExactError::ReadError(e)) => Err(read_error(e)),
    }
}

pub(super) fn describe_close(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let text = sanitize(&c.reason);
            match u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX) {
                CLOSE_SHUTDOWN => "peer shut down".into(),
                CLOSE_DUPLICATE | CLOSE_REPLACED => {
                    "peer replaced this connection with another one".into()
                }
                CLOSE_BLOCKED => "peer blocks this node".into(),
                CLOSE_PROTOCOL => format!("peer saw a protocol violation: {text}"),
                CLOSE_RECONNECT => format!("peer restarts the connection ({text})"),
                code => format!("closed by peer (code {code}): {text}"),
            }
        }
        ConnectionError::TimedOut => "idle timeout: peer unreachable".into(),
        ConnectionError::Reset => "connection reset by peer (peer restarted?)".into(),
        ConnectionError::LocallyClosed => "closed locally".into(),
        other => other.to_string(),
    }
}
