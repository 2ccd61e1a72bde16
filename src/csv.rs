//! CSV encoding (RFC 4180 quoting) shared by the CLI tables, reports and metadata exports.

/// One field: quoted when it holds a comma, a quote or a line break; quotes are doubled.
///
/// Text that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, a tab or a
/// carriage return, and not a plain number) gets a leading `'`, so a request reason such as
/// `=HYPERLINK(...)` stays text when an auditor opens the file. The JSON exports carry every
/// value unchanged.
pub fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// One record of fields, ending in `\n`.
pub fn line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = fields
        .iter()
        .map(|f| field(f.as_ref()))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_needed() {
        let cases = [
            ("plain", "plain"),
            ("", ""),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("two\nlines", "\"two\nlines\""),
            ("cr\r", "\"cr\r\""),
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("+1+cmd", "'+1+cmd"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("-rf /", "'-rf /"),
            ("\tx", "'\tx"),
            ("-5", "-5"),
            ("+1.5", "+1.5"),
            ("a=b", "a=b"),
        ];
        for (input, want) in cases {
            assert_eq!(field(input), want, "{input:?}");
        }
        assert_eq!(line(&["a", "b,c", ""]), "a,\"b,c\",\n");
    }
}
