//! Frame codec: how opaque frames are laid out on a QUIC stream.
//!
//! This module exists so the wire format lives in one small, pure, synchronous
//! place that a fuzz target (`fuzz/fuzz_targets/frame.rs`) and unit tests can
//! exercise without any networking.
//!
//! Data flow: every unidirectional stream this crate opens starts with the
//! 4-byte [`STREAM_PREAMBLE`] (magic + format version), followed by zero or
//! more frames until the stream is finished. A frame is a big-endian `u32`
//! payload length followed by exactly that many payload bytes:
//!
//! ```text
//! stream  = preamble frame*
//! preamble = "lch" 0x01
//! frame   = len:u32be payload:[u8; len]      (len <= max_frame_len)
//! ```
//!
//! The reader in `endpoint.rs` accumulates stream bytes into a buffer and calls
//! [`check_preamble`] once, then [`decode_frame`] repeatedly. Both look at the
//! header first, so an oversized length is rejected *before* any buffer is
//! grown to hold the payload: the most a peer can make us buffer for one
//! stream is `max_frame_len` plus one read chunk.

use thiserror::Error;

/// Length of the frame header (the big-endian `u32` payload length).
pub const HEADER_LEN: usize = 4;

/// Bytes every unidirectional stream starts with: `b"lch"` and format version 1.
///
/// It lets a receiver reject garbage (or a future, incompatible stream kind)
/// at the first four bytes instead of interpreting them as a length.
pub const STREAM_PREAMBLE: [u8; 4] = *b"lch\x01";

/// Why bytes on a stream could not be decoded. Every variant is the peer's
/// fault; the reader closes that one stream and counts the rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces a payload longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// Configured maximum payload length.
        max: usize,
    },
    /// The stream does not start with [`STREAM_PREAMBLE`].
    #[error("stream does not start with the lichen preamble")]
    BadPreamble,
    /// The stream ended in the middle of a frame (or of the preamble).
    #[error("stream ended inside a frame ({buffered} bytes left over)")]
    Truncated {
        /// Bytes that were buffered but did not form a complete frame.
        buffered: usize,
    },
}

/// Checks the stream preamble at the start of `buf`.
///
/// Returns `Ok(Some(n))` with the number of bytes to skip when the preamble is
/// complete and correct, `Ok(None)` when more bytes are needed (the bytes so
/// far are a prefix of the preamble), and [`FrameError::BadPreamble`] as soon
/// as a byte differs.
pub fn check_preamble(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let n = buf.len().min(STREAM_PREAMBLE.len());
    if buf[..n] != STREAM_PREAMBLE[..n] {
        return Err(FrameError::BadPreamble);
    }
    if n < STREAM_PREAMBLE.len() {
        Ok(None)
    } else {
        Ok(Some(STREAM_PREAMBLE.len()))
    }
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(Some((payload, consumed)))` for a complete frame, where
/// `consumed` is `HEADER_LEN + payload.len()`; `Ok(None)` when `buf` holds only
/// part of a frame; and [`FrameError::TooLarge`] as soon as the header is
/// complete and announces more than `max` bytes, whatever follows it.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header);
    // u32 -> u64 is lossless; compare in u64 so a 32-bit usize cannot wrap.
    if u64::from(len) > max as u64 {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    // len <= max, and max is a usize, so this conversion is lossless.
    let len = len as usize;
    let end = HEADER_LEN + len;
    match buf.get(HEADER_LEN..end) {
        Some(payload) => Ok(Some((payload, end))),
        None => Ok(None),
    }
}

/// Returns the 4-byte header for a payload of `len` bytes, or
/// [`FrameError::TooLarge`] if `len > max` (or does not fit in a `u32`).
pub fn encode_header(len: usize, max: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    match u32::try_from(len) {
        Ok(l) if len <= max => Ok(l.to_be_bytes()),
        _ => Err(FrameError::TooLarge {
            len: len as u64,
            max,
        }),
    }
}

/// Appends the encoding of `payload` (header + payload) to `out`.
pub fn encode_frame(payload: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let header = encode_header(payload.len(), max)?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let mut out = Vec::new();
        encode_frame(b"hi", 16, &mut out).unwrap();
        encode_frame(b"", 16, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0]);
        assert_eq!(
            encode_header(0x0102_0304, usize::MAX).unwrap(),
            [1, 2, 3, 4]
        );
        assert_eq!(STREAM_PREAMBLE, [0x6c, 0x63, 0x68, 0x01]);
    }

    #[test]
    fn decode_round_trip_and_partial() {
        let mut out = Vec::new();
        encode_frame(b"hello", 5, &mut out).unwrap();
        encode_frame(b"!", 5, &mut out).unwrap();
        let (p, n) = decode_frame(&out, 5).unwrap().unwrap();
        assert_eq!((p, n), (&b"hello"[..], 9));
        let (p, n2) = decode_frame(&out[n..], 5).unwrap().unwrap();
        assert_eq!((p, n2), (&b"!"[..], 5));
        for cut in 0..9 {
            assert_eq!(decode_frame(&out[..cut], 5), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_rejected_from_header_alone() {
        // Only the header is present: still rejected, nothing else needed.
        assert_eq!(
            decode_frame(&[0, 0, 0, 6], 5),
            Err(FrameError::TooLarge { len: 6, max: 5 })
        );
        assert_eq!(
            decode_frame(&[0xff, 0xff, 0xff, 0xff, 1, 2], 1 << 20),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX),
                max: 1 << 20
            })
        );
        assert!(encode_frame(&[0; 6], 5, &mut Vec::new()).is_err());
        // Exactly max is fine.
        assert!(decode_frame(&[0, 0, 0, 5, 1, 2, 3, 4, 5], 5)
            .unwrap()
            .is_some());
    }

    /// The fuzz target's property on deterministic pseudo-random inputs:
    /// whatever decodes re-encodes to the same bytes.
    #[test]
    fn pseudo_random_bytes_round_trip() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..20_000u32 {
            let mut buf = Vec::new();
            for _ in 0..(n % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly small bytes so lengths are often plausible.
                buf.push((x >> 56) as u8 & if n % 2 == 0 { 0x03 } else { 0xff });
            }
            let max = (n % 7) as usize * 3;
            let (mut off, mut out) = (0, Vec::new());
            while let Ok(Some((p, used))) = decode_frame(&buf[off..], max) {
                encode_frame(p, max, &mut out).unwrap();
                off += used;
            }
            assert_eq!(&out[..], &buf[..off]);
        }
    }

    #[test]
    fn preamble() {
        assert_eq!(check_preamble(b""), Ok(None));
        assert_eq!(check_preamble(b"lc"), Ok(None));
        assert_eq!(check_preamble(b"lch\x01rest"), Ok(Some(4)));
        assert_eq!(check_preamble(b"x"), Err(FrameError::BadPreamble));
        assert_eq!(check_preamble(b"lch\x02"), Err(FrameError::BadPreamble));
    }
}
