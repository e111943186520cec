#![no_main]
//! Function metadata records as read back from the registry's KV bucket.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<mycelium_core::FunctionMetadata>(data);
});
