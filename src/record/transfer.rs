//! Recovers completed file transfers (SFTP and legacy SCP) from the two byte streams of one SSH channel.
//!
//! The gateway relays a session channel between an OpenSSH client and an OpenSSH server and
//! feeds every relayed chunk, in arrival order and with arbitrary chunking, into one tracker:
//! [`SftpTracker`] when the channel runs the `sftp` subsystem, or [`ScpTracker`] when the exec
//! command is a legacy `scp -t`/`scp -f` sink or source (see [`scp_direction`]). The trackers emit
//! a [`Transfer`] for every file whose content went across, with the SHA-256 of that content.
//!
//! All input comes from the network and may be malicious, so nothing here panics on any input and
//! memory stays bounded: an SFTP packet is buffered only up to 256 KiB plus a small header
//! allowance, an SCP control line only up to 8 KiB, out-of-order SFTP content only up to 8 MiB in
//! total, and request bookkeeping only up to fixed counts. When a limit would be broken, or the
//! stream makes no sense, the tracker "gives up": it stops parsing, keeps the reason available
//! through `note()`, and still flushes the files it had open from `finish()` as incomplete.
//!
//! SFTP transfers report the path the client gave in `SSH_FXP_OPEN`. SCP transfers cannot know
//! whether the remote argument of `scp -t`/`scp -f` names a directory or the file itself, so an
//! SCP transfer's path is reported without guessing as `"{remote_path}:{relative}"`, where
//! `relative` is the name sent on the wire prefixed by the directories entered with `D` lines (for
//! example `/tmp/dest:sub/a.txt`); when the remote argument is empty the path is just `relative`.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// The direction of a file transfer relative to the target server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The content went from the client to the target server.
    Upload,
    /// The content went from the target server to the client.
    Download,
}

/// One file transfer that the tracker saw from start to close (or to the end of the session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The protocol that carried the file: "sftp" or "scp".
    pub protocol: &'static str,
    /// Whether the file went up to the target or down from it.
    pub direction: Direction,
    /// The file's path as described in the module documentation.
    pub path: String,
    /// The size in bytes: the highest offset plus length seen for SFTP, the bytes received for SCP.
    pub size: u64,
    /// The lowercase hex SHA-256 of the content bytes in file order.
    pub sha256: String,
    /// False when the transfer was cut short or the content was not seen contiguously, so the
    /// hash may not cover the whole file.
    pub complete: bool,
}

/// The largest SFTP packet body (the value of the length field) that is buffered: OpenSSH caps a
/// message at 256 KiB, and the extra allowance covers the type, request id and other header fields.
const MAX_SFTP_PACKET: usize = 256 * 1024 + 1024;

/// The most out-of-order content bytes held, across all open files of one tracker, while waiting
/// for the gap before them to be filled.
const MAX_HELD: usize = 8 * 1024 * 1024;

/// The most SFTP OPEN requests waiting for their reply.
const MAX_PENDING_OPENS: usize = 1024;

/// The most SFTP READ requests waiting for their reply.
const MAX_PENDING_READS: usize = 16 * 1024;

/// The most SFTP file handles open at once.
const MAX_OPEN_FILES: usize = 1024;

/// The longest SFTP handle that is tracked; the protocol caps handles at 256 bytes.
const MAX_HANDLE: usize = 256;

/// The longest path kept in bookkeeping; longer paths are truncated, which Linux would refuse anyway.
const MAX_PATH: usize = 4096;

/// The most file-system operations kept until `take_ops` is called.
const MAX_OPS: usize = 1024;

/// The longest SCP control line.
const MAX_SCP_LINE: usize = 8 * 1024;

/// The deepest SCP directory nesting followed.
const MAX_SCP_DEPTH: usize = 256;

const SSH_FXP_OPEN: u8 = 3;
const SSH_FXP_CLOSE: u8 = 4;
const SSH_FXP_READ: u8 = 5;
const SSH_FXP_WRITE: u8 = 6;
const SSH_FXP_REMOVE: u8 = 13;
const SSH_FXP_MKDIR: u8 = 14;
const SSH_FXP_RMDIR: u8 = 15;
const SSH_FXP_RENAME: u8 = 18;
const SSH_FXP_STATUS: u8 = 101;
const SSH_FXP_HANDLE: u8 = 102;
const SSH_FXP_DATA: u8 = 103;
const SSH_FXP_NAME: u8 = 104;
const SSH_FXP_ATTRS: u8 = 105;
const SSH_FXP_EXTENDED: u8 = 200;
const SSH_FXP_EXTENDED_REPLY: u8 = 201;

const SSH_FXF_WRITE: u32 = 2;

/// Turns at most `MAX_PATH` bytes of a wire path into a string, replacing invalid UTF-8.
fn path_string(bytes: &[u8]) -> String {
    let kept = bytes.get(..MAX_PATH).unwrap_or(bytes);
    let mut path = String::from_utf8_lossy(kept).into_owned();
    if kept.len() < bytes.len() {
        path.push('…');
    }
    path
}

/// A cursor over one packet's payload whose reads return `None` instead of running past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }
}

/// The hash of one file's content, fed with pieces at arbitrary offsets and hashed in file order.
struct Content {
    hasher: Sha256,
    /// The offset of the next byte the hash expects.
    next: u64,
    /// Pieces that arrived ahead of `next`, keyed by offset.
    pending: BTreeMap<u64, Vec<u8>>,
    /// The bytes held in `pending`.
    held: usize,
    size: u64,
    complete: bool,
}

impl Content {
    fn new() -> Self {
        Content {
            hasher: Sha256::new(),
            next: 0,
            pending: BTreeMap::new(),
            held: 0,
            size: 0,
            complete: true,
        }
    }

