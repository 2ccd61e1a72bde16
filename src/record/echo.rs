//! No-echo redaction: keeps what a person types at a password prompt out of the record.
//!
//! The gateway cannot see the target's terminal mode, so it infers it from the two streams of a
//! pty channel. Input is split into lines at Enter (CR, or LF not right after CR). A line is
//! **secret** when either
//!
//! - **the prompt says so**: when its first byte was typed, the last output line (after ANSI
//!   escape sequences are removed and trailing blanks trimmed) ends with `:` or `?` and holds
//!   one of the words `password`, `passwd`, `passphrase`, `pass phrase`, `passcode`, `pin`,
//!   `token` or `secret` (case-insensitive, whole words) — `Password: `, `[sudo] password for
//!   alice: `, `Enter PEM pass phrase:`, `Verifying - Password: `; or
//! - **a prompt came after it began**: while it was being typed the output showed such a
//!   prompt after a line end, before echoing any of it (the first keystrokes were typed
//!   ahead of the prompt), or after echoing all of it (typed, still echoed, ahead of a slow
//!   `sudo`'s prompt: a line echoed in full is judged only at Enter, or once typing paused
//!   for [`HOLD_LIMIT`]); or it was
//!   submitted but its echo had not been seen when such a prompt appeared (a whole line typed
//!   or pasted ahead, which the program then reads as the secret); or
//! - **the target did not echo it**: it has printable characters, no output at all arrived
//!   between its first keystroke and its Enter, and the output that followed did not contain
//!   the typed characters (in order, other output interleaved) before the target ended the
//!   line (a newline in the output), before the next line was typed, or within
//!   [`HOLD_LIMIT`].
//!
//! Until a line is judged, its input and everything recorded after it on the channel are held
//! in memory (at most [`MAX_HELD_BYTES`]); then they are released in order. A secret line's
//! input bytes are replaced by [`Ev::Redacted`] events with the same timing and byte count, and
//! the command the line editor extracted from it is replaced by a redaction entry. Enter itself
//! is kept, so a reviewer sees when the secret was submitted.
//!
//! Where it can be wrong:
//! - A prompt that does not use those words (`Enter code:`) is caught only by the echo test,
//!   and a program that echoes something other than the typed text (`*` per key, as `sudo`
//!   with `pwfeedback`) defeats the echo test; such a line is redacted only if its prompt
//!   matches.
//! - A prompt that uses those words but echoes (`Enter token (visible): `) is redacted anyway.
//! - Full-screen programs (editors, pagers) that neither echo nor end lines can make ordinary
//!   keys look like a secret line; that loses a command from the extracted list, never a
//!   secret.
//! - A secret line's echo, when the terminal still echoed it (typed at once at `openssl
//!   passwd`'s prompt, which it prints before turning echo off; or typed ahead of its
//!   prompt), is masked in the output it is released with: the printable bytes that
//!   continue the typed text exactly, from the first output after the line's keystrokes, read
//!   `*` (same byte count). In a line with editing keys (erase, kill, word erase, or any
//!   other control byte but Tab), whose echo is not the typed text (`\b \b`, `^?`), a
//!   departure once the echo began does not end the masking: every printable byte up to the
//!   output's line end is masked, at most one per typed character plus two per editing key
//!   and a small allowance, so the prompt or output that follows a garbled echo on the same
//!   line can read `*` too. In a line without editing keys a departure ends the masking
//!   there (a redraw by a line editor that rewrites more than was typed stays visible past
//!   the departure), and an echo shown before the line was judged secret (released ahead of
//!   it) is not masked.
//! - A command line whose echo is garbled (a redraw longer than the gap allowance) and which is
//!   followed by a secret prompt is redacted too: a lost command, never a leaked secret.
//! - With `-echoke` a kill echoes `^U` and a line end, which ends the masking: the rest of
//!   such an echoed secret stays visible.
//! - A line echoed in full whose typing paused for [`HOLD_LIMIT`] is judged on its echo
//!   (clear); a secret prompt that appears after the pause does not redact the rest of it.
//! - A line held when the gateway crashes is lost from the recording (at most
//!   [`MAX_HELD_BYTES`], or what [`HOLD_LIMIT`] lets accumulate).

use std::collections::VecDeque;

use super::commands::{ExtractedCommand, LineEditor};

/// The most bytes held back while lines wait for a verdict; beyond it the oldest line is
/// judged on what is known.
pub const MAX_HELD_BYTES: usize = 1 << 20;

/// A submitted line whose echo has not been settled after this many seconds is judged on what
/// is known (no output after Enter counts as no echo).
pub const HOLD_LIMIT: f64 = 2.0;

/// The longest tail of the last output line kept for the prompt test.
const PROMPT_TAIL: usize = 256;

/// Output characters an echo may skip (redraws, completions), plus half the typed length.
const MAX_GAP: usize = 4;

/// The line id of keystrokes that belong to no line (a lone Enter).
const NO_LINE: u64 = u64::MAX;

/// The most typed characters kept per line for the echo test.
const MAX_TYPED: usize = 64 * 1024;

/// An event released in recording order.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev<T> {
    /// Keystrokes as typed.
    Input(Vec<u8>),
    /// Keystrokes of a secret line: how many bytes, never which.
    Redacted(usize),
    /// Output from the target.
    Output(Vec<u8>),
    /// Anything else the channel records (resizes, markers), kept in order.
    Other(T),
    /// A command line the editor extracted.
    Command(ExtractedCommand),
    /// A secret line was entered here (its input byte count, Enter not included).
    RedactedLine(usize),
}

