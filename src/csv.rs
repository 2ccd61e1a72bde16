//! CSV encoding (RFC 4180 quoting) shared by the CLI tables, reports and metadata exports.

/// One field: quoted when it holds a comma, a quote or a line break; quotes are doubled.
pub fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
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
        ];
        for (input, want) in cases {
            assert_eq!(field(input), want, "{input:?}");
        }
        assert_eq!(line(&["a", "b,c", ""]), "a,\"b,c\",\n");
    }
}