    /// Feeds the piece `data` found at `offset`; `total_held` counts held bytes across all files.
    fn feed(&mut self, offset: u64, data: &[u8], total_held: &mut usize) {
        let end = offset.saturating_add(data.len() as u64);
        self.size = self.size.max(end);
        if data.is_empty() {
            return;
        }
        if offset <= self.next {
            self.hash_from(offset, data);
            self.drain(total_held);
            return;
        }
        if self.pending.contains_key(&offset) {
            // A second piece for the same offset is a rewrite that the hash cannot represent.
            self.complete = false;
            return;
        }
        if total_held.saturating_add(data.len()) > MAX_HELD {
            // Holding this piece would break the memory cap, so the gap before the held pieces is
            // given up on: the hash skips it and carries on with what is contiguous after it.
            self.complete = false;
            self.flush_all(total_held);
            self.next = self.next.max(offset);
            self.hash_from(offset, data);
            return;
        }
        self.pending.insert(offset, data.to_vec());
        self.held = self.held.saturating_add(data.len());
        *total_held = total_held.saturating_add(data.len());
    }

    /// Hashes the part of `data` (found at `offset`, which is at most `next`) past `next`.
    fn hash_from(&mut self, offset: u64, data: &[u8]) {
        let skip = self.next.saturating_sub(offset);
        if skip > 0 {
            // The piece overlaps content already hashed, so it rewrites part of the file.
            self.complete = false;
        }
        let rest = usize::try_from(skip)
            .ok()
            .and_then(|skip| data.get(skip..))
            .unwrap_or_default();
        if !rest.is_empty() {
            self.hasher.update(rest);
            self.next = offset.saturating_add(data.len() as u64);
        }
    }

    /// Hashes held pieces for as long as they continue the contiguous content.
    fn drain(&mut self, total_held: &mut usize) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let (offset, data) = entry.remove_entry();
            self.release(data.len(), total_held);
            self.hash_from(offset, &data);
        }
    }

    /// Hashes every held piece in offset order, skipping the gaps between them.
    fn flush_all(&mut self, total_held: &mut usize) {
        while let Some((offset, data)) = self.pending.pop_first() {
            self.complete = false;
            self.release(data.len(), total_held);
            self.next = self.next.max(offset);
            self.hash_from(offset, &data);
        }
    }

    fn release(&mut self, len: usize, total_held: &mut usize) {
        self.held = self.held.saturating_sub(len);
        *total_held = total_held.saturating_sub(len);
    }

    /// Ends the file and returns its size, hex hash and whether the hash covers it all.
    fn finish(mut self, total_held: &mut usize) -> (u64, String, bool) {
        self.flush_all(total_held);
        let complete = self.complete && self.next == self.size;
        (self.size, hex::encode(self.hasher.finalize()), complete)
    }
}

/// Cuts one direction of an SFTP stream into packets, holding at most one packet at a time.
#[derive(Default)]
struct Framer {
    /// The bytes of the packet being assembled, length field included.
    buf: Vec<u8>,
}

impl Framer {
    /// Moves bytes from `input` until one whole packet is held, returning `Ok(true)` when it is.
    ///
    /// Each call either consumes at least one byte of a non-empty `input` or completes a packet.
    fn fill(&mut self, input: &mut &[u8]) -> Result<bool, String> {
        if self.buf.len() < 4 {
            let wanted = 4usize.saturating_sub(self.buf.len());
            self.take_from(input, wanted);
            if self.buf.len() < 4 {
                return Ok(false);
            }
        }
        let declared = self
            .buf
            .get(..4)
            .and_then(|head| <[u8; 4]>::try_from(head).ok())
            .map(u32::from_be_bytes)
            .unwrap_or_default();
        let len = usize::try_from(declared).unwrap_or(usize::MAX);
        if len > MAX_SFTP_PACKET {
            return Err(format!(
                "sftp packet of {declared} bytes exceeds the {MAX_SFTP_PACKET}-byte limit; stopped recording transfers"
            ));
        }
        let total = len.saturating_add(4);
        self.take_from(input, total.saturating_sub(self.buf.len()));
        Ok(self.buf.len() == total)
    }

    fn take_from(&mut self, input: &mut &[u8], wanted: usize) {
        // The split point is clamped to the input's length, so `split_at` cannot panic.
        let (head, tail) = input.split_at(wanted.min(input.len()));
        self.buf.extend_from_slice(head);
        *input = tail;
    }
}

/// A file opened with `SSH_FXP_OPEN` whose handle the server returned.
struct OpenFile {
    path: String,
    direction: Direction,
    content: Content,
}

impl OpenFile {
    fn into_transfer(self, total_held: &mut usize, closed: bool) -> Transfer {
        let (size, sha256, complete) = self.content.finish(total_held);
        Transfer {
            protocol: "sftp",
            direction: self.direction,
            path: self.path,
            size,
            sha256,
            complete: complete && closed,
        }
    }
}

/// Follows an SFTP (version 3) session and reports the files it moved.
#[derive(Default)]
pub struct SftpTracker {
    client: Framer,
    server: Framer,
    /// OPEN requests by request id: the path and the open flags.
    pending_opens: BTreeMap<u32, (String, u32)>,
    /// READ requests on tracked files by request id: the handle and the offset.
    pending_reads: BTreeMap<u32, (Vec<u8>, u64)>,
    /// Open files by handle.
    files: BTreeMap<Vec<u8>, OpenFile>,
    /// Out-of-order content bytes held across all files.
    held: usize,
    ops: Vec<String>,
    ops_dropped: u64,
    note: Option<String>,
}

impl SftpTracker {
    /// Creates a tracker for a fresh `sftp` subsystem channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes the client sent and returns the transfers they completed.
    pub fn from_client(&mut self, bytes: &[u8]) -> Vec<Transfer> {
        self.feed(true, bytes)
    }

    /// Feeds bytes the server sent and returns the transfers they completed.
    pub fn from_server(&mut self, bytes: &[u8]) -> Vec<Transfer> {
        self.feed(false, bytes)
    }

    /// Ends the session and returns the files still open, marked incomplete.
    pub fn finish(mut self) -> Vec<Transfer> {
        let files = std::mem::take(&mut self.files);
        files
            .into_values()
            .map(|file| file.into_transfer(&mut self.held, false))
            .collect()
    }