/// A strip of ANSI escape sequences, fed one byte at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Ansi {
    #[default]
    Ground,
    Esc,
    Csi,
    /// After ESC and intermediate bytes (`ESC ( B`, `ESC # 8`): until the final byte.
    EscInter,
    /// OSC, DCS, APC, PM, SOS: until BEL or ST.
    Str,
    StrEsc,
}

impl Ansi {
    /// Returns the byte if it is text (printable or a control byte), None inside a sequence.
    fn feed(&mut self, b: u8) -> Option<u8> {
        match *self {
            Ansi::Ground => {
                if b == 0x1b {
                    *self = Ansi::Esc;
                    None
                } else {
                    Some(b)
                }
            }
            Ansi::Esc => {
                *self = match b {
                    b'[' => Ansi::Csi,
                    b']' | b'P' | b'_' | b'^' | b'X' => Ansi::Str,
                    0x1b => Ansi::Esc,
                    // A two-byte sequence (ESC c, ESC O x is close enough: x is then dropped
                    // as the final byte of this one).
                    b'O' => Ansi::Csi,
                    0x20..=0x2f => Ansi::EscInter,
                    _ => Ansi::Ground,
                };
                None
            }
            Ansi::EscInter => {
                if !(0x20..=0x2f).contains(&b) {
                    *self = if b == 0x1b { Ansi::Esc } else { Ansi::Ground };
                }
                None
            }
            Ansi::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    *self = Ansi::Ground;
                } else if b == 0x1b {
                    *self = Ansi::Esc;
                } else if !(0x20..=0x3f).contains(&b) {
                    // A stray control byte aborts the sequence.
                    *self = Ansi::Ground;
                    return Some(b);
                }
                None
            }
            Ansi::Str => {
                if b == 0x07 {
                    *self = Ansi::Ground;
                } else if b == 0x1b {
                    *self = Ansi::StrEsc;
                }
                None
            }
            Ansi::StrEsc => {
                *self = if b == b'\\' { Ansi::Ground } else { Ansi::Str };
                None
            }
        }
    }
}

fn printable(b: u8) -> bool {
    b >= 0x20 && b != 0x7f
}

/// Whether an output line reads as a prompt for a secret (see the module docs).
pub fn is_secret_prompt(line: &str) -> bool {
    let t = line.trim_end();
    if !(t.ends_with(':') || t.ends_with('?')) {
        return false;
    }
    let lower = t.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    const WORDS: [&str; 7] = [
        "password",
        "passwd",
        "passphrase",
        "passcode",
        "pin",
        "token",
        "secret",
    ];
    words.iter().any(|w| WORDS.contains(w))
        || words.windows(2).any(|p| p[0] == "pass" && p[1] == "phrase")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Clear,
    Secret,
}

#[derive(Debug)]
struct Line {
    id: u64,
    /// The prompt test passed when the line began.
    prompt: bool,
    /// Printable typed bytes, escape sequences removed.
    typed: Vec<u8>,
    /// How many of `typed` the output has shown, in order.
    matched: usize,
    /// No output arrived between the first keystroke and Enter.
    quiet: bool,
    /// When Enter was typed, if it was.
    entered: Option<f64>,
    /// Output arrived after Enter.
    out_after_enter: bool,
    /// An older line was still waiting for its echo when this one began (typed ahead or
    /// pasted): output can be that line's, so only a full echo or time decides this one.
    queued: bool,
    /// Output characters skipped since the echo match began.
    gap: usize,
    /// Input bytes of the line, Enter not included.
    bytes: usize,
    verdict: Option<Verdict>,
    /// Escape-sequence state of the typed stream.
    ansi: Ansi,
    /// The output ended a line since this line's first keystroke.
    out_newline: bool,
    /// Printable output arrived after the whole typed text was echoed, while the line was
    /// still being typed: a prompt seen now is not the echo of what was typed.
    beyond_echo: bool,
    /// When the line's last keystroke was typed.
    last_key: f64,
    /// Editing keys typed (erase, kill, word erase, any control byte but Tab): the echo of
    /// such a line is not the typed text.
    edits: usize,
}

impl Line {
    /// The verdict on what is known, when no more evidence will come in time.
    fn judge_now(&self) -> Verdict {
        if self.prompt || (self.quiet && !self.typed.is_empty() && self.matched < self.typed.len())
        {
            Verdict::Secret
        } else {
            Verdict::Clear
        }
    }

    /// The verdict once the output showed every typed character.
    fn echoed(&self) -> Verdict {
        if self.prompt {
            Verdict::Secret
        } else {
            Verdict::Clear
        }
    }
}

#[derive(Debug)]
enum Held<T> {
    /// Keystrokes of a line.
    Input {
        line: u64,
        bytes: Vec<u8>,
    },
    /// The end of a line: its Enter byte (none when the channel closed mid-line) and the
    /// commands the editor extracted from it.
    End {
        line: u64,
        bytes: Vec<u8>,
        commands: Vec<ExtractedCommand>,
    },
    Output(Vec<u8>),
    /// Anything else, with the bytes it stands for (counted towards [`MAX_HELD_BYTES`]).
    Other(T, usize),
}

impl<T> Held<T> {
    fn line(&self) -> Option<u64> {
        match self {
            Held::Input { line, .. } | Held::End { line, .. } => Some(*line),
            Held::Output(_) | Held::Other(..) => None,
        }
    }

    fn size(&self) -> usize {
        match self {
            Held::Input { bytes, .. } | Held::End { bytes, .. } | Held::Output(bytes) => {
                bytes.len()
            }
            Held::Other(_, n) => *n,
        }
    }
}

