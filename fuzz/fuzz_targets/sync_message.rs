//! Fuzz the sync wire decoder: arbitrary bytes must never panic or over-allocate, and
//! whatever decodes must re-encode to exactly the same bytes (the encoding is canonical).
//!
//! Needs in `fuzz/Cargo.toml`:
//! ```toml
//! [[bin]]
//! name = "sync_message"
//! path = "fuzz_targets/sync_message.rs"
//! test = false
//! doc = false
//! bench = false
//! ```
//! Run: `cargo +nightly fuzz run sync_message`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_crdt::sync::SyncMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = SyncMessage::decode(data) {
        let bytes = msg.encode();
        assert_eq!(bytes.as_slice(), data, "re-encoding differs");
        assert_eq!(msg.encoded_len(), data.len());
        assert_eq!(SyncMessage::decode(&bytes).as_ref(), Ok(&msg));
    }
});