    /// Returns why the tracker gave up parsing, if it did.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Returns and forgets the file-system operations the client requested (whether or not they
    /// succeeded), such as `remove /tmp/x` or `rename /a -> /b`.
    pub fn take_ops(&mut self) -> Vec<String> {
        let mut ops = std::mem::take(&mut self.ops);
        if self.ops_dropped > 0 {
            ops.push(format!(
                "({} more operations not recorded)",
                self.ops_dropped
            ));
            self.ops_dropped = 0;
        }
        ops
    }

    fn give_up(&mut self, reason: String) {
        if self.note.is_none() {
            self.note = Some(reason);
        }
    }

    fn feed(&mut self, from_client: bool, mut input: &[u8]) -> Vec<Transfer> {
        let mut out = Vec::new();
        while !input.is_empty() && self.note.is_none() {
            let framer = if from_client {
                &mut self.client
            } else {
                &mut self.server
            };
            match framer.fill(&mut input) {
                Ok(true) => {
                    let mut packet = std::mem::take(&mut framer.buf);
                    let body = packet.get(4..).unwrap_or_default();
                    if from_client {
                        self.client_packet(body, &mut out);
                    } else {
                        self.server_packet(body, &mut out);
                    }
                    // The buffer goes back empty so that its allocation is reused.
                    packet.clear();
                    if from_client {
                        self.client.buf = packet;
                    } else {
                        self.server.buf = packet;
                    }
                }
                Ok(false) => {}
                Err(reason) => self.give_up(reason),
            }
        }
        out
    }

    fn record_op(&mut self, op: String) {
        if self.ops.len() < MAX_OPS {
            self.ops.push(op);
        } else {
            self.ops_dropped = self.ops_dropped.saturating_add(1);
        }
    }

    /// Handles one client packet; a malformed packet is skipped.
    fn client_packet(&mut self, body: &[u8], out: &mut Vec<Transfer>) -> Option<()> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        match kind {
            SSH_FXP_OPEN => {
                let id = r.u32()?;
                let path = path_string(r.string()?);
                let pflags = r.u32()?;
                // The attributes that follow only matter to the server, so they are not parsed.
                if self.pending_opens.len() >= MAX_PENDING_OPENS
                    && !self.pending_opens.contains_key(&id)
                {
                    self.give_up(format!(
                        "more than {MAX_PENDING_OPENS} sftp open requests awaiting replies; stopped recording transfers"
                    ));
                    return None;
                }
                self.pending_opens.insert(id, (path, pflags));
            }
            SSH_FXP_CLOSE => {
                let _id = r.u32()?;
                let handle = r.string()?;
                if let Some(file) = self.files.remove(handle) {
                    out.push(file.into_transfer(&mut self.held, true));
                }
            }
            SSH_FXP_READ => {
                let id = r.u32()?;
                let handle = r.string()?;
                let offset = r.u64()?;
                let _len = r.u32()?;
                let tracked = self
                    .files
                    .get(handle)
                    .is_some_and(|file| file.direction == Direction::Download);
                if !tracked {
                    return None;
                }
                if self.pending_reads.len() >= MAX_PENDING_READS
                    && !self.pending_reads.contains_key(&id)
                {
                    self.give_up(format!(
                        "more than {MAX_PENDING_READS} sftp read requests awaiting replies; stopped recording transfers"
                    ));
                    return None;
                }
                self.pending_reads.insert(id, (handle.to_vec(), offset));
            }
            SSH_FXP_WRITE => {
                let _id = r.u32()?;
                let handle = r.string()?;
                let offset = r.u64()?;
                let data = r.string()?;
                let upload = self
                    .files
                    .get_mut(handle)
                    .filter(|file| file.direction == Direction::Upload);
                if let Some(file) = upload {
                    file.content.feed(offset, data, &mut self.held);
                }
            }
            SSH_FXP_REMOVE | SSH_FXP_MKDIR | SSH_FXP_RMDIR => {
                let _id = r.u32()?;
                let path = path_string(r.string()?);
                let verb = match kind {
                    SSH_FXP_REMOVE => "remove",
                    SSH_FXP_MKDIR => "mkdir",
                    _ => "rmdir",
                };
                self.record_op(format!("{verb} {path}"));
            }
            SSH_FXP_RENAME => {
                let _id = r.u32()?;
                let from = path_string(r.string()?);
                let to = path_string(r.string()?);
                self.record_op(format!("rename {from} -> {to}"));
            }
            SSH_FXP_EXTENDED => {
                let _id = r.u32()?;
                let name = r.string()?;
                if name == b"posix-rename@openssh.com" {
                    let from = path_string(r.string()?);
                    let to = path_string(r.string()?);
                    self.record_op(format!("rename {from} -> {to}"));
                }
            }
            _ => {}
        }
        Some(())
    }

    /// Handles one server packet; a malformed packet is skipped.
    fn server_packet(&mut self, body: &[u8], out: &mut Vec<Transfer>) -> Option<()> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        if !matches!(
            kind,
            SSH_FXP_STATUS
                | SSH_FXP_HANDLE
                | SSH_FXP_DATA
                | SSH_FXP_NAME
                | SSH_FXP_ATTRS
                | SSH_FXP_EXTENDED_REPLY
        ) {
            return None;
        }
        let id = r.u32()?;
        // Every reply ends its request, whatever it says, so the bookkeeping never outlives it.
        let open = self.pending_opens.remove(&id);
        let read = self.pending_reads.remove(&id);
        match kind {
            SSH_FXP_HANDLE => {
                let handle = r.string()?;
                let (path, pflags) = open?;
                if handle.len() > MAX_HANDLE {
                    return None;
                }
                if self.files.len() >= MAX_OPEN_FILES && !self.files.contains_key(handle) {
                    self.give_up(format!(
                        "more than {MAX_OPEN_FILES} sftp files open at once; stopped recording transfers"
                    ));
                    return None;
                }
                let direction = if pflags & SSH_FXF_WRITE != 0 {
                    Direction::Upload
                } else {
                    Direction::Download
                };
                let file = OpenFile {
                    path,
                    direction,
                    content: Content::new(),
                };
                if let Some(previous) = self.files.insert(handle.to_vec(), file) {
                    // The server reused a handle that was never closed, so the old file ends here.
                    out.push(previous.into_transfer(&mut self.held, false));
                }
            }
            SSH_FXP_DATA => {
                let data = r.string()?;
                let (handle, offset) = read?;
                if let Some(file) = self.files.get_mut(&handle) {
                    file.content.feed(offset, data, &mut self.held);
                }
            }
            _ => {}
        }
        Some(())
    }
}