/// The per-channel redaction state machine. Feed it the channel's input and output in the
/// order they were recorded; it returns what to record, in that order, with the times given.
#[derive(Debug)]
pub struct EchoGuard<T> {
    editor: LineEditor,
    /// False: only extract commands, redact nothing (the target opted out).
    redact: bool,
    /// The last output line, escape sequences removed.
    tail: String,
    out_ansi: Ansi,
    /// Lines whose end has not been released, oldest first; the last may still be typed.
    lines: VecDeque<Line>,
    /// The last line in `lines` is still being typed.
    line_open: bool,
    /// Events waiting behind an undecided line.
    held: VecDeque<(f64, Held<T>)>,
    held_bytes: usize,
    after_cr: bool,
    next_id: u64,
    /// The echo of a secret line being masked in the output released after it.
    mask: Option<Mask>,
}

/// A secret line's typed text, to be masked where the terminal echoed it anyway (typed while
/// echo was still on, as `openssl passwd` prints its prompt before it turns echo off).
#[derive(Debug)]
struct Mask {
    line: u64,
    /// What was typed so far (refreshed as more of the line is released).
    expect: Vec<u8>,
    /// How much of it the output has echoed.
    pos: usize,
    ansi: Ansi,
    /// The echo departed from the typed text, or the line ended: nothing more is masked.
    done: bool,
    /// Editing keys in the line (see [`Line::edits`]).
    edits: usize,
    /// How many bytes were masked since the echo departed from the typed text of a line with
    /// editing keys: from there every printable byte is masked up to the line end.
    loose: Option<usize>,
}

impl Mask {
    /// Replaces, in `out`, the printable bytes that continue the echo of the typed text with
    /// `*`. The first printable byte that is not the next typed one ends the masking (an echo
    /// is exact), and so does a line end once the echo began; output beyond what was typed
    /// so far waits for more keystrokes of the line.
    ///
    /// A line with editing keys echoes them as something else (`\b \b` for an erase, a
    /// series of them for a kill, `^?` with `echoctl`), so once its echo began, a departure
    /// does not end the masking: every printable byte up to the output's line end is masked,
    /// at most one per typed character plus two per editing key and [`MAX_GAP`].
    fn apply(&mut self, out: &mut [u8]) {
        for b in out.iter_mut() {
            if self.done {
                return;
            }
            if let Some(n) = self.loose {
                if n >= self.loose_budget() {
                    return;
                }
                let Some(c) = self.ansi.feed(*b) else {
                    continue;
                };
                if c == b'\r' || c == b'\n' {
                    self.done = true;
                    return;
                }
                if printable(c) {
                    *b = b'*';
                    self.loose = Some(n + 1);
                }
                continue;
            }
            if self.pos >= self.expect.len() {
                return;
            }
            let Some(c) = self.ansi.feed(*b) else {
                continue;
            };
            if (c == b'\r' || c == b'\n') && self.pos > 0 {
                self.done = true;
                return;
            }
            if !printable(c) {
                continue;
            }
            if self.expect[self.pos] != c {
                if self.edits > 0 && self.pos > 0 {
                    *b = b'*';
                    self.loose = Some(1);
                    continue;
                }
                self.done = true;
                return;
            }
            *b = b'*';
            self.pos += 1;
        }
    }

    /// The most bytes masked after a departure (see [`Mask::apply`]): every typed character
    /// may be echoed, then erased (a kill echoes a blank per character it erases), plus two
    /// per editing key (`^?`).
    fn loose_budget(&self) -> usize {
        self.expect
            .len()
            .saturating_mul(2)
            .saturating_add(self.edits.saturating_mul(2))
            .saturating_add(MAX_GAP)
    }
}

impl<T> EchoGuard<T> {
    pub fn new(redact: bool) -> Self {
        EchoGuard {
            editor: LineEditor::new(),
            redact,
            tail: String::new(),
            out_ansi: Ansi::Ground,
            lines: VecDeque::new(),
            line_open: false,
            held: VecDeque::new(),
            held_bytes: 0,
            after_cr: false,
            next_id: 0,
            mask: None,
        }
    }

    /// How many bytes are held back waiting for a verdict.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Keystrokes at time `t` (seconds since the channel started).
    pub fn input(&mut self, t: f64, data: &[u8], out: &mut Vec<(f64, Ev<T>)>) {
        let mut start = 0;
        for (i, &b) in data.iter().enumerate() {
            let submits = b == b'\r' || (b == b'\n' && !self.after_cr);
            let lf_of_crlf = b == b'\n' && self.after_cr;
            self.after_cr = b == b'\r';
            if submits || lf_of_crlf {
                if start < i {
                    self.typed(t, &data[start..i], out);
                }
                self.enter(t, &data[i..=i], submits, out);
                start = i + 1;
            }
        }
        if start < data.len() {
            self.typed(t, &data[start..], out);
        }
        self.bound(out);
    }

    /// Output from the target at time `t`.
    pub fn output(&mut self, t: f64, data: &[u8], out: &mut Vec<(f64, Ev<T>)>) {
        for &b in data {
            if let Some(c) = self.out_ansi.feed(b) {
                self.observe(c);
            }
        }
        if self.redact && is_secret_prompt(&self.tail) {
            self.prompt_appeared();
        }
        self.push(t, Held::Output(data.to_vec()), out);
        self.bound(out);
    }

    /// A secret prompt ends the output now: undecided lines it can be reading become secret
    /// (see the module docs, "a prompt came after it began").
    fn prompt_appeared(&mut self) {
        let open = self.line_open;
        let n = self.lines.len();
        for (i, l) in self.lines.iter_mut().enumerate() {
            if l.verdict.is_some() || l.typed.is_empty() {
                continue;
            }
            let typing = open && i + 1 == n;
            if typing {
                // The prompt must follow a line end or none of the typed characters' echo:
                // the echo of the line being typed (`echo Password:`) is not a prompt.
                if l.out_newline || l.matched == 0 || l.beyond_echo {
                    l.prompt = true;
                }
            } else if l.entered.is_some() && l.matched < l.typed.len() {
                l.verdict = Some(Verdict::Secret);
            }
        }
    }

