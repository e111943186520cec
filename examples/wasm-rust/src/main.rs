//! The Rust example: a WebAssembly function (WASI preview 1) that counts the words of its
//! event's text, like the plugin example's wordcount. The event arrives on stdin as
//! CloudEvents JSON; the reply goes to stdout; stderr reaches the function's logs.
//!
//! It uses std only, so Debian's rustc 1.63 with libstd-rust-dev-wasm32 builds it offline:
//!
//! ```text
//! /usr/bin/rustc --edition 2021 --target wasm32-wasi -O -o wordcount.wasm src/main.rs
//! ```
//!
//! With rustup: `rustup target add wasm32-wasip1` and `cargo build --release --target
//! wasm32-wasip1` (then serde_json would replace the small reader below).

use std::io::Read;

fn main() {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        return reply_error("invalid_event", "the event is not UTF-8 text");
    }
    if string_after(&input, "\"type\"").as_deref() != Some("com.example.wordcount") {
        // Any other event is echoed.
        return print!("{input}");
    }
    let id = string_after(&input, "\"id\"").unwrap_or_default();
    // Text data, or JSON data {"text": "..."}.
    let text = input.find("\"data\"").and_then(|at| {
        let data = &input[at..];
        string_after(data, "\"data\"").or_else(|| string_after(data, "\"text\""))
    });
    // (`let ... else` came after Debian's rustc 1.63.)
    let text = match text {
        Some(text) => text,
        None => {
            return reply_error("function_error", "send text data, or JSON {\\\"text\\\": \\\"...\\\"}")
        }
    };
    let function = std::env::var("MYCELIUM_FUNCTION").unwrap_or_else(|_| "wordcount".into());
    eprintln!("counting the words of {} characters", text.chars().count());
    println!(
        r#"{{"specversion":"1.0","id":"wordcount-{}","source":"mycelium/{}","type":"com.example.wordcount.result","datacontenttype":"application/json","data":{{"words":{},"characters":{}}}}}"#,
        escape(&id),
        function,
        text.split_whitespace().count(),
        text.chars().count()
    );
}

fn reply_error(code: &str, message: &str) {
    println!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
}

/// The JSON string value after the first `key` in `json` (the first wins: an attribute, in
/// what the runtime sends), unescaped; `None` when the value is not a string.
fn string_after(json: &str, key: &str) -> Option<String> {
    let rest = &json[json.find(key)? + key.len()..];
    let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ':');
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut value = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'r' => value.push('\r'),
                'b' => value.push('\u{8}'),
                'f' => value.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('\u{fffd}'));
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