/// Parses an exec command and, when it runs a legacy scp sink (`-t`) or source (`-f`), returns the
/// transfer direction and the remote path argument.
pub fn scp_direction(exec_command: &str) -> Option<(Direction, String)> {
    let mut words = exec_command.split_whitespace();
    let program = words.next()?;
    if program != "scp" && !program.ends_with("/scp") {
        return None;
    }
    let mut direction = None;
    let mut rest = Vec::new();
    let mut options_done = false;
    for word in words {
        if options_done {
            rest.push(word);
        } else if word == "--" {
            options_done = true;
        } else if let Some(letters) = word.strip_prefix('-') {
            for letter in letters.chars() {
                let found = match letter {
                    't' => Direction::Upload,
                    'f' => Direction::Download,
                    _ => continue,
                };
                if direction.is_some_and(|seen| seen != found) {
                    return None;
                }
                direction = Some(found);
            }
        } else {
            options_done = true;
            rest.push(word);
        }
    }
    Some((direction?, rest.join(" ")))
}

/// Where the SCP sending side's stream is.
enum ScpState {
    /// Collecting a control line.
    Line,
    /// Reading file content, with this many bytes still to come.
    Content(u64),
    /// Waiting for the sender's status byte after the content.
    End,
    /// Discarding the rest of an error message line.
    SkipLine,
}

/// The SCP file whose header has been seen.
struct ScpFile {
    path: String,
    hasher: Sha256,
    received: u64,
    /// Whether any byte after the header (content or status) has arrived.
    started: bool,
}

impl ScpFile {
    fn into_transfer(self, direction: Direction, complete: bool) -> Transfer {
        Transfer {
            protocol: "scp",
            direction,
            path: self.path,
            size: self.received,
            sha256: hex::encode(self.hasher.finalize()),
            complete,
        }
    }
}

/// Follows a legacy SCP (rcp protocol) session and reports the files it moved.
pub struct ScpTracker {
    direction: Direction,
    remote_path: String,
    state: ScpState,
    line: Vec<u8>,
    dirs: Vec<String>,
    file: Option<ScpFile>,
    /// Whether the receiving side is in the middle of an error message line.
    receiver_in_error: bool,
    note: Option<String>,
}

impl ScpTracker {
    /// Creates a tracker for `scp -t remote_path` (Upload) or `scp -f remote_path` (Download).
    pub fn new(direction: Direction, remote_path: String) -> Self {
        ScpTracker {
            direction,
            remote_path,
            state: ScpState::Line,
            line: Vec::new(),
            dirs: Vec::new(),
            file: None,
            receiver_in_error: false,
            note: None,
        }
    }

    /// Feeds bytes the client sent and returns the transfers they completed.
    pub fn from_client(&mut self, bytes: &[u8]) -> Vec<Transfer> {
        match self.direction {
            Direction::Upload => self.sender(bytes),
            Direction::Download => self.receiver(bytes),
        }
    }

    /// Feeds bytes the server sent and returns the transfers they completed.
    pub fn from_server(&mut self, bytes: &[u8]) -> Vec<Transfer> {
        match self.direction {
            Direction::Upload => self.receiver(bytes),
            Direction::Download => self.sender(bytes),
        }
    }

    /// Ends the session and returns the file in flight, if any, marked incomplete.
    pub fn finish(mut self) -> Vec<Transfer> {
        self.file
            .take()
            .map(|file| file.into_transfer(self.direction, false))
            .into_iter()
            .collect()
    }