    /// Anything else recorded on the channel (standing for `size` bytes), kept in order with
    /// the rest; it counts towards the held bound like output does.
    pub fn other(&mut self, t: f64, item: T, size: usize, out: &mut Vec<(f64, Ev<T>)>) {
        self.push(t, Held::Other(item, size.max(1)), out);
        self.bound(out);
    }

    /// Judges lines whose Enter is older than [`HOLD_LIMIT`] at time `now`.
    pub fn tick(&mut self, now: f64, out: &mut Vec<(f64, Ev<T>)>) {
        let mut changed = false;
        for l in self.lines.iter_mut() {
            if l.verdict.is_none() && l.entered.is_some_and(|e| now - e >= HOLD_LIMIT) {
                l.verdict = Some(l.judge_now());
                changed = true;
            }
            // A line echoed in full whose typing paused (a full-screen program without
            // Enter) is judged on its echo.
            if l.verdict.is_none()
                && l.entered.is_none()
                && !l.typed.is_empty()
                && l.matched == l.typed.len()
                && now - l.last_key >= HOLD_LIMIT
            {
                l.verdict = Some(l.echoed());
                changed = true;
            }
        }
        if changed {
            self.release(out);
        }
    }

    /// The channel ends at `t`: every line is judged and everything is released; a partly
    /// typed line becomes an incomplete command (or its redaction).
    pub fn finish(&mut self, t: f64, out: &mut Vec<(f64, Ev<T>)>) {
        let partial: Vec<ExtractedCommand> = self.editor.finish().into_iter().collect();
        if self.line_open {
            self.line_open = false;
            if let Some(id) = self.lines.back().map(|l| l.id) {
                self.held.push_back((
                    t,
                    Held::End {
                        line: id,
                        bytes: Vec::new(),
                        commands: partial,
                    },
                ));
            }
        } else {
            // Nothing was typed since the last Enter that the editor kept.
            out.extend(partial.into_iter().map(|c| (t, Ev::Command(c))));
        }
        for l in self.lines.iter_mut() {
            if l.verdict.is_none() {
                l.verdict = Some(l.judge_now());
            }
        }
        self.release(out);
    }

    /// Bytes of the line being typed (no Enter among them).
    fn typed(&mut self, t: f64, bytes: &[u8], out: &mut Vec<(f64, Ev<T>)>) {
        if !self.line_open {
            self.line_open = true;
            let prompt = self.redact && is_secret_prompt(&self.tail);
            let queued = self.lines.iter().any(|l| l.verdict.is_none());
            // An older line still waiting for its echo after output followed its Enter gets
            // no evidence that could be told apart from this line's echo: judge it now.
            for l in self.lines.iter_mut() {
                if l.verdict.is_none() && l.out_after_enter {
                    l.verdict = Some(l.judge_now());
                }
            }
            self.lines.push_back(Line {
                id: self.next_id,
                prompt,
                typed: Vec::new(),
                matched: 0,
                quiet: true,
                entered: None,
                out_after_enter: false,
                queued,
                gap: 0,
                bytes: 0,
                verdict: (!self.redact).then_some(Verdict::Clear),
                ansi: Ansi::Ground,
                out_newline: false,
                beyond_echo: false,
                last_key: t,
                edits: 0,
            });
            self.next_id += 1;
            self.release(out);
        }
        // Commands come only at Enter, so nothing is extracted from bytes without one.
        let _ = self.editor.feed(bytes);
        let Some(l) = self.lines.back_mut() else {
            return;
        };
        l.bytes += bytes.len();
        l.last_key = t;
        for &b in bytes {
            if let Some(c) = l.ansi.feed(b) {
                if printable(c) {
                    if l.typed.len() < MAX_TYPED {
                        l.typed.push(c);
                    }
                } else if c != b'\t' {
                    l.edits = l.edits.saturating_add(1);
                }
            }
        }
        let line = l.id;
        self.push(
            t,
            Held::Input {
                line,
                bytes: bytes.to_vec(),
            },
            out,
        );
    }

    /// An Enter byte, or the LF of a CR LF (`submits` false).
    fn enter(&mut self, t: f64, byte: &[u8], submits: bool, out: &mut Vec<(f64, Ev<T>)>) {
        let commands = self.editor.feed(byte);
        if submits && self.line_open {
            self.line_open = false;
            if let Some(l) = self.lines.back_mut() {
                l.entered = Some(t);
                if l.verdict.is_none() && l.matched == l.typed.len() {
                    l.verdict = Some(l.echoed());
                }
                let line = l.id;
                self.push(
                    t,
                    Held::End {
                        line,
                        bytes: byte.to_vec(),
                        commands,
                    },
                    out,
                );
                return;
            }
        }
        // Enter on an empty line, or the LF of CR LF: nothing secret in it.
        self.push(
            t,
            Held::End {
                line: NO_LINE,
                bytes: byte.to_vec(),
                commands,
            },
            out,
        );
    }

