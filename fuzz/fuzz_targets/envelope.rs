#![no_main]
//! The invocation envelope: any bytes decode or fail with an input error code.

use mycelium_core::{envelope, ErrorCode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(error) = envelope::decode_invoke_request(data) {
        assert!(matches!(
            error.code,
            ErrorCode::InvalidRequest | ErrorCode::InvalidEvent | ErrorCode::InvalidFunctionName
        ));
    }
});
