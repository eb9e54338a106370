//! The frame format of the API forward, without any I/O.
//!
//! Every frame is `[magic u8 = 0xA5][conn id u32 LE][kind u8][len u16 LE][len bytes]`.
//! The magic byte detects a desynchronised stream (a lost byte on the
//! serial line) early instead of misreading lengths forever.

use thiserror::Error;

/// First byte of every frame.
pub const MAGIC: u8 = 0xA5;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 4096;
/// Version carried by the [`Kind::Hello`] frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The connecting side (inside the emulated host) is ready; payload: version.
    Hello = 0,
    /// A new channel `conn` was opened by the listening side.
    Open = 1,
    /// Bytes for channel `conn`.
    Data = 2,
    /// The sender will send no more bytes on `conn` (half close).
    Eof = 3,
    /// Channel `conn` is gone (reset, connect failure or both halves done).
    Close = 4,
    /// The receiver delivered `u32 LE` more bytes of `conn`: sender credit.
    Ack = 5,
}

impl TryFrom<u8> for Kind {
    type Error = CodecError;

    fn try_from(value: u8) -> Result<Self, CodecError> {
        Ok(match value {
            0 => Kind::Hello,
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Eof,
            4 => Kind::Close,
            5 => Kind::Ack,
            other => return Err(CodecError::BadKind(other)),
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Channel id (0 for [`Kind::Hello`]).
    pub conn: u32,
    /// Meaning of the frame.
    pub kind: Kind,
    /// Payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

/// A stream that is not a sequence of valid frames.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// A frame did not start with [`MAGIC`].
    #[error("bad frame magic {0:#04x}: stream out of sync")]
    BadMagic(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Payload longer than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes is too long")]
    TooLong(usize),
    /// An Ack frame whose payload is not 4 bytes.
    #[error("malformed ack frame")]
    BadAck,
}

impl Frame {
    /// A frame without payload.
    pub fn empty(conn: u32, kind: Kind) -> Self {
        Frame {
            conn,
            kind,
            payload: Vec::new(),
        }
    }

    /// The hello frame of this protocol version.
    pub fn hello() -> Self {
        Frame {
            conn: 0,
            kind: Kind::Hello,
            payload: vec![PROTOCOL_VERSION],
        }
    }

    /// A data frame; `bytes` must be at most [`MAX_PAYLOAD`] long.
    pub fn data(conn: u32, bytes: &[u8]) -> Self {
        Frame {
            conn,
            kind: Kind::Data,
            payload: bytes.to_vec(),
        }
    }

    /// A credit frame for `count` delivered bytes.
    pub fn ack(conn: u32, count: u32) -> Self {
        Frame {
            conn,
            kind: Kind::Ack,
            payload: count.to_le_bytes().to_vec(),
        }
    }

    /// The credit carried by an [`Kind::Ack`] frame.
    pub fn ack_count(&self) -> Result<u32, CodecError> {
        let bytes: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| CodecError::BadAck)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let len = u16::try_from(self.payload.len())
            .ok()
            .filter(|l| usize::from(*l) <= MAX_PAYLOAD)
            .ok_or(CodecError::TooLong(self.payload.len()))?;
        out.push(MAGIC);
        out.extend_from_slice(&self.conn.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The encoded frame.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        let Some(&magic) = self.buf.first() else {
            return Ok(None);
        };
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let conn = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let kind = Kind::try_from(self.buf[5])?;
        let len = usize::from(u16::from_le_bytes([self.buf[6], self.buf[7]]));
        if len > MAX_PAYLOAD {
            return Err(CodecError::TooLong(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Frame {
            conn,
            kind,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_byte_by_byte() {
        let frames = vec![
            Frame::hello(),
            Frame::empty(7, Kind::Open),
            Frame::data(7, b"GET / HTTP/1.1\r\n\r\n"),
            Frame::ack(7, 18),
            Frame::empty(7, Kind::Eof),
            Frame::empty(7, Kind::Close),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire).unwrap();
        }
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(dec.pending(), 0);
    }
}
