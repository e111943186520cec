#![no_main]
//! CloudEvents binary mode: header pairs and a body from the input (lines `name: value`, a
//! blank line, then the body).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let headers: Vec<(&str, &str)> = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim(), v.trim()))
        .collect();
    let content_type = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| *v);
    let _ = mycelium_core::event::event_from_binary(headers.iter().copied(), content_type, body.as_bytes());
});