    /// Output text byte `c` (escape sequences removed): the prompt tail, and evidence for the
    /// oldest undecided line.
    fn observe(&mut self, c: u8) {
        match c {
            b'\n' | b'\r' => {
                self.tail.clear();
                if c == b'\n' && self.line_open {
                    if let Some(l) = self.lines.back_mut() {
                        l.out_newline = true;
                    }
                }
            }
            0x08 => {
                self.tail.pop();
            }
            _ if printable(c) => {
                if self.tail.len() >= PROMPT_TAIL {
                    let cut = self.tail.char_indices().nth(1).map_or(0, |(i, _)| i);
                    self.tail.drain(..cut);
                }
                // Bytes of a multi-byte character go in as Latin-1: the prompt test only
                // looks for ASCII words.
                self.tail.push(char::from(c));
            }
            _ => {}
        }
        let Some(l) = self.lines.iter_mut().find(|l| l.verdict.is_none()) else {
            return;
        };
        if l.entered.is_none() {
            l.quiet = false;
        } else {
            l.out_after_enter = true;
        }
        if !printable(c) {
            if c == b'\n' && l.entered.is_some() && !l.queued {
                l.verdict = Some(l.judge_now());
            }
            return;
        }
        if l.matched < l.typed.len() && l.typed[l.matched] == c {
            l.matched += 1;
            // A line still being typed waits for Enter (or a pause, see `tick`): a prompt
            // can still come after its echo (typed ahead of a slow `sudo`).
            if l.matched == l.typed.len() && l.entered.is_some() {
                l.verdict = Some(l.echoed());
            }
        } else if l.matched > 0 {
            if l.matched == l.typed.len() && l.entered.is_none() {
                l.beyond_echo = true;
            }
            // An echo may be broken up by a redraw or a completion, but not by much: else
            // the characters of a long output would pass for an echo of anything.
            l.gap += 1;
            if l.gap > MAX_GAP + l.typed.len() / 2 {
                l.gap = 0;
                l.matched = usize::from(l.typed.first() == Some(&c));
            }
        }
    }

    /// Emits `h` now if nothing is held and it waits for no verdict, else holds it; then
    /// releases whatever verdicts allow.
    fn push(&mut self, t: f64, h: Held<T>, out: &mut Vec<(f64, Ev<T>)>) {
        self.release(out);
        let blocked = h.line().is_some_and(|id| self.verdict(id).is_none());
        if self.held.is_empty() && !blocked {
            self.emit(t, h, out);
        } else {
            self.held_bytes += h.size();
            self.held.push_back((t, h));
        }
    }

    fn verdict(&self, id: u64) -> Option<Verdict> {
        if id == NO_LINE {
            return Some(Verdict::Clear);
        }
        self.lines
            .iter()
            .find(|l| l.id == id)
            .and_then(|l| l.verdict)
    }

    /// Releases held events up to the first one whose line is undecided.
    fn release(&mut self, out: &mut Vec<(f64, Ev<T>)>) {
        while let Some((_, front)) = self.held.front() {
            if front.line().is_some_and(|id| self.verdict(id).is_none()) {
                break;
            }
            let Some((t, h)) = self.held.pop_front() else {
                break;
            };
            self.held_bytes = self.held_bytes.saturating_sub(h.size());
            self.emit(t, h, out);
        }
    }

    /// Turns one event into what is recorded, by its line's verdict.
    fn emit(&mut self, t: f64, h: Held<T>, out: &mut Vec<(f64, Ev<T>)>) {
        match h {
            Held::Output(mut b) => {
                if let Some(m) = &mut self.mask {
                    m.apply(&mut b);
                }
                if !b.is_empty() {
                    out.push((t, Ev::Output(b)));
                }
            }
            Held::Other(x, _) => out.push((t, Ev::Other(x))),
            Held::Input { line, bytes } => match self.verdict(line) {
                Some(Verdict::Secret) => {
                    let (typed, edits) = self
                        .lines
                        .iter()
                        .find(|l| l.id == line)
                        .map(|l| (l.typed.clone(), l.edits))
                        .unwrap_or_default();
                    match &mut self.mask {
                        // More keystrokes of the line being masked: the echo goes on.
                        Some(m) if m.line == line => {
                            if typed.len() > m.expect.len() {
                                m.expect = typed;
                            }
                            m.edits = m.edits.max(edits);
                        }
                        _ => {
                            self.mask = Some(Mask {
                                line,
                                expect: typed,
                                pos: 0,
                                ansi: Ansi::Ground,
                                done: false,
                                edits,
                                loose: None,
                            })
                        }
                    }
                    out.push((t, Ev::Redacted(bytes.len())))
                }
                _ => {
                    self.mask = None;
                    out.push((t, Ev::Input(bytes)))
                }
            },
            Held::End {
                line,
                bytes,
                commands,
            } => {
                let verdict = self.verdict(line);
                if !bytes.is_empty() {
                    out.push((t, Ev::Input(bytes)));
                }
                let pos = self.lines.iter().position(|l| l.id == line);
                let removed = pos.and_then(|i| self.lines.remove(i));
                match (verdict, removed) {
                    (Some(Verdict::Secret), Some(l)) => out.push((t, Ev::RedactedLine(l.bytes))),
                    _ => out.extend(commands.into_iter().map(|c| (t, Ev::Command(c)))),
                }
            }
        }
    }

