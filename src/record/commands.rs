//! Extraction of the command lines a person typed into an interactive shell,
//! from the raw keystroke stream (client-to-server bytes) of a pty session.
//!
//! The shell's own state is invisible to us, so `LineEditor` emulates a simple
//! readline line editor in emacs mode: printable text is inserted at a cursor,
//! the usual movement and kill keys edit the line, and Enter submits it.
//!
//! This is a best effort with known limits. Some keys have effects that
//! cannot be known from keystrokes alone: Tab (completion), Up/Down and
//! Ctrl-P/Ctrl-N (history), Ctrl-R/Ctrl-S (history search), Ctrl-X prefixes,
//! Ctrl-_ (undo) and Alt-. (last argument). A line that used any of them is
//! flagged `uncertain`; Tab is assumed to complete a word and add one space,
//! and the other keys are assumed to change nothing. Programs that are not a
//! line-editing shell (editors, pagers, password prompts) also produce
//! keystrokes that are not commands, and custom key bindings or vi mode are
//! not emulated. Ctrl-Y yanks only the most recent kill; readline's joining of
//! consecutive kills is not emulated.

/// The largest line kept, in bytes of UTF-8; longer input is dropped.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// The most parameter bytes of an escape sequence that are remembered.
const MAX_PARAM_BYTES: usize = 16;

/// One command line recovered from the keystroke stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtractedCommand {
    /// The text of the line as we believe the shell saw it.
    pub text: String,
    /// False if the session ended before the line was submitted.
    pub complete: bool,
    /// True if the line used keys whose effect we cannot know, or was cut at
    /// the size limit, so `text` may differ from what the shell ran.
    pub uncertain: bool,
}

/// Where the escape-sequence parser is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EscState {
    /// Not inside an escape sequence.
    Ground,
    /// After ESC.
    Escape,
    /// After ESC `[`, collecting parameter and intermediate bytes.
    Csi(Vec<u8>),
    /// After ESC `O`, waiting for the final byte.
    Ss3,
}

/// An editing action decoded from the key stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Insert(char),
    Enter,
    Tab,
    BackwardDelete,
    ForwardDelete,
    Start,
    End,
    Left,
    Right,
    WordLeft,
    WordRight,
    KillToStart,
    KillToEnd,
    KillUnixWord,
    KillWordBackward,
    KillWordForward,
    Yank,
    Transpose,
    Abandon,
    /// A key whose effect we cannot know; the line becomes uncertain.
    Unknowable,
    PasteStart,
    PasteEnd,
    Ignore,
}

/// A streaming emulation of a readline line editor over raw keystrokes.
#[derive(Clone, Debug)]
pub struct LineEditor {
    line: Vec<char>,
    line_bytes: usize,
    cursor: usize,
    uncertain: bool,
    esc: EscState,
    utf8: Vec<u8>,
    after_cr: bool,
    in_paste: bool,
    quoted_insert: bool,
    last_kill: Vec<char>,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self::new()
    }
}

impl LineEditor {
    /// Creates an editor with an empty line.
    pub fn new() -> Self {
        LineEditor {
            line: Vec::new(),
            line_bytes: 0,
            cursor: 0,
            uncertain: false,
            esc: EscState::Ground,
            utf8: Vec::new(),
            after_cr: false,
            in_paste: false,
            quoted_insert: false,
            last_kill: Vec::new(),
        }
    }

