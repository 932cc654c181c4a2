//! Arbitrary bytes as a FastAGI variable block: parsing never panics, and a parsed request
//! keeps the limits (lines, argument count) the server relies on.
#![no_main]

use asterisk_voice_agent_fuzz::agi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = agi::parse_request(data) {
        assert!(req.args.len() <= agi::MAX_HEADER_LINES);
        let info = req.caller_info();
        for v in [&info.caller_id, &info.caller_name, &info.channel].into_iter().flatten() {
            assert!(v.chars().count() <= agi::MAX_CALLER_VALUE);
            assert!(!agi::quote(v).contains('\n'));
        }
        let _ = req.script();
    }
});
