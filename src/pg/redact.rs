//! Secrets by shape in PostgreSQL client traffic: the `PASSWORD '…'` literal of
//! `CREATE|ALTER ROLE|USER|GROUP` (also `ENCRYPTED PASSWORD`, `E'…'`, `U&'…'` and dollar-quoted
//! literals, and the `password` option of `CREATE|ALTER USER MAPPING`) and the body of a
//! PasswordMessage (`p`) are masked, one `*` per byte, in the copy of a client batch that goes
//! to the recorder. The frame keeps its length, so the recording stays well framed; the target
//! receives the original bytes. Everything derived from the recording (SIEM statement events,
//! the SQL timeline, the search index, the web page) therefore only ever sees the mask.
//!
//! The rule, and where it can be wrong:
//! - Only a string literal that directly follows the keyword `PASSWORD` (comments and white
//!   space between are fine) inside a statement that starts with `CREATE` or `ALTER` followed
//!   by `ROLE`, `USER` or `GROUP` is masked. `PASSWORD NULL` has no literal and stays.
//! - A backslash in a plain literal means something else under
//!   `standard_conforming_strings = off`, which a session can set. The masker reads the text
//!   both ways and masks every literal either reading finds, so a secret is never left in
//!   clear; the price is that SQL a hostile user hides inside such a literal is masked too (the
//!   server's command tags in the timeline still show what ran).
//! - A password built at run time (`EXECUTE format(...)` in a `DO` block or a function), or
//!   one inside another statement (`CREATE SUBSCRIPTION ... CONNECTION 'password=…'`), is not
//!   recognised.

use std::ops::Range;

/// The byte every masked byte becomes.
pub const MASK: u8 = b'*';

/// One lexical token; strings carry the range of their contents (between the quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(Range<usize>),
    Str(Range<usize>),
    Semi,
    Other,
}

/// A small SQL lexer over bytes: enough to find keywords, literals and statement ends while
/// skipping comments and quoted identifiers. Never panics, whatever the input.
struct Lexer<'a> {
    b: &'a [u8],
    i: usize,
    /// How a backslash in a plain `'…'` literal is read: true means as an escape
    /// (`standard_conforming_strings = off`).
    backslash_escapes: bool,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

impl Lexer<'_> {
    fn at(&self, i: usize) -> Option<u8> {
        self.b.get(i).copied()
    }

    /// Reads a quoted literal whose contents start at `start`; leaves `i` after the closing
    /// quote (or at the end for an unterminated literal) and returns the contents.
    fn quoted(&mut self, start: usize, backslash: bool) -> Range<usize> {
        let mut j = start;
        while let Some(c) = self.at(j) {
            if backslash && c == b'\\' {
                j = j.saturating_add(2);
                continue;
            }
            if c == b'\'' {
                if self.at(j + 1) == Some(b'\'') {
                    j += 2;
                    continue;
                }
                self.i = j + 1;
                return start..j;
            }
            j += 1;
        }
        self.i = self.b.len();
        start..self.b.len()
    }

    /// At a `$`: the length of a dollar-quote opening tag (`$$`, `$tag$`), if it is one.
    fn dollar_tag(&self) -> Option<usize> {
        let mut j = self.i + 1;
        if self.at(j).is_some_and(|c| c.is_ascii_digit()) {
            return None; // a parameter such as $1
        }
        while let Some(c) = self.at(j) {
            if c == b'$' {
                return Some(j + 1 - self.i);
            }
            if !(is_ident_char(c) && c != b'$') {
                return None;
            }
            j += 1;
        }
        None
    }

    fn next_tok(&mut self) -> Option<Tok> {
        loop {
            let c = self.at(self.i)?;
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => self.i += 1,
                b'-' if self.at(self.i + 1) == Some(b'-') => {
                    while self.at(self.i).is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                b'/' if self.at(self.i + 1) == Some(b'*') => {
                    // Comments nest in PostgreSQL.
                    let mut depth = 0usize;
                    while self.i < self.b.len() {
                        match (self.at(self.i), self.at(self.i + 1)) {
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.i += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.i += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => self.i += 1,
                        }
                    }
                }
                b';' => {
                    self.i += 1;
                    return Some(Tok::Semi);
                }
                b'\'' => {
                    let start = self.i + 1;
                    return Some(Tok::Str(self.quoted(start, self.backslash_escapes)));
                }
                b'"' => {
                    let mut j = self.i + 1;
                    loop {
                        match self.at(j) {
                            None => break,
                            Some(b'"') if self.at(j + 1) == Some(b'"') => j += 2,
                            Some(b'"') => {
                                j += 1;
                                break;
                            }
                            Some(_) => j += 1,
                        }
                    }
                    self.i = j.min(self.b.len());
                    return Some(Tok::Other);
                }
                b'$' => match self.dollar_tag() {
                    Some(n) => {
                        let tag = &self.b[self.i..self.i + n];
                        let start = self.i + n;
                        let end = self.b[start..]
                            .windows(n)
                            .position(|w| w == tag)
                            .map(|p| start + p);
                        return Some(Tok::Str(match end {
                            Some(e) => {
                                self.i = e + n;
                                start..e
                            }
                            None => {
                                self.i = self.b.len();
                                start..self.b.len()
                            }
                        }));
                    }
                    None => {
                        self.i += 1;
                        while self.at(self.i).is_some_and(|c| c.is_ascii_digit()) {
                            self.i += 1;
                        }
                        return Some(Tok::Other);
                    }
                },
                c if is_ident_start(c) => {
                    let start = self.i;
                    while self.at(self.i).is_some_and(is_ident_char) {
                        self.i += 1;
                    }
                    let word = &self.b[start..self.i];
                    let next = self.at(self.i);
                    if next == Some(b'\'') {
                        if word.eq_ignore_ascii_case(b"e") {
                            let s = self.i + 1;
                            return Some(Tok::Str(self.quoted(s, true)));
                        }
                        if [&b"b"[..], b"x", b"n"]
                            .iter()
                            .any(|p| word.eq_ignore_ascii_case(p))
                        {
                            let s = self.i + 1;
                            return Some(Tok::Str(self.quoted(s, self.backslash_escapes)));
                        }
                    }
                    if word.eq_ignore_ascii_case(b"u")
                        && next == Some(b'&')
                        && self.at(self.i + 1) == Some(b'\'')
                    {
                        let s = self.i + 2;
                        return Some(Tok::Str(self.quoted(s, self.backslash_escapes)));
                    }
                    return Some(Tok::Word(start..self.i));
                }
                _ => {
                    self.i += 1;
                    return Some(Tok::Other);
                }
            }
        }
    }
}