    /// Feeds keystroke bytes and returns the lines submitted by them.
    ///
    /// Bytes may be split anywhere, even inside an escape sequence or a
    /// multi-byte character; the parser keeps its state between calls.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ExtractedCommand> {
        let mut out = Vec::new();
        for &b in bytes {
            self.byte(b, &mut out);
        }
        out
    }

    /// Ends the session and returns a partially typed line, if any.
    pub fn finish(&mut self) -> Option<ExtractedCommand> {
        if !self.utf8.is_empty() {
            self.utf8.clear();
            self.insert(char::REPLACEMENT_CHARACTER);
        }
        let text: String = self.line.iter().collect();
        let uncertain = self.uncertain;
        let last_kill = std::mem::take(&mut self.last_kill);
        *self = LineEditor::new();
        self.last_kill = last_kill;
        if text.trim().is_empty() {
            None
        } else {
            Some(ExtractedCommand {
                text,
                complete: false,
                uncertain,
            })
        }
    }

    /// Processes one byte.
    fn byte(&mut self, b: u8, out: &mut Vec<ExtractedCommand>) {
        let after_cr = std::mem::take(&mut self.after_cr);
        if self.quoted_insert && self.esc == EscState::Ground && self.utf8.is_empty() {
            self.quoted_insert = false;
            if b < 0x80 {
                self.insert(char::from(b));
                return;
            }
        }
        // Multi-byte UTF-8 characters are assembled before anything else.
        if !self.utf8.is_empty() {
            if (0x80..=0xBF).contains(&b) {
                self.utf8.push(b);
                if Some(self.utf8.len()) == self.utf8.first().map(|&lead| utf8_len(lead)) {
                    let bytes = std::mem::take(&mut self.utf8);
                    let c = std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.chars().next())
                        .unwrap_or(char::REPLACEMENT_CHARACTER);
                    self.apply(Action::Insert(c), out);
                }
                return;
            }
            // The sequence was cut short; it becomes one replacement
            // character and this byte is processed on its own.
            self.utf8.clear();
            self.apply(Action::Insert(char::REPLACEMENT_CHARACTER), out);
        }
        let action = match std::mem::replace(&mut self.esc, EscState::Ground) {
            EscState::Ground => self.ground(b, after_cr),
            EscState::Escape => self.after_escape(b, after_cr),
            EscState::Csi(mut params) => {
                if (0x20..=0x3F).contains(&b) {
                    if params.len() < MAX_PARAM_BYTES {
                        params.push(b);
                    }
                    self.esc = EscState::Csi(params);
                    Action::Ignore
                } else if (0x40..=0x7E).contains(&b) {
                    csi_action(&params, b)
                } else {
                    // A control or non-ASCII byte aborts the sequence and is
                    // processed normally.
                    self.ground(b, after_cr)
                }
            }
            EscState::Ss3 => match b {
                b'A' | b'B' => Action::Unknowable,
                b'C' => Action::Right,
                b'D' => Action::Left,
                b'H' => Action::Start,
                b'F' => Action::End,
                0x20..=0x7E => Action::Ignore,
                _ => self.ground(b, after_cr),
            },
        };
        self.apply(action, out);
    }

    /// Decodes a byte outside any escape sequence.
    fn ground(&mut self, b: u8, after_cr: bool) -> Action {
        match b {
            0x1b => {
                self.esc = EscState::Escape;
                Action::Ignore
            }
            b'\r' => {
                self.after_cr = true;
                Action::Enter
            }
            b'\n' if after_cr => Action::Ignore,
            b'\n' => Action::Enter,
            b'\t' if self.in_paste => Action::Insert('\t'),
            b'\t' => Action::Tab,
            0x20..=0x7E => Action::Insert(char::from(b)),
            0x80..=0xFF => {
                if utf8_len(b) > 1 {
                    self.utf8.push(b);
                    Action::Ignore
                } else {
                    Action::Insert(char::REPLACEMENT_CHARACTER)
                }
            }
            // Control keys inside a paste are not keystrokes and are dropped.
            _ if self.in_paste => Action::Ignore,
            0x7f | 0x08 => Action::BackwardDelete,
            0x01 => Action::Start,
            0x05 => Action::End,
            0x02 => Action::Left,
            0x06 => Action::Right,
            0x04 => Action::ForwardDelete,
            0x15 => Action::KillToStart,
            0x0b => Action::KillToEnd,
            0x17 => Action::KillUnixWord,
            0x19 => Action::Yank,
            0x14 => Action::Transpose,
            0x03 => Action::Abandon,
            0x16 => {
                self.quoted_insert = true;
                Action::Ignore
            }
            // Ctrl-N, Ctrl-P, Ctrl-R, Ctrl-S, Ctrl-X, Ctrl-O and Ctrl-_.
            0x0e | 0x10 | 0x12 | 0x13 | 0x18 | 0x0f | 0x1f => Action::Unknowable,
            _ => Action::Ignore,
        }
    }

    /// Decodes the byte after ESC.
    fn after_escape(&mut self, b: u8, after_cr: bool) -> Action {
        match b {
            b'[' => {
                self.esc = EscState::Csi(Vec::new());
                Action::Ignore
            }
            b'O' => {
                self.esc = EscState::Ss3;
                Action::Ignore
            }
            0x7f | 0x08 => Action::KillWordBackward,
            b'b' => Action::WordLeft,
            b'f' => Action::WordRight,
            b'd' => Action::KillWordForward,
            b'.' | b'_' | b'<' | b'>' | b'\t' => Action::Unknowable,
            // Other Alt combinations are ignored.
            0x20..=0x7E => Action::Ignore,
            // A lone ESC followed by anything else is dropped.
            _ => self.ground(b, after_cr),
        }
    }

    /// Applies one editing action to the line.
    fn apply(&mut self, action: Action, out: &mut Vec<ExtractedCommand>) {
        match action {
            Action::Insert(c) => self.insert(c),
            Action::Enter => {
                let text: String = self.line.iter().collect();
                if !text.trim().is_empty() {
                    out.push(ExtractedCommand {
                        text,
                        complete: true,
                        uncertain: self.uncertain,
                    });
                }
                self.reset_line();
            }
            Action::Tab => {
                self.uncertain = true;
                let before = self.cursor.checked_sub(1).and_then(|i| self.line.get(i));
                if before.is_some_and(|c| !c.is_whitespace()) {
                    self.insert(' ');
                }
            }
            Action::BackwardDelete => {
                if self.cursor > 0 {
                    self.remove(self.cursor - 1, self.cursor);
                }
            }
            Action::ForwardDelete => {
                if self.cursor < self.line.len() {
                    self.remove(self.cursor, self.cursor + 1);
                }
            }
            Action::Start => self.cursor = 0,
            Action::End => self.cursor = self.line.len(),
            Action::Left => self.cursor = self.cursor.saturating_sub(1),
            Action::Right => self.cursor = (self.cursor + 1).min(self.line.len()),
            Action::WordLeft => self.cursor = self.word_start(),
            Action::WordRight => self.cursor = self.word_end(),
            Action::KillToStart => self.kill(0, self.cursor),
            Action::KillToEnd => self.kill(self.cursor, self.line.len()),
            Action::KillUnixWord => {
                let mut start = self.cursor;
                while start > 0 && self.line[start - 1].is_whitespace() {
                    start -= 1;
                }
                while start > 0 && !self.line[start - 1].is_whitespace() {
                    start -= 1;
                }
                self.kill(start, self.cursor);
            }
            Action::KillWordBackward => self.kill(self.word_start(), self.cursor),
            Action::KillWordForward => self.kill(self.cursor, self.word_end()),
            Action::Yank => {
                let text = self.last_kill.clone();
                for c in text {
                    self.insert(c);
                }
            }
            Action::Transpose => {
                let len = self.line.len();
                if len >= 2 && self.cursor > 0 {
                    let at = self.cursor.min(len - 1);
                    self.line.swap(at - 1, at);
                    self.cursor = at + 1;
                }
            }
            Action::Abandon => self.reset_line(),
            Action::Unknowable => self.uncertain = true,
            Action::PasteStart => self.in_paste = true,
            Action::PasteEnd => self.in_paste = false,
            Action::Ignore => {}
        }
    }

    /// Inserts a character at the cursor unless the line is full.
    fn insert(&mut self, c: char) {
        let n = c.len_utf8();
        if self.line_bytes + n > MAX_LINE_BYTES {
            self.uncertain = true;
            return;
        }
        self.line.insert(self.cursor, c);
        self.line_bytes += n;
        self.cursor += 1;
    }

    /// Removes the characters in `start..end` and returns them.
    fn remove(&mut self, start: usize, end: usize) -> Vec<char> {
        let removed: Vec<char> = self.line.drain(start..end).collect();
        self.line_bytes -= removed.iter().map(|c| c.len_utf8()).sum::<usize>();
        if self.cursor > end {
            self.cursor -= end - start;
        } else if self.cursor > start {
            self.cursor = start;
        }
        removed
    }

    /// Removes `start..end` and remembers it for Ctrl-Y.
    fn kill(&mut self, start: usize, end: usize) {
        if start < end {
            self.last_kill = self.remove(start, end);
        }
    }

    /// Returns where readline's backward-word would move the cursor.
    fn word_start(&self) -> usize {
        let mut i = self.cursor;
        while i > 0 && !self.line[i - 1].is_alphanumeric() {
            i -= 1;
        }
        while i > 0 && self.line[i - 1].is_alphanumeric() {
            i -= 1;
        }
        i
    }

    /// Returns where readline's forward-word would move the cursor.
    fn word_end(&self) -> usize {
        let mut i = self.cursor;
        while i < self.line.len() && !self.line[i].is_alphanumeric() {
            i += 1;
        }
        while i < self.line.len() && self.line[i].is_alphanumeric() {
            i += 1;
        }
        i
    }

    /// Clears the line after it was submitted or abandoned.
    fn reset_line(&mut self) {
        self.line.clear();
        self.line_bytes = 0;
        self.cursor = 0;
        self.uncertain = false;
    }
}

