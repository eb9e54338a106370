//! Text from the server (much of it from the guest: the agent's version,
//! worker names and states, operation reasons, error messages) made safe
//! for a terminal: control characters (C0, DEL, C1, so every ANSI escape
//! sequence) and the Unicode controls that reorder or break lines (bidi
//! overrides and isolates, line and paragraph separators) come out as
//! visible escapes (`\u{1b}`, `\n`), never raw; a backslash is doubled so
//! an escape cannot be faked.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every unsafe character escaped, and `\` doubled; `keep`
/// characters (e.g. `\n` in multi-line text) are left as they are.
fn escape_keeping<'a>(text: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| (c == '\\' || needs_escape(c)) && !keep.contains(&c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.extend(c.escape_default());
        }
    }
    Cow::Owned(out)
}

/// One field of server text, for a line of output: newlines escaped too.
pub fn field(text: &str) -> Cow<'_, str> {
    escape_keeping(text, &[])
}

/// Multi-line server text (the metrics): newlines kept, everything else
/// escaped.
pub(crate) fn lines(text: &str) -> Cow<'_, str> {
    escape_keeping(text, &['\n'])
}

/// JSON text from `serde_json`: it escapes C0 controls in strings but not
/// DEL, C1 or the Unicode controls; those become `\uXXXX` here. They can
/// only occur inside strings, so the JSON stays valid and means the same.
pub(crate) fn json(text: String) -> String {
    if !text.chars().any(needs_escape) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            // The structure's own whitespace (`\n` of pretty printing) is
            // kept; everything else in this set lives in strings.
            if c == '\n' {
                out.push(c);
            } else {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched() {
        assert!(matches!(field("ksoftirqd/1 ok"), Cow::Borrowed(_)));
        assert_eq!(field("version 1.2 é"), "version 1.2 é");
    }

    #[test]
    fn controls_and_ansi_come_out_visible() {
        assert_eq!(field("a\u{1b}[31mred"), "a\\u{1b}[31mred");
        assert_eq!(field("x\ny\rz\tw"), "x\\ny\\rz\\tw");
        assert_eq!(field("bell\u{7}"), "bell\\u{7}");
        assert_eq!(field("del\u{7f}"), "del\\u{7f}");
        assert_eq!(field("csi\u{9b}2J"), "csi\\u{9b}2J");
        assert_eq!(field("rtl\u{202e}txt"), "rtl\\u{202e}txt");
        assert_eq!(field("back\\slash"), "back\\\\slash");
        for text in ["\u{1b}]0;title\u{7}", "\u{1b}[2J\u{1b}[H", "\u{0}"] {
            let out = field(text);
            assert!(!out.chars().any(needs_escape), "{out:?}");
        }
        assert_eq!(lines("a 1\nb\u{1b} 2\n"), "a 1\nb\\u{1b} 2\n");
    }

    #[test]
    fn json_escapes_what_serde_json_leaves() {
        let value = serde_json::json!({"v": "a\u{1b}b\u{7f}c\u{9b}d\u{202e}e\nf"});
        let text = json(serde_json::to_string_pretty(&value).unwrap());
        assert!(
            !text.contains(['\u{1b}', '\u{7f}', '\u{9b}', '\u{202e}']),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}