/// The password literals one reading of `sql` finds (ranges of their contents).
fn literals_read(sql: &[u8], backslash_escapes: bool) -> Vec<Range<usize>> {
    let mut lx = Lexer {
        b: sql,
        i: 0,
        backslash_escapes,
    };
    let is = |r: &Range<usize>, w: &[u8]| {
        sql.get(r.clone())
            .is_some_and(|x| x.eq_ignore_ascii_case(w))
    };
    let mut out = Vec::new();
    // Per statement: its first two words, and whether the previous token was PASSWORD.
    let mut words: Vec<Range<usize>> = Vec::new();
    let mut after_password = false;
    while let Some(t) = lx.next_tok() {
        match &t {
            Tok::Semi => {
                words.clear();
                after_password = false;
                continue;
            }
            Tok::Word(r) if words.len() < 2 => words.push(r.clone()),
            _ => {}
        }
        let role_statement = words.len() == 2
            && (is(&words[0], b"create") || is(&words[0], b"alter"))
            && (is(&words[1], b"role") || is(&words[1], b"user") || is(&words[1], b"group"));
        if let (Tok::Str(r), true, true) = (&t, after_password, role_statement) {
            out.push(r.clone());
        }
        after_password = matches!(&t, Tok::Word(r) if is(r, b"password"));
    }
    out
}

/// Whether `sql` holds no statement at all: only white space, comments and semicolons.
pub fn is_blank(sql: &[u8]) -> bool {
    let mut lx = Lexer {
        b: sql,
        i: 0,
        backslash_escapes: false,
    };
    while let Some(t) = lx.next_tok() {
        if t != Tok::Semi {
            return false;
        }
    }
    true
}

