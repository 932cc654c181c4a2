//! Values from a peer (AGI variables, caller names, frame contents) made safe for the service
//! log: control bytes escaped (a CR, LF or ESC from the peer can neither forge a log line nor
//! drive the admin's terminal) and the length capped.

/// Caller ID, names, channels and other short peer values are cut to this many characters.
pub const MAX_VALUE_CHARS: usize = 80;

/// `s` with control characters escaped (`\r`, `\n`, `\t`, `\u{1b}`, ...) and at most
/// `max_chars` characters kept (then `…(N chars)`, with N the original length in chars).
pub fn clean(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 2) + 16);
    let mut n = 0usize;
    let mut cut = false;
    for c in s.chars() {
        if n == max_chars {
            cut = true;
            break;
        }
        n += 1;
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut {
        out.push_str(&format!("…({} chars)", s.chars().count()));
    }
    out
}

/// [`clean`] with [`MAX_VALUE_CHARS`], for an optional value (`-` when absent).
pub fn value(s: Option<&str>) -> String {
    match s {
        Some(s) => clean(s, MAX_VALUE_CHARS),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_are_escaped_and_length_capped() {
        assert_eq!(clean("Alice", 80), "Alice");
        assert_eq!(clean("A\r\nINFO forged\u{1b}[2J", 80), "A\\r\\nINFO forged\\u{1b}[2J");
        let long = "x".repeat(10_000);
        let c = clean(&long, 80);
        assert!(c.starts_with(&"x".repeat(80)));
        assert!(c.ends_with("…(10000 chars)"), "{c}");
        assert!(c.chars().count() < 100);
        assert_eq!(value(None), "-");
        assert_eq!(clean("Zoë", 2), "Zo…(3 chars)");
    }
}
