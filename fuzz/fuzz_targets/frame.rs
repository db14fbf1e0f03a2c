//! Fuzz target for the transport frame codec (`lichen_transport::frame`).
//!
//! Decodes arbitrary bytes as a sequence of frames and checks that whatever
//! decodes re-encodes to exactly the bytes it was decoded from, that no frame
//! above the limit is ever accepted, and that nothing panics. The first input
//! byte picks the maximum frame length so the limit itself gets exercised.
//!
//! Needs, in fuzz/Cargo.toml: a path dependency on `lichen-transport`
//! (`../transport`) and `[[bin]] name = "frame", path = "fuzz_targets/frame.rs"`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_transport::frame::{check_preamble, decode_frame, encode_frame, FrameError, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&m, buf)) = data.split_first() else {
        return;
    };
    let max = usize::from(m) * 257;
    let _ = check_preamble(buf);

    let mut offset = 0;
    let mut reencoded = Vec::new();
    loop {
        match decode_frame(&buf[offset..], max) {
            Ok(Some((payload, consumed))) => {
                assert_eq!(consumed, HEADER_LEN + payload.len());
                assert!(payload.len() <= max);
                encode_frame(payload, max, &mut reencoded).expect("decoded frame re-encodes");
                offset += consumed;
            }
            Ok(None) => break,
            Err(FrameError::TooLarge { len, max: m }) => {
                assert_eq!(m, max);
                assert!(len > max as u64);
                break;
            }
            Err(e) => panic!("decode_frame returned a stream-level error: {e}"),
        }
    }
    assert_eq!(&reencoded[..], &buf[..offset]);
});