/// The ranges of `sql` to mask: every password literal's contents under either reading of a
/// backslash, merged where they overlap.
pub fn password_literals(sql: &[u8]) -> Vec<Range<usize>> {
    let mut all = literals_read(sql, false);
    all.extend(literals_read(sql, true));
    all.retain(|r| !r.is_empty());
    all.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Masks every password literal of `sql` in place; returns the byte count of each.
pub fn mask_sql(sql: &mut [u8]) -> Vec<usize> {
    let found = password_literals(sql);
    for r in &found {
        if let Some(s) = sql.get_mut(r.clone()) {
            s.fill(MASK);
        }
    }
    found.iter().map(|r| r.len()).collect()
}

/// A client batch with its secrets masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    /// The batch, same length, secrets replaced by [`MASK`].
    pub bytes: Vec<u8>,
    /// What was masked, in order: kind (`password-literal`, `password-message`) and byte count.
    pub redacted: Vec<(&'static str, usize)>,
}

/// A batch of whole frontend messages with its secrets masked, or `None` when it holds none
/// (the caller then records the batch as it is). Anything that does not frame cleanly ends
/// the scan; the relay only hands over batches it framed itself.
pub fn mask_frontend(batch: &[u8]) -> Option<Masked> {
    let mut out: Option<Vec<u8>> = None;
    let mut redacted = Vec::new();
    let mut at = 0usize;
    while let (Some(&tag), Some(l)) = (batch.get(at), batch.get(at + 1..at + 5)) {
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        let Some(end) = usize::try_from(len)
            .ok()
            .filter(|l| *l >= 4)
            .and_then(|l| (at + 1).checked_add(l))
            .filter(|e| *e <= batch.len())
        else {
            break;
        };
        let body = at + 5..end;
        // The SQL text inside the body, if this message carries one.
        let sql = match tag {
            b'Q' => Some(body.start..cstr_end(batch, body.clone())),
            b'P' => {
                let name_end = cstr_end(batch, body.clone());
                let q = (name_end + 1).min(body.end)..body.end;
                Some(q.start..cstr_end(batch, q))
            }
            _ => None,
        };
        if let Some(sql) = sql {
            let found = batch.get(sql.clone()).map(password_literals);
            for r in found.into_iter().flatten() {
                redacted.push(("password-literal", r.len()));
                let o = out.get_or_insert_with(|| batch.to_vec());
                if let Some(s) = o.get_mut(sql.start + r.start..sql.start + r.end) {
                    s.fill(MASK);
                }
            }
        }
        if tag == b'p' && !body.is_empty() {
            redacted.push(("password-message", body.len()));
            let o = out.get_or_insert_with(|| batch.to_vec());
            if let Some(s) = o.get_mut(body) {
                s.fill(MASK);
            }
        }
        at = end;
    }
    out.map(|bytes| Masked { bytes, redacted })
}

/// Where the C string starting at `r.start` ends (its NUL, or `r.end` without one).
fn cstr_end(b: &[u8], r: Range<usize>) -> usize {
    b.get(r.clone())
        .and_then(|s| s.iter().position(|c| *c == 0))
        .map_or(r.end, |p| r.start + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sql` masked, as a string.
    fn masked(sql: &str) -> String {
        let mut b = sql.as_bytes().to_vec();
        mask_sql(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    }

    #[test]
    fn password_literals_are_masked_and_nothing_else() {
        for (input, want) in [
            (
                "ALTER ROLE x PASSWORD 'TopSecret-77'",
                "ALTER ROLE x PASSWORD '************'",
            ),
            (
                "alter user x with encrypted password 'a''b'",
                "alter user x with encrypted password '****'",
            ),
            (
                "CREATE ROLE x LOGIN PASSWORD 'p' VALID UNTIL '2030-01-01'",
                "CREATE ROLE x LOGIN PASSWORD '*' VALID UNTIL '2030-01-01'",
            ),
            (
                "create user x password E'a\\'b'",
                "create user x password E'****'",
            ),
            (
                "create group g password $$s3$$",
                "create group g password $$**$$",
            ),
            (
                "create role r password $tag$a$b$tag$",
                "create role r password $tag$***$tag$",
            ),
            (
                "create role r password U&'d\\0061t'",
                "create role r password U&'*******'",
            ),
            (
                "ALTER ROLE x PASSWORD /* why */ -- not here\n 'pw'",
                "ALTER ROLE x PASSWORD /* why */ -- not here\n '**'",
            ),
            (
                "/* lead */ ALTER /* c */ ROLE x PASSWORD 'pw'",
                "/* lead */ ALTER /* c */ ROLE x PASSWORD '**'",
            ),
            (
                "select 1; alter role a password 'one'; alter role b password 'two'",
                "select 1; alter role a password '***'; alter role b password '***'",
            ),
            ("ALTER ROLE x PASSWORD NULL", "ALTER ROLE x PASSWORD NULL"),
            ("select 'password', 'x'", "select 'password', 'x'"),
            ("select password 'x' from t", "select password 'x' from t"),
            (
                "update t set c = 1 where password = 'x'",
                "update t set c = 1 where password = 'x'",
            ),
            (
                "ALTER ROLE x SET search_path = 'a'; select password 'y'",
                "ALTER ROLE x SET search_path = 'a'; select password 'y'",
            ),
            (
                "alter role \"password\" password 'z'",
                "alter role \"password\" password '*'",
            ),
            (
                "create user mapping for bob server s options (user 'bob', password 'pw')",
                "create user mapping for bob server s options (user 'bob', password '**')",
            ),
            (
                "ALTER ROLE x PASSWORD 'unterminated",
                "ALTER ROLE x PASSWORD '************",
            ),
            ("ALTER ROLE x PASSWORD ''", "ALTER ROLE x PASSWORD ''"),
            // A backslash read both ways: everything either reading calls the literal.
            (
                "ALTER ROLE x PASSWORD 'a\\'; select 1; --'",
                "ALTER ROLE x PASSWORD '*****************'",
            ),
            (
                "select 'x\\''; ALTER ROLE y PASSWORD 'secret'",
                "select 'x\\''; ALTER ROLE y PASSWORD '******'",
            ),
            (
                "ALTER ROLE x PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b'",
                "ALTER ROLE x PASSWORD '*******************************'",
            ),
        ] {
            assert_eq!(masked(input), want, "{input}");
            assert_eq!(masked(want), want, "masking is idempotent: {want}");
        }
    }

    #[test]
    fn blank_statements_are_recognised() {
        for (sql, blank) in [
            ("", true),
            (";", true),
            (" ; ;\n\t", true),
            ("-- nothing\n;", true),
            ("/* a /* nested */ comment */", true),
            ("select 1", false),
            ("; select 1", false),
            ("'x'", false),
        ] {
            assert_eq!(is_blank(sql.as_bytes()), blank, "{sql:?}");
        }
    }

    #[test]
    fn byte_counts_and_frames_keep_their_length() {
        let mut b = b"ALTER ROLE x PASSWORD 'a''b'".to_vec();
        assert_eq!(mask_sql(&mut b), [4]);
        let mut batch = crate::pg::wire::message(b'Q', b"select 1\0");
        batch.extend(crate::pg::wire::message(
            b'Q',
            b"alter role x password 'TopSecret-77'\0",
        ));
        batch.extend(crate::pg::wire::message(
            b'P',
            b"s1\0CREATE ROLE y PASSWORD 'p2'\0\0\0",
        ));
        batch.extend(crate::pg::wire::message(b'p', b"clear-text\0"));
        batch.extend(crate::pg::wire::message(b'S', b""));
        let m = mask_frontend(&batch).expect("secrets found");
        assert_eq!(
            m.redacted,
            [
                ("password-literal", 12),
                ("password-literal", 2),
                ("password-message", 11)
            ]
        );
        let m = m.bytes;
        assert_eq!(m.len(), batch.len());
        let s = String::from_utf8_lossy(&m);
        assert!(!s.contains("TopSecret-77") && !s.contains("p2'") && !s.contains("clear-text"));
        assert!(s.contains("password '************'") && s.contains("PASSWORD '**'"));
        assert_eq!(
            crate::pg::log::statements(&m),
            [
                "select 1",
                "alter role x password '************'",
                "CREATE ROLE y PASSWORD '**'"
            ]
        );
        assert!(mask_frontend(&crate::pg::wire::message(b'Q', b"select 1\0")).is_none());
        assert!(mask_frontend(&[b'Q', 0, 0, 0, 2]).is_none());
        assert!(mask_frontend(&[b'Q', 0xff, 0xff, 0xff, 0xff, b'x']).is_none());
    }

    #[test]
    fn random_bytes_never_panic_the_masker() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const PIECES: &[&[u8]] = &[
            b"alter ",
            b"ROLE ",
            b"password ",
            b"'",
            b"''",
            b"\\",
            b"E'",
            b"U&'",
            b"$$",
            b"$t$",
            b"$1",
            b"--",
            b"\n",
            b"/*",
            b"*/",
            b";",
            b"\"",
            b"x",
            b" ",
            b"\0",
            b"\xff",
        ];
        for _ in 0..1_000_000 {
            let n = (next() % 24) as usize;
            let mut sql = Vec::new();
            for _ in 0..n {
                let r = next();
                if r % 7 == 0 {
                    sql.push((r >> 8) as u8);
                } else {
                    sql.extend_from_slice(PIECES[(r >> 8) as usize % PIECES.len()]);
                }
            }
            let before = sql.len();
            let counts = mask_sql(&mut sql);
            assert_eq!(sql.len(), before);
            assert!(counts.iter().sum::<usize>() <= before);
            let mut batch = crate::pg::wire::message(b'Q', &sql);
            if next() % 3 == 0 {
                batch.truncate((next() as usize) % (batch.len() + 1));
            }
            if let Some(m) = mask_frontend(&batch) {
                assert_eq!(m.bytes.len(), batch.len());
            }
        }
    }
}
