//! File-transfer tracking for scp and sftp (stub, replaced by the real tracker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Upload,
    Download,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub protocol: &'static str,
    pub direction: Direction,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub complete: bool,
}
#[derive(Default)]
pub struct SftpTracker;
impl SftpTracker {
    pub fn new() -> Self {
        Self
    }
    pub fn from_client(&mut self, _b: &[u8]) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn from_server(&mut self, _b: &[u8]) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn finish(self) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn note(&self) -> Option<&str> {
        None
    }
}
pub struct ScpTracker;
impl ScpTracker {
    pub fn new(_d: Direction, _p: String) -> Self {
        Self
    }
    pub fn from_client(&mut self, _b: &[u8]) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn from_server(&mut self, _b: &[u8]) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn finish(self) -> Vec<Transfer> {
        Vec::new()
    }
    pub fn note(&self) -> Option<&str> {
        None
    }
}
pub fn scp_direction(_c: &str) -> Option<(Direction, String)> {
    None
}