    /// Returns why the tracker gave up parsing, if it did.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    fn give_up(&mut self, reason: String) {
        if self.note.is_none() {
            self.note = Some(reason);
        }
    }

    /// Parses the receiving side's replies: `\0` for ok, or `\x01`/`\x02` and a message line.
    fn receiver(&mut self, bytes: &[u8]) -> Vec<Transfer> {
        if self.note.is_some() {
            return Vec::new();
        }
        for &byte in bytes {
            if self.receiver_in_error {
                self.receiver_in_error = byte != b'\n';
            } else if byte == 1 || byte == 2 {
                self.receiver_in_error = true;
                // The sender waits for the reply to a file header before sending content, so an
                // error while nothing has followed the header means the file was refused.
                if self.file.as_ref().is_some_and(|file| !file.started) {
                    self.file = None;
                    self.state = ScpState::Line;
                }
            }
        }
        Vec::new()
    }

    /// Parses the sending side's control lines, content and status bytes.
    fn sender(&mut self, mut input: &[u8]) -> Vec<Transfer> {
        let mut out = Vec::new();
        while !input.is_empty() && self.note.is_none() {
            match self.state {
                ScpState::Line => {
                    if self.line.is_empty() && input.first() == Some(&0) {
                        // A stray ok byte between records carries nothing.
                        input = input.get(1..).unwrap_or_default();
                        continue;
                    }
                    let newline = input.iter().position(|&b| b == b'\n');
                    let chunk_len = newline.unwrap_or(input.len());
                    if self.line.len().saturating_add(chunk_len) > MAX_SCP_LINE {
                        self.give_up(format!(
                            "scp control line longer than {MAX_SCP_LINE} bytes; stopped recording transfers"
                        ));
                        break;
                    }
                    // The split point is a newline's position or the input's length, so it is in
                    // bounds and `split_at` cannot panic.
                    let (chunk, tail) = input.split_at(chunk_len);
                    self.line.extend_from_slice(chunk);
                    input = tail;
                    if newline.is_some() {
                        // The newline itself is dropped.
                        input = input.get(1..).unwrap_or_default();
                        let line = std::mem::take(&mut self.line);
                        self.control_line(&line);
                    }
                }
                ScpState::Content(remaining) => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    // The split point is clamped to the input's length, so `split_at` cannot panic.
                    let (content, tail) = input.split_at(n);
                    input = tail;
                    if let Some(file) = self.file.as_mut() {
                        file.hasher.update(content);
                        file.received = file.received.saturating_add(n as u64);
                        file.started = true;
                    }
                    let remaining = remaining.saturating_sub(n as u64);
                    self.state = if remaining == 0 {
                        ScpState::End
                    } else {
                        ScpState::Content(remaining)
                    };
                }
                ScpState::End => {
                    let status = input.first().copied().unwrap_or_default();
                    let file = self.file.take();
                    self.state = match status {
                        0 => ScpState::Line,
                        1 | 2 => ScpState::SkipLine,
                        // Anything else is not a status byte, so it is left to start the next line.
                        _ => ScpState::Line,
                    };
                    if matches!(status, 0..=2) {
                        input = input.get(1..).unwrap_or_default();
                    }
                    if let Some(file) = file {
                        out.push(file.into_transfer(self.direction, status == 0));
                    }
                }
                ScpState::SkipLine => match input.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        input = input.get(at.saturating_add(1)..).unwrap_or_default();
                        self.state = ScpState::Line;
                    }
                    None => input = &[],
                },
            }
        }
        out
    }

    /// Acts on one control line from the sender, without its newline.
    fn control_line(&mut self, line: &[u8]) {
        let Some((&kind, rest)) = line.split_first() else {
            self.give_up("empty scp control line; stopped recording transfers".to_string());
            return;
        };
        match kind {
            b'C' | b'D' => {
                let mut fields = rest.splitn(3, |&b| b == b' ');
                let _mode = fields.next();
                let size = fields
                    .next()
                    .and_then(|size| std::str::from_utf8(size).ok())
                    .and_then(|size| size.parse::<u64>().ok());
                let name = fields.next().filter(|name| !name.is_empty());
                let (Some(size), Some(name)) = (size, name) else {
                    self.give_up(format!(
                        "malformed scp {} line; stopped recording transfers",
                        char::from(kind)
                    ));
                    return;
                };
                let name = path_string(name);
                if kind == b'D' {
                    if self.dirs.len() >= MAX_SCP_DEPTH {
                        self.give_up(format!(
                            "scp directories nested deeper than {MAX_SCP_DEPTH}; stopped recording transfers"
                        ));
                        return;
                    }
                    self.dirs.push(name);
                    return;
                }
                let mut relative = self.dirs.join("/");
                if !relative.is_empty() {
                    relative.push('/');
                }
                relative.push_str(&name);
                let path = if self.remote_path.is_empty() {
                    relative
                } else {
                    format!("{}:{relative}", self.remote_path)
                };
                self.file = Some(ScpFile {
                    path,
                    hasher: Sha256::new(),
                    received: 0,
                    started: false,
                });
                self.state = if size == 0 {
                    ScpState::End
                } else {
                    ScpState::Content(size)
                };
            }
            b'E' => {
                self.dirs.pop();
            }
            // Timestamp lines and the sender's own error messages carry no file content.
            b'T' | 1 | 2 => {}
            _ => {
                self.give_up("unexpected scp control line; stopped recording transfers".to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn pkt(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    fn u32b(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn u64b(v: u64) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn s(bytes: &[u8]) -> Vec<u8> {
        let mut out = u32b(bytes.len() as u32);
        out.extend_from_slice(bytes);
        out
    }

    fn open(id: u32, path: &str, pflags: u32) -> Vec<u8> {
        pkt(
            SSH_FXP_OPEN,
            &[u32b(id), s(path.as_bytes()), u32b(pflags), u32b(0)].concat(),
        )
    }

    fn handle(id: u32, h: &[u8]) -> Vec<u8> {
        pkt(SSH_FXP_HANDLE, &[u32b(id), s(h)].concat())
    }

    fn write(id: u32, h: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
        pkt(
            SSH_FXP_WRITE,
            &[u32b(id), s(h), u64b(offset), s(data)].concat(),
        )
    }

    fn read(id: u32, h: &[u8], offset: u64, len: u32) -> Vec<u8> {
        pkt(
            SSH_FXP_READ,
            &[u32b(id), s(h), u64b(offset), u32b(len)].concat(),
        )
    }

    fn data(id: u32, d: &[u8]) -> Vec<u8> {
        pkt(SSH_FXP_DATA, &[u32b(id), s(d)].concat())
    }

    fn status(id: u32, code: u32) -> Vec<u8> {
        pkt(
            SSH_FXP_STATUS,
            &[u32b(id), u32b(code), s(b""), s(b"")].concat(),
        )
    }

    fn close(id: u32, h: &[u8]) -> Vec<u8> {
        pkt(SSH_FXP_CLOSE, &[u32b(id), s(h)].concat())
    }

    /// One chunk of a session: true when the client sent it.
    type Event = (bool, Vec<u8>);

    /// Splits `bytes` into pieces of at most `piece` bytes (all at once when `piece` is 0).
    fn pieces(bytes: &[u8], piece: usize) -> Vec<&[u8]> {
        if piece == 0 || bytes.is_empty() {
            vec![bytes]
        } else {
            bytes.chunks(piece).collect()
        }
    }

    fn run_sftp(events: &[Event], piece: usize) -> (Vec<Transfer>, Option<String>, Vec<String>) {
        let mut tracker = SftpTracker::new();
        let mut out = Vec::new();
        for (client, bytes) in events {
            for part in pieces(bytes, piece) {
                if *client {
                    out.extend(tracker.from_client(part));
                } else {
                    out.extend(tracker.from_server(part));
                }
            }
        }
        let note = tracker.note().map(str::to_string);
        let ops = tracker.take_ops();
        out.extend(tracker.finish());
        (out, note, ops)
    }

    fn run_scp(
        direction: Direction,
        events: &[Event],
        piece: usize,
    ) -> (Vec<Transfer>, Option<String>) {
        let mut tracker = ScpTracker::new(direction, "/tmp/dest".to_string());
        let mut out = Vec::new();
        for (client, bytes) in events {
            for part in pieces(bytes, piece) {
                if *client {
                    out.extend(tracker.from_client(part));
                } else {
                    out.extend(tracker.from_server(part));
                }
            }
        }
        let note = tracker.note().map(str::to_string);
        out.extend(tracker.finish());
        (out, note)
    }

    fn init_events() -> Vec<Event> {
        vec![
            (true, pkt(1, &u32b(3))),
            (
                false,
                pkt(2, &[u32b(3), s(b"limits@openssh.com"), s(b"1")].concat()),
            ),
        ]
    }

    fn upload_events() -> Vec<Event> {
        let mut events = init_events();
        events.extend([
            (true, open(1, "/tmp/up.bin", 2 | 8 | 0x10)),
            (false, handle(1, b"h1")),
            (
                true,
                [write(2, b"h1", 5, b"world"), write(3, b"h1", 0, b"hello")].concat(),
            ),
            (false, [status(3, 0), status(2, 0)].concat()),
            (true, close(4, b"h1")),
            (false, status(4, 0)),
        ]);
        events
    }

    fn download_events() -> Vec<Event> {
        let mut events = init_events();
        events.extend([
            (true, open(1, "/srv/down.bin", 1)),
            (false, handle(1, b"h2")),
            (
                true,
                [
                    read(5, b"h2", 0, 4),
                    read(6, b"h2", 4, 4),
                    read(7, b"h2", 8, 4),
                ]
                .concat(),
            ),
            (
                false,
                [data(6, b"5678"), data(5, b"1234"), status(7, 1)].concat(),
            ),
            (true, close(8, b"h2")),
        ]);
        events
    }

    #[test]
    fn sftp_table() {
        let mut overlap = init_events();
        overlap.extend([
            (true, open(1, "/o", 2)),
            (false, handle(1, b"h")),
            (true, write(2, b"h", 0, b"abcd")),
            (true, write(3, b"h", 2, b"cdef")),
            (true, close(4, b"h")),
        ]);
        let mut gap = init_events();
        gap.extend([
            (true, open(1, "/g", 2)),
            (false, handle(1, b"h")),
            (true, write(2, b"h", 0, b"ab")),
            (true, write(3, b"h", 4, b"ef")),
            (true, close(4, b"h")),
        ]);
        let mut empty = init_events();
        empty.extend([
            (true, open(1, "/empty", 2 | 8)),
            (false, handle(1, b"e")),
            (true, close(2, b"e")),
        ]);
        let mut dir = init_events();
        dir.extend([
            (true, pkt(11, &[u32b(1), s(b"/tmp")].concat())),
            (false, handle(1, b"d")),
            (true, close(2, b"d")),
        ]);
        let mut unclosed = init_events();
        unclosed.extend([
            (true, open(1, "/u", 2)),
            (false, handle(1, b"u")),
            (true, write(2, b"u", 0, b"xy")),
        ]);
        let mut refused = init_events();
        refused.extend([
            (true, open(1, "/denied", 2)),
            (false, status(1, 3)),
            (false, handle(1, b"z")),
            (true, close(2, b"z")),
        ]);
        let t = |direction, path: &str, content: &[u8], size, complete| Transfer {
            protocol: "sftp",
            direction,
            path: path.to_string(),
            size,
            sha256: sha(content),
            complete,
        };
        let cases: Vec<(&str, Vec<Event>, Vec<Transfer>)> = vec![
            (
                "upload",
                upload_events(),
                vec![t(Direction::Upload, "/tmp/up.bin", b"helloworld", 10, true)],
            ),
            (
                "download",
                download_events(),
                vec![t(
                    Direction::Download,
                    "/srv/down.bin",
                    b"12345678",
                    8,
                    true,
                )],
            ),
            (
                "overlap",
                overlap,
                vec![t(Direction::Upload, "/o", b"abcdef", 6, false)],
            ),
            (
                "gap",
                gap,
                vec![t(Direction::Upload, "/g", b"abef", 6, false)],
            ),
            (
                "empty",
                empty,
                vec![t(Direction::Upload, "/empty", b"", 0, true)],
            ),
            ("opendir", dir, vec![]),
            (
                "unclosed",
                unclosed,
                vec![t(Direction::Upload, "/u", b"xy", 2, false)],
            ),
            ("refused", refused, vec![]),
        ];
        for (name, events, want) in cases {
            for piece in [0, 1, 3, 7] {
                let (got, note, _) = run_sftp(&events, piece);
                assert_eq!(got, want, "case {name}, piece {piece}");
                assert_eq!(note, None, "case {name}, piece {piece}");
            }
        }
    }

    #[test]
    fn sftp_ops() {
        let events = vec![
            (true, pkt(SSH_FXP_REMOVE, &[u32b(1), s(b"/tmp/x")].concat())),
            (
                true,
                pkt(SSH_FXP_RENAME, &[u32b(2), s(b"/a"), s(b"/b")].concat()),
            ),
            (
                true,
                pkt(SSH_FXP_MKDIR, &[u32b(3), s(b"/d"), u32b(0)].concat()),
            ),
            (true, pkt(SSH_FXP_RMDIR, &[u32b(4), s(b"/d")].concat())),
            (
                true,
                pkt(
                    SSH_FXP_EXTENDED,
                    &[u32b(5), s(b"posix-rename@openssh.com"), s(b"/c"), s(b"/e")].concat(),
                ),
            ),
        ];
        let (_, _, ops) = run_sftp(&events, 2);
        assert_eq!(
            ops,
            [
                "remove /tmp/x",
                "rename /a -> /b",
                "mkdir /d",
                "rmdir /d",
                "rename /c -> /e"
            ]
        );
    }

    #[test]
    fn sftp_oversized_packet_gives_up() {
        let mut tracker = SftpTracker::new();
        let mut events = upload_events();
        events.truncate(4);
        for (client, bytes) in &events {
            if *client {
                tracker.from_client(bytes);
            } else {
                tracker.from_server(bytes);
            }
        }
        assert!(tracker.from_client(&u32b(u32::MAX)).is_empty());
        assert!(tracker.note().is_some_and(|n| n.contains("exceeds")));
        assert!(tracker.from_client(&close(9, b"h1")).is_empty());
        let flushed = tracker.finish();
        assert_eq!(flushed.len(), 1);
        assert!(!flushed.iter().any(|t| t.complete));
    }

    #[test]
    fn sftp_held_cap() {
        let chunk = vec![7u8; 128 * 1024];
        let mut events = init_events();
        events.push((true, open(1, "/big", 2)));
        events.push((false, handle(1, b"h")));
        // The first chunk is withheld, so everything after it waits until the cap is hit.
        let count = 80u64;
        for i in 1..count {
            events.push((true, write(10, b"h", i * chunk.len() as u64, &chunk)));
        }
        events.push((true, write(11, b"h", 0, &chunk)));
        events.push((true, close(12, b"h")));
        let (got, note, _) = run_sftp(&events, 0);
        assert_eq!(note, None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].size, count * chunk.len() as u64);
        assert!(!got[0].complete);
    }

    fn scp_upload_events() -> Vec<Event> {
        vec![
            (false, vec![0]),
            (true, b"D0755 0 sub\n".to_vec()),
            (false, vec![0]),
            (true, b"T1700000000 0 1700000000 0\n".to_vec()),
            (false, vec![0]),
            (true, b"C0644 11 a.txt\n".to_vec()),
            (false, vec![0]),
            (true, b"hello world\0".to_vec()),
            (false, vec![0]),
            (true, b"E\n".to_vec()),
            (false, vec![0]),
            (true, b"C0600 0 empty\n".to_vec()),
            (false, vec![0]),
            (true, vec![0]),
            (false, vec![0]),
            (true, b"C0600 5 refused\n".to_vec()),
            (false, b"\x01scp: refused: Permission denied\n".to_vec()),
            (true, b"C0600 4 b\nxyz".to_vec()),
            (true, b"w\0".to_vec()),
            (false, vec![0, 0]),
        ]
    }

    /// Swaps the roles of client and server, turning an upload script into a download one.
    fn swapped(events: Vec<Event>) -> Vec<Event> {
        events.into_iter().map(|(c, b)| (!c, b)).collect()
    }

    #[test]
    fn scp_table() {
        let t = |direction, path: &str, content: &[u8], complete| Transfer {
            protocol: "scp",
            direction,
            path: path.to_string(),
            size: content.len() as u64,
            sha256: sha(content),
            complete,
        };
        let files = |direction| {
            vec![
                t(direction, "/tmp/dest:sub/a.txt", b"hello world", true),
                t(direction, "/tmp/dest:empty", b"", true),
                t(direction, "/tmp/dest:b", b"xyzw", true),
            ]
        };
        let cases: Vec<(&str, Direction, Vec<Event>, Vec<Transfer>)> = vec![
            (
                "upload",
                Direction::Upload,
                scp_upload_events(),
                files(Direction::Upload),
            ),
            (
                "download",
                Direction::Download,
                swapped(scp_upload_events()),
                files(Direction::Download),
            ),
            (
                "source read error",
                Direction::Download,
                vec![
                    (true, vec![0]),
                    (false, b"C0644 3 f\nabc\x01scp: f: read error\n".to_vec()),
                    (false, b"C0644 1 g\nz\0".to_vec()),
                ],
                vec![
                    t(Direction::Download, "/tmp/dest:f", b"abc", false),
                    t(Direction::Download, "/tmp/dest:g", b"z", true),
                ],
            ),
            (
                "cut short",
                Direction::Upload,
                vec![(false, vec![0]), (true, b"C0644 10 f\nabc".to_vec())],
                vec![t(Direction::Upload, "/tmp/dest:f", b"abc", false)],
            ),
        ];
        for (name, direction, events, want) in cases {
            for piece in [0, 1, 2, 5] {
                let (got, note) = run_scp(direction, &events, piece);
                assert_eq!(got, want, "case {name}, piece {piece}");
                assert_eq!(note, None, "case {name}, piece {piece}");
            }
        }
    }

    #[test]
    fn scp_gives_up_on_garbage() {
        let (got, note) = run_scp(Direction::Upload, &[(true, b"C0644 x f\n".to_vec())], 0);
        assert!(got.is_empty());
        assert!(note.is_some());
        let long = vec![b'C'; MAX_SCP_LINE + 1];
        let (got, note) = run_scp(Direction::Upload, &[(true, long)], 1);
        assert!(got.is_empty());
        assert!(note.is_some());
    }

    #[test]
    fn scp_direction_table() {
        let cases: [(&str, Option<(Direction, &str)>); 11] = [
            ("scp -t /tmp/x", Some((Direction::Upload, "/tmp/x"))),
            ("scp -v -p -t -- /tmp", Some((Direction::Upload, "/tmp"))),
            ("scp -f file", Some((Direction::Download, "file"))),
            (
                "/usr/bin/scp -r -f /a b",
                Some((Direction::Download, "/a b")),
            ),
            ("scp -pt .", Some((Direction::Upload, "."))),
            ("scp -t", Some((Direction::Upload, ""))),
            ("scp -t -f x", None),
            ("scp x", None),
            ("ls -t /tmp", None),
            ("internal-sftp", None),
            ("", None),
        ];
        for (command, want) in cases {
            let want = want.map(|(d, p)| (d, p.to_string()));
            assert_eq!(scp_direction(command), want, "command {command:?}");
        }
    }

    /// A small deterministic xorshift generator for the fuzz tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }

        fn bytes(&mut self, max: u64) -> Vec<u8> {
            let len = self.below(max + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// Picks one element; callers pass non-empty slices, so the index is always in bounds.
        fn pick<'a>(&mut self, from: &'a [&'a [u8]]) -> &'a [u8] {
            from[self.below(from.len() as u64) as usize]
        }
    }

    /// Feeds each event in random pieces instead of whole, returning what the tracker reported.
    fn split_feed<T>(
        events: &[Event],
        rng: &mut Rng,
        mut feed: impl FnMut(bool, &[u8]) -> Vec<T>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (client, bytes) in events {
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let n = (rng.below(rest.len() as u64) + 1) as usize;
                let (part, tail) = rest.split_at(n);
                out.extend(feed(*client, part));
                rest = tail;
            }
        }
        out
    }

    fn random_sftp_packet(rng: &mut Rng) -> Event {
        let handles: &[&[u8]] = &[b"a", b"b", b"c"];
        let id = rng.below(6) as u32;
        let h = rng.pick(handles);
        let offset = rng.below(64);
        match rng.below(10) {
            0 => (true, open(id, "/f", rng.below(4) as u32)),
            1 => (false, handle(id, h)),
            2 => (true, write(id, h, offset, &rng.bytes(40))),
            3 => (true, read(id, h, offset, 16)),
            4 => (false, data(id, &rng.bytes(40))),
            5 => (true, close(id, h)),
            6 => (false, status(id, 0)),
            7 => (true, pkt(SSH_FXP_REMOVE, &[u32b(id), s(b"/r")].concat())),
            8 => {
                // A well-framed packet whose body is cut or padded at a random place, to exercise
                // malformed parsing without losing the framing.
                let whole = write(id, h, offset, &rng.bytes(8));
                let mut body = whole.get(5..).unwrap_or_default().to_vec();
                let len = rng.below(body.len() as u64 + 4) as usize;
                body.resize(len, 0);
                let kind = [3, 4, 5, 6, 13, 18, 101, 102, 103][rng.below(9) as usize];
                (kind < 100, pkt(kind, &body))
            }
            _ => (true, pkt(rng.below(256) as u8, &rng.bytes(12))),
        }
    }

    /// A coherent open, transfer and close of one file, so that the fuzz test reaches transfers.
    fn random_sftp_session(rng: &mut Rng) -> Vec<Event> {
        let id = rng.below(6) as u32;
        let h = [b'h', rng.below(3) as u8];
        let upload = rng.below(2) == 0;
        let mut events = vec![
            (true, open(id, "/s", if upload { 2 } else { 1 })),
            (false, handle(id, &h)),
        ];
        for _ in 0..rng.below(5) {
            let offset = rng.below(32);
            if upload {
                events.push((true, write(id, &h, offset, &rng.bytes(16))));
            } else {
                events.push((true, read(id, &h, offset, 16)));
                events.push((false, data(id, &rng.bytes(16))));
            }
        }
        events.push((true, close(id, &h)));
        events
    }

    #[test]
    fn fuzz_sftp_pieces_equal_whole() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..400 {
            let count = rng.below(40);
            let events: Vec<Event> = (0..count)
                .flat_map(|_| match rng.below(60) {
                    0 => vec![(rng.below(2) == 0, rng.bytes(300))],
                    1..=10 => random_sftp_session(&mut rng),
                    _ => vec![random_sftp_packet(&mut rng)],
                })
                .collect();
            let whole = run_sftp(&events, 0);
            let mut tracker = SftpTracker::new();
            let mut split = split_feed(&events, &mut rng, |client, part| {
                if client {
                    tracker.from_client(part)
                } else {
                    tracker.from_server(part)
                }
            });
            let note = tracker.note().map(str::to_string);
            let ops = tracker.take_ops();
            split.extend(tracker.finish());
            assert_eq!(whole, (split, note, ops));
        }
    }

    #[test]
    fn fuzz_scp_pieces_equal_whole() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let tokens: &[&[u8]] = &[
            b"C0644 5 f\n",
            b"C0644 3 f\nabc\0",
            b"C0644 3 f\nabc\0",
            b"D0755 0 d\nC0644 2 g\nhi\0E\n",
            b"C0644 0 z\n",
            b"D0755 0 d\n",
            b"E\n",
            b"T1 0 1 0\n",
            b"\0",
            b"\x01oops\n",
            b"abc",
            b"C0644 99999999999999999999 x\n",
        ];
        for round in 0..400 {
            let direction = if round % 2 == 0 {
                Direction::Upload
            } else {
                Direction::Download
            };
            let count = rng.below(30);
            let events: Vec<Event> = (0..count)
                .map(|_| {
                    let client = rng.below(2) == 0;
                    if rng.below(40) == 0 {
                        (client, rng.bytes(50))
                    } else {
                        let n = rng.below(4) + 1;
                        let bytes = (0..n).flat_map(|_| rng.pick(tokens).to_vec()).collect();
                        (client, bytes)
                    }
                })
                .collect();
            let whole = run_scp(direction, &events, 0);
            let mut tracker = ScpTracker::new(direction, "/tmp/dest".to_string());
            let mut split = split_feed(&events, &mut rng, |client, part| {
                if client {
                    tracker.from_client(part)
                } else {
                    tracker.from_server(part)
                }
            });
            let note = tracker.note().map(str::to_string);
            split.extend(tracker.finish());
            assert_eq!(whole, (split, note));
        }
    }

    #[test]
    fn fuzz_pure_random_bytes_never_panic() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..200 {
            let mut sftp = SftpTracker::new();
            let mut scp = ScpTracker::new(Direction::Download, String::new());
            for _ in 0..rng.below(20) {
                let bytes = rng.bytes(200);
                if rng.below(2) == 0 {
                    sftp.from_client(&bytes);
                    scp.from_client(&bytes);
                } else {
                    sftp.from_server(&bytes);
                    scp.from_server(&bytes);
                }
            }
            sftp.finish();
            scp.finish();
        }
    }
}