    /// Keeps the held bytes bounded: the oldest undecided line is judged on what is known.
    fn bound(&mut self, out: &mut Vec<(f64, Ev<T>)>) {
        while self.held_bytes > MAX_HELD_BYTES {
            let Some(l) = self.lines.iter_mut().find(|l| l.verdict.is_none()) else {
                break;
            };
            l.verdict = Some(l.judge_now());
            self.release(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a terminal conversation.
    enum S<'a> {
        In(&'a [u8]),
        Out(&'a [u8]),
        Tick(f64),
    }
    use S::{In, Out, Tick};

    /// Runs the steps one per 10 ms and finishes.
    fn run(redact: bool, steps: &[S<'_>]) -> Vec<(f64, Ev<()>)> {
        let mut g = EchoGuard::<()>::new(redact);
        let mut out = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let t = i as f64 * 0.01;
            match s {
                In(b) => g.input(t, b, &mut out),
                Out(b) => g.output(t, b, &mut out),
                Tick(at) => g.tick(*at, &mut out),
            }
        }
        g.finish(steps.len() as f64 * 0.01, &mut out);
        assert_eq!(g.held_bytes(), 0);
        out
    }

    fn commands(evs: &[(f64, Ev<()>)]) -> Vec<String> {
        evs.iter()
            .filter_map(|(_, e)| match e {
                Ev::Command(c) => Some(c.text.clone()),
                Ev::RedactedLine(n) => Some(format!("<redacted {n}>")),
                _ => None,
            })
            .collect()
    }

    fn input_text(evs: &[(f64, Ev<()>)]) -> String {
        let mut s = String::new();
        for (_, e) in evs {
            match e {
                Ev::Input(b) => s.push_str(&String::from_utf8_lossy(b)),
                Ev::Redacted(n) => s.push_str(&format!("<{n}>")),
                _ => {}
            }
        }
        s
    }

    #[test]
    fn other_events_count_towards_the_held_bound() {
        let mut g = EchoGuard::<u32>::new(true);
        let mut out = Vec::new();
        // A prompt, a keystroke the target does not echo: the line is held, undecided.
        g.output(0.0, b"Password: ", &mut out);
        g.input(0.1, b"s", &mut out);
        for i in 0..10_000u32 {
            g.other(0.2, i, 4096, &mut out);
            assert!(
                g.held_bytes() <= MAX_HELD_BYTES + 4096,
                "{}",
                g.held_bytes()
            );
        }
        assert!(out.iter().any(|(_, e)| matches!(e, Ev::Other(_))));
    }

    #[test]
    fn escape_sequences_with_intermediates_are_not_text() {
        let mut a = Ansi::default();
        let text: Vec<u8> = b"\x1b(Bab\x1b#8c\x1b[1;31md\x1b]0;t\x07e\x1b)0f"
            .iter()
            .filter_map(|&b| a.feed(b))
            .collect();
        assert_eq!(text, b"abcdef");
    }

    #[test]
    fn echoed_typing_is_a_command() {
        let evs = run(
            true,
            &[
                Out(b"$ "),
                In(b"l"),
                Out(b"l"),
                In(b"s"),
                Out(b"s"),
                In(b"\r"),
                Out(b"\r\nfile\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["ls"]);
        assert_eq!(input_text(&evs), "ls\r");
    }

    #[test]
    fn scripted_and_pasted_lines_are_commands() {
        let evs = run(
            true,
            &[
                Out(b"$ "),
                In(b"echo a\rls -l\r"),
                Out(b"echo a\r\n"),
                Out(b"a\r\n$ "),
                Out(b"ls -l\r\nf\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["echo a", "ls -l"]);
        // Readline redraws and escape sequences between echoed characters still count.
        let evs = run(
            true,
            &[
                Out(b"\x1b[01;32mroot@h\x1b[00m:~# "),
                In(b"echo world\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dhello \r"),
                Out(b"echo world\x08\x08\x08\x08\x08\x1b[1@h\x1b[1@e\x1b[1@llo \r\n"),
            ],
        );
        assert_eq!(commands(&evs), ["echo hello world"]);
    }

    #[test]
    fn a_prompt_that_comes_after_the_first_keystrokes_redacts_the_line() {
        // Typed ahead: "hun" before sudo's prompt, "ter2" after it; output came in between,
        // so the echo test alone would call the line echoed-or-not-quiet and keep it.
        let evs = run(
            true,
            &[
                Out(b"$ "),
                In(b"sudo -k id\r"),
                In(b"hun"),
                Out(b"sudo -k id\r\n"),
                Out(b"[sudo] password for alice: "),
                In(b"ter2\r"),
                Out(b"\r\n"),
                Out(b"uid=0(root)\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["sudo -k id", "<redacted 7>"]);
        assert_eq!(input_text(&evs), "sudo -k id\r<3><4>\r");
        // The whole secret submitted before the prompt appeared.
        let evs = run(
            true,
            &[
                Out(b"$ "),
                In(b"sudo -k id\r"),
                In(b"hun"),
                Out(b"sudo -k id\r\n"),
                In(b"ter2\r"),
                Out(b"[sudo] password for alice: "),
                Out(b"\r\nuid=0(root)\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["sudo -k id", "<redacted 7>"]);
        assert!(!input_text(&evs).contains("hun"), "{}", input_text(&evs));
        // A command that prints a prompt-like text is still a command: its own echo is not a
        // prompt that came after it.
        let evs = run(
            true,
            &[
                Out(b"$ "),
                In(b"echo Password:"),
                Out(b"echo Password:"),
                In(b"\r"),
                Out(b"\r\nPassword:\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["echo Password:"]);
    }

    #[test]
    fn a_secret_prompt_redacts_the_line() {
        for prompt in [
            &b"Password: "[..],
            b"[sudo] password for alice: ",
            b"Enter PEM pass phrase:",
            b"Verifying - Password: ",
            b"\x1b[1mEnter passphrase for key '/root/.ssh/id':\x1b[0m ",
            b"PIN? ",
        ] {
            let evs = run(
                true,
                &[
                    Out(b"$ "),
                    In(b"sudo -k id\r"),
                    Out(b"sudo -k id\r\n"),
                    Out(prompt),
                    In(b"h"),
                    In(b"unter2"),
                    In(b"\r"),
                    Out(b"\r\n"),
                    Out(b"uid=0(root)\r\n$ "),
                ],
            );
            assert_eq!(commands(&evs), ["sudo -k id", "<redacted 7>"], "{prompt:?}");
            assert_eq!(input_text(&evs), "sudo -k id\r<1><6>\r");
        }
    }

    #[test]
    fn input_the_target_did_not_echo_is_redacted_without_a_prompt_word() {
        // `read -s` with a prompt the words miss; the shell prompt follows with no newline.
        let evs = run(
            true,
            &[
                Out(b"Enter code> "),
                In(b"s3cr"),
                In(b"et\r"),
                Out(b"$ "),
                In(b"ls\r"),
                Out(b"ls\r\nf\r\n$ "),
            ],
        );
        assert_eq!(commands(&evs), ["<redacted 6>", "ls"]);
        assert_eq!(input_text(&evs), "<4><2>\rls\r");
        // Nothing at all comes back: judged after HOLD_LIMIT.
        let evs = run(true, &[Out(b"> "), In(b"abc\r"), Tick(HOLD_LIMIT + 1.0)]);
        assert_eq!(commands(&evs), ["<redacted 3>"]);
    }

    #[test]
    fn feedback_stars_do_not_hide_a_prompted_secret() {
        let evs = run(
            true,
            &[
                Out(b"[sudo] password for bob: "),
                In(b"p"),
                Out(b"*"),
                In(b"w"),
                Out(b"*"),
                In(b"\r"),
                Out(b"\r\n"),
            ],
        );
        assert_eq!(commands(&evs), ["<redacted 2>"]);
        assert!(!input_text(&evs).contains('p'));
    }

    #[test]
    fn a_secret_the_terminal_still_echoed_is_masked_in_the_output() {
        // `openssl passwd` prints its prompt, then turns echo off: a secret typed at once is
        // echoed by the terminal before echo is off.
        let evs = run(
            true,
            &[
                S::Out(b"Password: "),
                S::In(b"Openssl-Pw-1\r"),
                S::Out(b"Openssl-Pw-1\r\nVerifying - Password: "),
                S::In(b"Openssl-Pw-1\r"),
                S::Out(b"\r\n$6$salt$hash\r\nbg$ "),
            ],
        );
        let text = output_text(&evs);
        assert!(!text.contains("Openssl"), "{text}");
        assert!(
            text.contains("************\r\nVerifying - Password: "),
            "{text}"
        );
        assert!(
            text.contains("$6$salt$hash"),
            "output after the echo is untouched: {text}"
        );
        assert!(
            !input_text(&evs).contains("Openssl"),
            "typed secrets are redacted: {evs:?}"
        );
        // Typed one key at a time, each key echoed before the next.
        let mut steps = vec![S::Out(b"Password: ")];
        let keys: Vec<[u8; 1]> = b"Openssl-Pw-1".iter().map(|b| [*b]).collect();
        for k in &keys {
            steps.push(S::In(k));
            steps.push(S::Out(k));
        }
        steps.push(S::In(b"\r"));
        steps.push(S::Out(b"\r\nbg$ "));
        let evs = run(true, &steps);
        let text = output_text(&evs);
        assert!(text.contains("Password: ************\r\nbg$ "), "{text}");
        // An ordinary command's echo is never masked.
        let evs = run(
            true,
            &[S::Out(b"bg$ "), S::In(b"ls\r"), S::Out(b"ls\r\nfile\r\n")],
        );
        assert!(evs
            .iter()
            .any(|(_, e)| matches!(e, Ev::Output(b) if b.starts_with(b"ls\r\n"))));
    }

    fn output_text(evs: &[(f64, Ev<()>)]) -> String {
        let output: Vec<u8> = evs
            .iter()
            .filter_map(|(_, e)| match e {
                Ev::Output(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        String::from_utf8_lossy(&output).into_owned()
    }

    #[test]
    fn an_echoed_secret_with_editing_keys_is_masked_to_the_line_end() {
        // Erase (ECHOE: `\b \b`), kill (one `\b \b` per character), echoctl (`^?`), and a
        // word erase: each typed at once at `openssl passwd`'s prompt, echoed before echo is
        // off.
        // A kill that erases more characters than the real secret has.
        let long_kill_typed = b"a-long-wrong-guess-typed\x15Kill-Pw-9\r".to_vec();
        let mut long_kill_echo = b"a-long-wrong-guess-typed".to_vec();
        for _ in 0..24 {
            long_kill_echo.extend_from_slice(b"\x08 \x08");
        }
        long_kill_echo.extend_from_slice(b"Kill-Pw-9\r\n");
        let cases: [(&[u8], &[u8]); 5] = [
            (&long_kill_typed, &long_kill_echo),
            (b"Openx\x7fssl-Pw\r", b"Openx\x08 \x08ssl-Pw\r\n"),
            (
                b"wrong\x15Kill-Pw-9\r",
                b"wrong\x08 \x08\x08 \x08\x08 \x08\x08 \x08\x08 \x08Kill-Pw-9\r\n",
            ),
            (b"Ctlx\x7fPw-7\r", b"Ctlx^?Pw-7\r\n"),
            (
                b"Word first\x17Pw-8\r",
                b"Word first\x08 \x08\x08 \x08\x08 \x08\x08 \x08\x08 \x08Pw-8\r\n",
            ),
        ];
        for (typed, echo) in cases {
            let mut echoed = echo.to_vec();
            echoed.extend_from_slice(b"Verifying - Password: ");
            let evs = run(
                true,
                &[
                    S::Out(b"Password: "),
                    S::In(typed),
                    S::Out(&echoed),
                    S::In(b"x\r"),
                    S::Out(b"\r\n$6$salt$hash\r\nbg$ "),
                ],
            );
            let text = output_text(&evs);
            for secret in ["Pw", "ssl", "Kill", "Open", "wrong", "first", "Ctl", "Word"] {
                assert!(!text.contains(secret), "{secret} in {text:?}");
            }
            assert!(
                text.contains("\r\nVerifying - Password: "),
                "the next prompt is kept: {text:?}"
            );
            assert!(text.contains("$6$salt$hash"), "{text:?}");
        }
        // Without editing keys a departure still ends the masking: a prompt printed after a
        // partial echo (typed ahead of `sudo`'s prompt) stays readable.
        let evs = run(
            true,
            &[
                S::Out(b"bg$ "),
                S::In(b"sudo true\r"),
                S::Out(b"sudo true\r\n"),
                S::In(b"Ahead"),
                S::Out(b"Ahead[sudo] password for alice: "),
                S::In(b"-Pw\r"),
                S::Out(b"\r\nbg$ "),
            ],
        );
        let text = output_text(&evs);
        assert!(!text.contains("Ahead"), "{text:?}");
        assert!(
            text.contains("*****[sudo] password for alice: "),
            "{text:?}"
        );
        assert!(!input_text(&evs).contains("Ahead"), "{evs:?}");
        assert!(evs.iter().any(|(_, e)| matches!(e, Ev::RedactedLine(8))));
        assert_eq!(commands(&evs), vec!["sudo true", "<redacted 8>"]);
        // An echoed line still being typed is released once typing pauses (a full-screen
        // program that takes keys without Enter), not held until the bound.
        let mut g = EchoGuard::<()>::new(true);
        let mut out = Vec::new();
        g.input(0.0, b"ihello", &mut out);
        g.output(0.01, b"ihello", &mut out);
        assert!(g.held_bytes() > 0, "held while typing goes on");
        g.tick(0.5, &mut out);
        assert!(g.held_bytes() > 0);
        g.tick(HOLD_LIMIT + 0.01, &mut out);
        assert_eq!(g.held_bytes(), 0);
        assert!(out
            .iter()
            .any(|(_, e)| matches!(e, Ev::Input(b) if b.as_slice() == b"ihello")));
    }

    #[test]
    fn opting_out_keeps_the_text() {
        let evs = run(false, &[Out(b"Password: "), In(b"hunter2\r"), Out(b"\r\n")]);
        assert_eq!(commands(&evs), ["hunter2"]);
        assert_eq!(input_text(&evs), "hunter2\r");
    }

    #[test]
    fn order_is_kept_and_a_partial_secret_is_redacted_at_close() {
        let evs = run(
            true,
            &[Out(b"Password: "), In(b"abc"), Out(b"\x1b]0;title\x07")],
        );
        let kinds: Vec<&str> = evs
            .iter()
            .map(|(_, e)| match e {
                Ev::Output(_) => "o",
                Ev::Redacted(_) => "r",
                Ev::Input(_) => "i",
                Ev::RedactedLine(_) => "R",
                Ev::Command(_) => "c",
                Ev::Other(_) => "x",
            })
            .collect();
        assert_eq!(kinds, ["o", "r", "o", "R"]);
        for w in evs.windows(2) {
            assert!(w[0].0 <= w[1].0, "{evs:?}");
        }
    }

    #[test]
    fn prompt_words() {
        assert!(is_secret_prompt("Password: "));
        assert!(is_secret_prompt("Vault token (will be hidden): "));
        assert!(!is_secret_prompt("root@host:/srv/secret# "));
        assert!(!is_secret_prompt("Mapping: "));
        assert!(!is_secret_prompt("password reset done"));
    }

    /// A small deterministic xorshift generator.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_streams_lose_no_byte_and_keep_order() {
        let pieces: [&[u8]; 10] = [
            b"ls",
            b"\r",
            b"\n",
            b"Password: ",
            b"\x1b[",
            b"\x1b]0;",
            b"\x07",
            b"$ ",
            b"ab",
            b"\x7f",
        ];
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..3000 {
            let mut g = EchoGuard::<u32>::new(true);
            let mut out = Vec::new();
            let (mut sent_in, mut sent_out, mut others) = (0usize, Vec::new(), 0u32);
            let steps = rng.next() % 40;
            for i in 0..steps {
                let t = i as f64 * 0.5;
                let mut data = Vec::new();
                for _ in 0..(rng.next() % 4) {
                    if rng.next() % 4 == 0 {
                        data.push(rng.next() as u8);
                    } else {
                        data.extend_from_slice(pieces[(rng.next() % 10) as usize]);
                    }
                }
                match rng.next() % 5 {
                    0 | 1 => {
                        sent_in += data.len();
                        g.input(t, &data, &mut out);
                    }
                    2 | 3 => {
                        sent_out.extend_from_slice(&data);
                        g.output(t, &data, &mut out);
                    }
                    _ => {
                        others += 1;
                        g.other(t, others, 16, &mut out);
                        g.tick(t, &mut out);
                    }
                }
            }
            g.finish(steps as f64 * 0.5, &mut out);
            let (mut got_in, mut got_out, mut got_others) = (0usize, Vec::new(), Vec::new());
            for (_, e) in &out {
                match e {
                    Ev::Input(b) => got_in += b.len(),
                    Ev::Redacted(n) => got_in += n,
                    Ev::Output(b) => got_out.extend_from_slice(b),
                    Ev::Other(x) => got_others.push(*x),
                    Ev::Command(_) | Ev::RedactedLine(_) => {}
                }
            }
            assert_eq!(got_in, sent_in);
            // Every output byte is there, in order; only a secret's echo may read `*`.
            assert_eq!(got_out.len(), sent_out.len());
            for (g, s) in got_out.iter().zip(&sent_out) {
                assert!(
                    g == s || (*g == b'*' && printable(*s)),
                    "{got_out:?} vs {sent_out:?}"
                );
            }
            assert_eq!(got_others, (1..=others).collect::<Vec<_>>());
            for w in out.windows(2) {
                assert!(w[0].0 <= w[1].0);
            }
        }
    }
}