/// Returns the length of the UTF-8 sequence a lead byte starts, or 1 for a
/// byte that cannot start a multi-byte sequence.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// Decodes a complete CSI sequence from its parameters and final byte.
fn csi_action(params: &[u8], last: u8) -> Action {
    // Parameters like "1;5" carry a modifier: 3 is Alt and 5 is Ctrl.
    let modified = matches!(params, b"1;3" | b"1;5" | b"3" | b"5");
    let plain = params.is_empty() || params == b"1";
    match (last, plain, modified) {
        (b'A' | b'B', _, _) => Action::Unknowable,
        (b'C', true, _) => Action::Right,
        (b'D', true, _) => Action::Left,
        (b'C', _, true) => Action::WordRight,
        (b'D', _, true) => Action::WordLeft,
        (b'H', true, _) => Action::Start,
        (b'F', true, _) => Action::End,
        (b'~', _, _) => match params {
            b"1" | b"7" => Action::Start,
            b"4" | b"8" => Action::End,
            b"3" => Action::ForwardDelete,
            b"200" => Action::PasteStart,
            b"201" => Action::PasteEnd,
            _ => Action::Ignore,
        },
        _ => Action::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic xorshift generator for property-style tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Feeds every chunk, then finishes, and returns everything extracted.
    fn run(chunks: &[&[u8]]) -> Vec<ExtractedCommand> {
        let mut ed = LineEditor::new();
        let mut got: Vec<ExtractedCommand> = chunks.iter().flat_map(|c| ed.feed(c)).collect();
        got.extend(ed.finish());
        got
    }

    /// Shorthand for an expected command: (text, complete, uncertain).
    type Want<'a> = (&'a str, bool, bool);

    fn check(chunks: &[&[u8]], want: &[Want<'_>]) {
        let got: Vec<(String, bool, bool)> = run(chunks)
            .into_iter()
            .map(|c| (c.text, c.complete, c.uncertain))
            .collect();
        let want: Vec<(String, bool, bool)> =
            want.iter().map(|&(t, c, u)| (t.to_owned(), c, u)).collect();
        assert_eq!(got, want, "input {chunks:?}");
    }

    #[test]
    fn line_editing_table() {
        let cases: &[(&[&[u8]], &[Want<'_>])] = &[
            (&[b"ls -la\r"], &[("ls -la", true, false)]),
            (&[b"lx\x7fs\r"], &[("ls", true, false)]),
            (&[b"lx\x08s\n"], &[("ls", true, false)]),
            (
                &[b"echo world\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dhello \r"],
                &[("echo hello world", true, false)],
            ),
            (&[b"rm -rf /\x03ls\r"], &[("ls", true, false)]),
            (&[b"cd /tmp\x15pwd\r"], &[("pwd", true, false)]),
            (&[b"git\tst\r"], &[("git st", true, true)]),
            (&[b"git \tst\r"], &[("git st", true, true)]),
            (&[b"a\r\nb\r\n"], &[("a", true, false), ("b", true, false)]),
            (&[b"a\n\nb\r\r"], &[("a", true, false), ("b", true, false)]),
            (&[b"   \r\r\n\n"], &[]),
            (&[b"\x1b", b"[D"], &[]),
            (&[b"ab\x1b", b"[", b"Dc\r"], &[("acb", true, false)]),
            (&[b"ab\x1bO", b"Dc\r"], &[("acb", true, false)]),
            (&[b"bc\x01a\x05d\r"], &[("abcd", true, false)]),
            (&[b"bc\x1b[Ha\x1b[Fd\r"], &[("abcd", true, false)]),
            (&[b"bc\x1b[1~a\x1b[4~d\r"], &[("abcd", true, false)]),
            (&[b"bc\x1bOHa\x1bOFd\r"], &[("abcd", true, false)]),
            (&[b"ac\x02b\x06d\r"], &[("abcd", true, false)]),
            (&[b"ac\x1b[Db\x1b[Cd\r"], &[("abcd", true, false)]),
            (&[b"abxc\x02\x02\x1b[3~\r"], &[("abc", true, false)]),
            (&[b"abxc\x02\x02\x04\r"], &[("abc", true, false)]),
            (&[b"\x04ls\r"], &[("ls", true, false)]),
            (&[b"echo abc\x02\x02\x0b\r"], &[("echo a", true, false)]),
            (&[b"echo abc\x02\x02\x15\r"], &[("bc", true, false)]),
            (&[b"git commit  \x17push\r"], &[("git push", true, false)]),
            (&[b"cat /etc/pa\x17\x17ls\r"], &[("ls", true, false)]),
            (
                &[b"cat /etc/passwd\x1b\x7fhosts\r"],
                &[("cat /etc/hosts", true, false)],
            ),
            (&[b"ls\x0c\r"], &[("ls", true, false)]),
            (
                &[b"\x1b[200~echo a\nls\x1b[201~\r"],
                &[("echo a", true, false), ("ls", true, false)],
            ),
            (&[b"\x1b[200~a\tb\x1b[201~\r"], &[("a\tb", true, false)]),
            (
                &[b"ls\x1b[1;31m\x1b[?25h\x1b[12;40R -l\r"],
                &[("ls -l", true, false)],
            ),
            (&[b"\x1b[A\r"], &[]),
            (&[b"\x1b[Als\r"], &[("ls", true, true)]),
            (&[b"\x10\r", b"ls\r"], &[("ls", true, false)]),
            (&[b"\x12ssh\r"], &[("ssh", true, true)]),
            (&[b"\x1bOBx\r"], &[("x", true, true)]),
            (&[b"ls\x1b[Ax\x03pwd\r"], &[("pwd", true, false)]),
            (
                &["caf\u{e9} \u{20ac}\u{1f600}\r".as_bytes()],
                &[("café €😀", true, false)],
            ),
            (&[b"\xc3", b"\xa9\r"], &[("é", true, false)]),
            (&[b"a\xffb\xc3c\r"], &[("a\u{fffd}b\u{fffd}c", true, false)]),
            (&[b"echo hi"], &[("echo hi", false, false)]),
            (&[b"echo \t"], &[("echo ", false, true)]),
            (&[b"ab\xe2\x82"], &[("ab\u{fffd}", false, false)]),
            (
                &[b"foo bar\x1bb\x1bbX\x1bfY\r"],
                &[("XfooY bar", true, false)],
            ),
            (&[b"foo bar\x01\x1bd\r"], &[(" bar", true, false)]),
            (&[b"foo bar\x1b[1;5DX\r"], &[("foo Xbar", true, false)]),
            (&[b"abc\x15xy\x19\r"], &[("xyabc", true, false)]),
            (&[b"sl\x14\r"], &[("ls", true, false)]),
            (&[b"\x16\x03x\r"], &[("\u{3}x", true, false)]),
            (&[b"x\x1b.\r"], &[("x", true, true)]),
        ];
        for &(chunks, want) in cases {
            check(chunks, want);
        }
    }

    #[test]
    fn uncertainty_resets_after_each_line() {
        check(
            &[b"git\tst\r", b"ls\r"],
            &[("git st", true, true), ("ls", true, false)],
        );
        check(&[b"\t\x03ls\r"], &[("ls", true, false)]);
    }

    #[test]
    fn long_lines_are_capped() {
        let mut ed = LineEditor::new();
        let chunk = vec![b'a'; 10_000];
        for _ in 0..10 {
            assert!(ed.feed(&chunk).is_empty());
        }
        let got = ed.feed(b"\r");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text.len(), MAX_LINE_BYTES);
        assert!(got[0].uncertain);
        // Multi-byte characters never get split at the cap.
        let mut ed = LineEditor::new();
        let chunk = "€".repeat(30_000);
        ed.feed(chunk.as_bytes());
        let got = ed.feed(b"\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text.len(), MAX_LINE_BYTES - MAX_LINE_BYTES % 3);
        assert!(got[0].text.chars().all(|c| c == '€'));
    }

    #[test]
    fn random_bytes_split_anywhere_match_one_feed() {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        let pieces: [&[u8]; 14] = [
            b"ls",
            b"\r",
            b"\n",
            b"\x1b[",
            b"\x1b",
            b"O",
            b"~",
            b"200",
            b"\x7f",
            b"\t",
            "€".as_bytes(),
            b"\x1b[201~",
            b"\x17",
            b";5D",
        ];
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..rng.below(60) {
                if rng.below(3) == 0 {
                    bytes.push(rng.next() as u8);
                } else {
                    bytes.extend_from_slice(pieces[rng.below(pieces.len())]);
                }
            }
            let whole = run(&[&bytes]);
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rng.below(rest.len() + 1));
                chunks.push(chunk);
                rest = tail;
            }
            assert_eq!(run(&chunks), whole, "bytes {bytes:?}");
            for c in &whole {
                assert!(!c.text.trim().is_empty());
                assert!(c.text.len() <= MAX_LINE_BYTES);
            }
        }
    }
}
