//! Text from people is data: the one check that refuses control characters in what a
//! requester, approver, reviewer or operator types (every surface calls [`check`]), and the
//! escapes that show text stored before that check as text in a terminal and in Slack.
//!
//! HTML escaping lives with the web UI (`web/ui/app.js` builds the page with `textContent`),
//! CSV quoting in `csv`, syslog and CEF escaping in `siem::format`.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` may never appear in one-line text from a person: C0 controls (tab and newline
/// included), DEL, C1 controls, and the bidirectional overrides and isolates that reorder what
/// a reader sees (U+202A–U+202E, U+2066–U+2069).
pub fn is_refused(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether a field may span lines. Only long free text (a review's findings and root cause)
/// does; a reason or an incident id is one line, so a newline there is refused: it would let
/// a requester forge a second line in an approver's `status` or a syslog message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    One,
    /// `\n` is allowed; every other control character is still refused.
    Many,
}

/// The longest one-line field (a reason, an incident id) and the longest multi-line one (a
/// review's findings), in characters. Every SIEM event, alert, terminal `status` line and web
/// page repeats these fields; a megabyte reason would be copied into all of them.
pub const MAX_ONE_LINE: usize = 1000;
pub const MAX_MANY_LINES: usize = 20_000;

/// Refuses a field holding a control character, naming the field and the first offending
/// character as an escape: `reason contains a control character (U+001B)`; and a field over
/// [`MAX_ONE_LINE`] or [`MAX_MANY_LINES`] characters.
pub fn check(field: &str, value: &str, lines: Lines) -> Result<(), String> {
    let max = match lines {
        Lines::One => MAX_ONE_LINE,
        Lines::Many => MAX_MANY_LINES,
    };
    // Counting stops at the first character over the limit.
    if value.chars().nth(max).is_some() {
        return Err(format!("{field} is longer than {max} characters"));
    }
    match value
        .chars()
        .find(|&c| is_refused(c) && !(lines == Lines::Many && c == '\n'))
    {
        None => Ok(()),
        Some(c) => {
            let what = if c.is_control() {
                "a control character"
            } else {
                "a bidirectional override"
            };
            Err(format!("{field} contains {what} (U+{:04X})", c as u32))
        }
    }
}

/// Text for a terminal: every character [`is_refused`] refuses is shown as a `\u{..}` escape
/// (and a backslash that starts one as `\\`), so text stored before input was checked can
/// neither move the cursor, set the clipboard (OSC 52) nor reorder a line.
pub fn terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_refused(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_refused(c) {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Text for Slack mrkdwn: control characters as escapes as in [`terminal`], then
/// [`mrkdwn`].
pub fn slack(s: &str) -> String {
    mrkdwn(&terminal(s))
}

/// `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`, the three escapes Slack documents, so
/// `<!channel>` and `<https://x|Approve>` are shown, not acted on. For text whose control
/// characters are already escaped.
pub fn mrkdwn(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_fields_over_their_length() {
        let at = "é".repeat(MAX_ONE_LINE);
        assert_eq!(check("reason", &at, Lines::One), Ok(()));
        let over = format!("{at}x");
        assert_eq!(
            check("reason", &over, Lines::One),
            Err(format!("reason is longer than {MAX_ONE_LINE} characters"))
        );
        assert_eq!(check("findings", &over, Lines::Many), Ok(()));
        let long = "a\n".repeat(MAX_MANY_LINES);
        assert!(check("findings", &long, Lines::Many).is_err());
    }

    #[test]
    fn check_refuses_controls_and_bidi() {
        let cases: &[(&str, Lines, Option<&str>)] = &[
            ("disk full on /var", Lines::One, None),
            ("naïve café ✓ 日本", Lines::One, None),
            ("<!channel> & <http://x|y>", Lines::One, None),
            (
                "a\x1b[31mred",
                Lines::One,
                Some("reason contains a control character (U+001B)"),
            ),
            (
                "\x1b]52;c;ZXZpbA==\x07",
                Lines::One,
                Some("reason contains a control character (U+001B)"),
            ),
            (
                "two\nlines",
                Lines::One,
                Some("reason contains a control character (U+000A)"),
            ),
            ("two\nlines", Lines::Many, None),
            (
                "cr\r\n",
                Lines::Many,
                Some("reason contains a control character (U+000D)"),
            ),
            (
                "tab\there",
                Lines::One,
                Some("reason contains a control character (U+0009)"),
            ),
            (
                "nul\0",
                Lines::One,
                Some("reason contains a control character (U+0000)"),
            ),
            (
                "del\x7f",
                Lines::One,
                Some("reason contains a control character (U+007F)"),
            ),
            (
                "c1\u{9b}31m",
                Lines::One,
                Some("reason contains a control character (U+009B)"),
            ),
            (
                "abc\u{202E}fdp.exe",
                Lines::Many,
                Some("reason contains a bidirectional override (U+202E)"),
            ),
            (
                "\u{2066}x",
                Lines::One,
                Some("reason contains a bidirectional override (U+2066)"),
            ),
            (
                "\u{2069}",
                Lines::One,
                Some("reason contains a bidirectional override (U+2069)"),
            ),
            ("\u{200F}rlm mark is fine", Lines::One, None),
        ];
        for (input, lines, want) in cases {
            assert_eq!(
                check("reason", input, *lines).err().as_deref(),
                *want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn terminal_escapes_what_check_refuses() {
        let cases = [
            ("plain text", "plain text"),
            ("\x1b]52;c;ZXZpbA==\x07", "\\u{1b}]52;c;ZXZpbA==\\u{7}"),
            ("a\nb\tc\r", "a\\u{a}b\\u{9}c\\u{d}"),
            ("\u{9b}\u{7f}", "\\u{9b}\\u{7f}"),
            ("x\u{202E}y", "x\\u{202e}y"),
            // A literal backslash is doubled, so stored text cannot fake an escape.
            ("\\u{1b}", "\\\\u{1b}"),
            ("日本", "日本"),
        ];
        for (input, want) in cases {
            assert_eq!(terminal(input), want, "{input:?}");
        }
        assert!(matches!(terminal("ok"), Cow::Borrowed(_)));
    }

    #[test]
    fn slack_markup_is_inert() {
        let cases = [
            ("<!channel> now", "&lt;!channel&gt; now"),
            ("<https://evil|Approve>", "&lt;https://evil|Approve&gt;"),
            ("a & b", "a &amp; b"),
            ("&lt;", "&amp;lt;"),
            ("\x1b[2J", "\\u{1b}[2J"),
            ("*bold* _it_", "*bold* _it_"),
        ];
        for (input, want) in cases {
            assert_eq!(slack(input), want, "{input:?}");
        }
    }
}
