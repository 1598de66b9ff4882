//! IKE message parsing never panics, and whatever parses emits back to the
//! same octets (reserved fields and unknown payloads included).
#![no_main]

use ike_proto::codec::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        assert_eq!(m.emit(), data, "parse -> emit changed the message");
    }
});
