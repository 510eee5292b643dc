// SPDX-License-Identifier: Apache-2.0
//! The Phase 1 file transport: `command.txt` / `response.txt` in a directory that the host
//! exports to its VMs over NFS (`/var/vgpu` by default).
//!
//! # Layout
//!
//! Each served directory is one tenant of the [`Mediator`]: either the single pair at the
//! root (`ROOT/command.txt`, `ROOT/response.txt`) or one directory per VM (`ROOT/vm1/`,
//! `ROOT/vm2/`, ...). The VMs are listed ([`NfsOptions::vms`]): exactly those directories
//! are served (created if missing, with the root's permissions). With no list, the pair at
//! the root is served: the single-VM layout.
//!
//! A directory a guest creates is not a tenant unless asked for: only with
//! [`NfsOptions::discover`] is every directory named `vm*` picked up as it appears, and
//! then at most [`NfsOptions::max_vms`] of them (further ones are ignored, with one warning
//! each). Each tenant costs a thread and, with CUDA, a worker process and a context.
//!
//! # Files
//!
//! The VM writes only `command.txt`; the mediator writes only `response.txt`. One writer
//! per file is what keeps the protocol sound over NFS, where two hosts writing the same
//! file see each other's bytes late and in pieces.
//!
//! - `command.txt`: one word and a newline. `1` vector-add validation on the executor
//!   (1024 elements), `2` device information, `0` reset. Anything else is answered
//!   `2:unknown command ...`.
//! - `response.txt`: one line `status:message`. `0:Ready` (nothing pending: written at
//!   start and after every reset), `1:<message>` success, `2:<message>` error. It is
//!   always replaced whole (a temporary file in the same directory, then a rename), so a
//!   reader sees the old line or the new one, never part of one. If anyone else replaces
//!   it, the mediator writes its line again.
//!
//! # When the mediator acts
//!
//! The mediator acts when the *text* of `command.txt` changes to a complete command:
//!
//! - `1`, `2` or an unknown word: run it once and write the answer. The same text written
//!   again does nothing: a command is executed once, however often its file is rewritten.
//!   An unknown word is echoed in the error line only when it is a short run of digits:
//!   nothing else a file holds is ever copied into `response.txt`.
//! - `0`: write `0:Ready`. This is how the same command is issued twice.
//! - A missing, empty or blank file is no command: it is what a writer looks like between
//!   truncating the file and writing it (over NFS that lasts until the client's close).
//! - Text without a trailing newline is taken once it has stayed the same for
//!   [`NfsOptions::settle`]: its writer may not be done (`1` could become `12`).
//! - Text is believed only when two reads in a row agree: a read that overlaps a write in
//!   place can return old and new bytes mixed.
//! - A command rewritten while it runs is not lost: when the run ends the file is read
//!   again. A different command there means the result is dropped and that command runs;
//!   the same text means the result is written.
//!
//! A client (`vgpu-nfs-client` does exactly this) therefore issues command `N` as:
//!
//! 1. If `response.txt` does not read status `0`, or `command.txt` holds anything but
//!    `0`, write `0` and poll `response.txt` until its status is `0`. Without this step
//!    the client could not tell the answer to its command from the previous one.
//! 2. Write `N` and a newline to `command.txt` (open, write, close).
//! 3. Poll `response.txt` (open, read, close) until its status is not `0`.
//!
//! The seed runbook's "write the command, poll until the status is not 0" is step 2 and
//! 3, and is all a client needs for the first command after the mediator starts. One
//! client per directory at a time: that is what the per-VM directories are for.
//!
//! # Over NFS
//!
//! Neither side maps the files. The Linux NFS client gives close-to-open consistency: each
//! `open` of `response.txt` revalidates it with the server, and since every response is a
//! new file (the rename), a client can never mix cached bytes of an old response with a new
//! one. The client's writes reach the server by the time its `close` returns. No special
//! mount options are needed. An NFS server may fail a read of `response.txt` that races
//! its replacement (nfs-ganesha answers NFS4ERR_SERVERFAULT, "Remote I/O error" to the
//! client): clients retry reads until their deadline.
//!
//! The mediator scans every directory at the poll interval (a handful of system calls per
//! directory, negligible when idle) and also wakes at once when inotify reports a local
//! change, which includes writes arriving through an NFS server on this host. Files are
//! reached relative to their directory's descriptor and never through a symbolic link or
//! a special file that a guest may have planted: `command.txt` is opened once with
//! `O_PATH | O_NOFOLLOW` (which opens nothing: no FIFO or device driver sees it), its type
//! and link count are checked on that descriptor, and only a regular file with one link is
//! then read, through that same descriptor (reopened by `/proc/self/fd`). A hard link, a
//! FIFO, a device node or a symbolic link is answered `2:...`, never read. The mediator
//! deletes nothing but its own temporary files.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vgpu_protocol::{Command, Request, Response, SelftestKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vgpu_mediator::{CompletionQueue, CompletionSink, Mediator, Placement, TenantConfig, TenantId};

/// The export directory when none is given.
pub const DEFAULT_ROOT: &str = "/var/vgpu";
/// Written by the VM.
pub const COMMAND_FILE: &str = "command.txt";
/// Written by the mediator.
pub const RESPONSE_FILE: &str = "response.txt";
/// The response when nothing is pending.
pub const READY_LINE: &str = "0:Ready";
/// Default interval between scans of the command files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Name of the endpoint (and tenant suffix) of the pair at the root.
pub const ROOT_ENDPOINT: &str = "root";
/// Longest command file read; longer ones are answered with an error.
pub const MAX_COMMAND_BYTES: usize = 256;
/// Default of [`NfsOptions::max_vms`].
pub const DEFAULT_MAX_VMS: usize = 16;
/// Default device-memory quota of each NFS VM: small, since anyone who can write a
/// command file gets one, yet room for the vector-add self-test, whose execution context
/// (about 500 MiB on a GPU) is charged to the VM like everything its work holds on the
/// device.
pub const DEFAULT_MEM_QUOTA: u64 = 1 << 30;
/// Longest unknown command echoed back (digits only).
const MAX_ECHOED_DIGITS: usize = 10;
/// Directories ignored over the cap that are named in a warning; beyond, one line says so.
const MAX_NAMED_IGNORED: usize = 1024;

/// Held in the root while a transport serves it, so that two cannot fight over it.
const LOCK_FILE: &str = ".vgpu-nfs.lock";
/// How long `stop` waits for commands still running.
const STOP_GRACE: Duration = Duration::from_secs(10);
const HELP: &str = "write 1 (vector-add validation) or 2 (device information)";

/// How the NFS transport runs.
#[derive(Clone, Debug)]
pub struct NfsOptions {
    /// The exported directory.
    pub root: PathBuf,
    /// VM directories to serve (`ROOT/<name>`). Empty: the pair at the root (unless
    /// `discover` finds VM directories, the single-VM layout).
    pub vms: Vec<String>,
    /// Also serve every `vm*` directory as it appears (and drop it when it goes), up to
    /// `max_vms` of them. Off by default: with it, whoever can create a directory in the
    /// root creates a tenant.
    pub discover: bool,
    /// With `discover`, the most directories served through discovery at once; more are
    /// ignored with one warning each.
    pub max_vms: usize,
    /// Interval between scans of the command files.
    pub poll_interval: Duration,
    /// How long text without a trailing newline must stay unchanged before it is taken.
    pub settle: Duration,
    /// Device memory each VM directory's tenant may allocate, in bytes.
    pub mem_quota: u64,
    /// Each tenant's share of device time.
    pub weight: u32,
    /// The GPU of VM directories by name (`""` for the pair at the root); the others are
    /// placed automatically ([`vgpu_mediator::Placement::Auto`]).
    pub placements: std::collections::BTreeMap<String, Placement>,
}

impl NfsOptions {
    /// Options for `root` with the defaults: the pair at the root, no discovery, 100 ms
    /// polling, 1 GiB quota.
    pub fn new(root: impl Into<PathBuf>) -> NfsOptions {
        NfsOptions {
            root: root.into(),
            vms: Vec::new(),
            discover: false,
            max_vms: DEFAULT_MAX_VMS,
            poll_interval: DEFAULT_POLL_INTERVAL,
            settle: DEFAULT_POLL_INTERVAL,
            mem_quota: DEFAULT_MEM_QUOTA,
            weight: 100,
            placements: Default::default(),
        }
    }

    /// Checks the VM list, the cap and the poll interval (not the root): what
    /// [`NfsServer::start`] checks before it touches anything.
    pub fn validate(&self) -> Result<(), NfsError> {
        let mut seen = HashSet::new();
        for vm in &self.vms {
            if !valid_vm_name(vm) {
                return Err(NfsError::InvalidVmName(vm.clone()));
            }
            if !seen.insert(vm.as_str()) {
                return Err(NfsError::DuplicateVm(vm.clone()));
            }
        }
        if self.discover && self.max_vms == 0 {
            return Err(NfsError::InvalidMaxVms);
        }
        if self.poll_interval < Duration::from_millis(1) {
            return Err(NfsError::InvalidPollInterval);
        }
        Ok(())
    }
}

/// Why the NFS transport did not start.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error("NFS root {} does not exist (create and export it first)", .0.display())]
    RootMissing(PathBuf),
    #[error("NFS root {} is not a directory", .0.display())]
    RootNotDirectory(PathBuf),
    #[error("cannot open NFS root {}", path.display())]
    RootUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("NFS root {} is not writable", path.display())]
    RootNotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another mediator already serves NFS root {}", .0.display())]
    RootBusy(PathBuf),
    #[error(
        "invalid VM directory name '{0}': use up to 64 letters, digits, '-', '_' or '.', \
         not starting with '.'"
    )]
    InvalidVmName(String),
    #[error("VM directory '{0}' is listed twice")]
    DuplicateVm(String),
    #[error("poll interval must be at least 1 ms")]
    InvalidPollInterval,
    #[error("the most VM directories to discover must be at least 1")]
    InvalidMaxVms,
    #[error("cannot prepare VM directory {}", path.display())]
    VmDirectory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    WriteResponse {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot add tenant {name}")]
    AddTenant {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the NFS transport")]
    Start(#[source] io::Error),
}

/// What a word in `command.txt` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileCommand {
    /// `0`: nothing pending; the mediator answers `0:Ready`.
    Reset,
    /// `1`: vector-add validation on the executor.
    VectorAdd,
    /// `2`: device information.
    DeviceInfo,
}

impl FileCommand {
    /// The command a (trimmed) word names, if any.
    pub fn parse(word: &str) -> Option<FileCommand> {
        match word {
            "0" => Some(FileCommand::Reset),
            "1" => Some(FileCommand::VectorAdd),
            "2" => Some(FileCommand::DeviceInfo),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            FileCommand::Reset => 0,
            FileCommand::VectorAdd => 1,
            FileCommand::DeviceInfo => 2,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            FileCommand::Reset => "reset",
            FileCommand::VectorAdd => "vector-add validation",
            FileCommand::DeviceInfo => "device information",
        }
    }
}

/// The `response.txt` line for a mediator response: `1:<message>` or `2:<message>`.
pub fn response_line(response: &Response) -> String {
    let text = one_line(&String::from_utf8_lossy(&response.data));
    if response.is_ok() {
        format!("1:{text}")
    } else if text.is_empty() {
        format!("2:mediator error {}", response.status.name())
    } else {
        format!("2:{text}")
    }
}

/// Whether `name` may be a VM directory: 1 to 64 of `[A-Za-z0-9._-]`, no leading dot.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether discovery serves a directory of this name: `vm` followed by a valid name's
/// characters (`vm1`, `vm2`, `vm-web`).
pub fn discoverable_vm_name(name: &str) -> bool {
    name.len() > 2 && name.starts_with("vm") && valid_vm_name(name)
}

/// The running transport. [`NfsServer::stop`] (or dropping it) lets commands in flight
/// finish, writes their answers and removes the transport's tenants from the mediator.
pub struct NfsServer {
    root: PathBuf,
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NfsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsServer")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

struct Shared {
    tenants: Mutex<BTreeMap<String, TenantId>>,
    passes: AtomicU64,
}

impl NfsServer {
    /// Checks the root, writes `0:Ready` in every directory served and starts serving on
    /// a thread of its own. Each directory becomes a tenant of `mediator`, which other
    /// transports may share.
    pub fn start(mediator: Arc<Mediator>, opts: NfsOptions) -> Result<NfsServer, NfsError> {
        opts.validate()?;
        let root = opts.root.clone();
        let root_dir = open_writable_root(&root)?;
        let lock = root_dir.lock(LOCK_FILE).map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                NfsError::RootBusy(root.clone())
            } else {
                NfsError::RootNotWritable {
                    path: root.clone(),
                    source,
                }
            }
        })?;
        let root_mode = root_dir.mode().map_err(|source| NfsError::RootUnreadable {
            path: root.clone(),
            source,
        })?;
        for vm in &opts.vms {
            root_dir
                .ensure_child_dir(vm, root_mode & 0o7777)
                .map_err(|source| NfsError::VmDirectory {
                    path: root.join(vm),
                    source,
                })?;
        }

        let shared = Arc::new(Shared {
            tenants: Mutex::new(BTreeMap::new()),
            passes: AtomicU64::new(0),
        });
        let completions = CompletionQueue::new().map_err(NfsError::Start)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(NfsError::Start)?);
        let inotify = match Inotify::new() {
            Ok(i) => Some(i),
            Err(e) => {
                log::warn!("inotify unavailable ({e}); changes are seen at the poll interval");
                None
            }
        };
        let mut server = Server {
            mediator,
            opts,
            endpoints: Vec::new(),
            completions,
            inotify,
            next_token: 1,
            shared: shared.clone(),
            refused: HashSet::new(),
            ignored: HashSet::new(),
            ignored_unnamed: false,
            root_trouble: None,
            _lock: lock,
        };
        let started = server.start_endpoints(&root_dir);
        if let Err(e) = started {
            server.remove_all();
            return Err(e);
        }
        let mut layout = if server.opts.vms.is_empty() {
            "the pair at the root".to_owned()
        } else {
            server.opts.vms.join(", ")
        };
        if server.opts.discover {
            layout.push_str(&format!(
                ", and up to {} vm* directories as they appear",
                server.opts.max_vms
            ));
        }
        log::info!(
            "NFS transport serving {} ({layout}), each VM with {} MiB of device memory, \
             scanning every {} ms",
            root.display(),
            server.opts.mem_quota >> 20,
            server.opts.poll_interval.as_millis()
        );
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nfs-transport".into())
            .spawn(move || server.run(&thread_stop))
            .map_err(NfsError::Start)?;
        Ok(NfsServer {
            root,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The exported directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The tenant serving a directory (`vm1`, or [`ROOT_ENDPOINT`] for the root pair).
    pub fn tenant(&self, name: &str) -> Option<TenantId> {
        self.shared.tenants().get(name).copied()
    }

    /// Every directory served now with its tenant.
    pub fn tenants(&self) -> Vec<(String, TenantId)> {
        self.shared
            .tenants()
            .iter()
            .map(|(n, t)| (n.clone(), *t))
            .collect()
    }

    /// Completed scans of every directory. A scan that completes after a change to a
    /// command file has looked at it: tests and monitoring wait on this.
    pub fn passes(&self) -> u64 {
        self.shared.passes.load(Ordering::Acquire)
    }

    /// Stops serving: commands in flight finish (for up to 10 s) and are answered, then
    /// the transport's tenants leave the mediator. Files stay as they are.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("cannot signal the NFS transport to stop: {e}");
            }
            if thread.join().is_err() {
                log::error!("the NFS transport thread panicked");
            }
        }
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn tenants(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TenantId>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Fails, saying why, unless `root` is an existing, writable directory: what
/// [`NfsServer::start`] checks first, for a caller that wants to fail before other work.
pub fn check_root(root: &Path) -> Result<(), NfsError> {
    open_writable_root(root).map(drop)
}

fn open_writable_root(root: &Path) -> Result<Dir, NfsError> {
    let dir = open_root(root)?;
    dir.probe_writable()
        .map_err(|source| NfsError::RootNotWritable {
            path: root.to_path_buf(),
            source,
        })?;
    Ok(dir)
}

fn open_root(root: &Path) -> Result<Dir, NfsError> {
    match std::fs::metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NfsError::RootMissing(root.to_path_buf()))
        }
        Err(source) => {
            return Err(NfsError::RootUnreadable {
                path: root.to_path_buf(),
                source,
            })
        }
        Ok(m) if !m.is_dir() => return Err(NfsError::RootNotDirectory(root.to_path_buf())),
        Ok(_) => {}
    }
    Dir::open(root).map_err(|source| NfsError::RootUnreadable {
        path: root.to_path_buf(),
        source,
    })
}

/// Why a `command.txt` is not a command: the message after `2:` in `response.txt`. It
/// never carries the file's text, except an unknown command that is a short run of ASCII
/// digits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum CommandError {
    /// An unknown command that may be echoed (1 to 10 ASCII digits).
    #[error("unknown command '{0}': {HELP}")]
    UnknownDigits(String),
    /// Any other unknown command: not echoed.
    #[error("unknown command: {HELP}")]
    Unknown,
    #[error("{COMMAND_FILE} is longer than {MAX_COMMAND_BYTES} bytes: {HELP}")]
    TooLong,
    #[error("{COMMAND_FILE} is not a regular file: {HELP}")]
    NotRegular,
    /// A regular file with more than one link (perhaps a host file linked in): not read.
    #[error("{COMMAND_FILE} has more than one link, so it is not read: {HELP}")]
    HardLinked,
}

/// The command as the mediator keys it: two reads are "the same command" when equal.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    /// The file's text without surrounding whitespace.
    Text(Vec<u8>),
    TooLong,
    NotRegular,
    /// A regular file with more than one link: perhaps a host file linked in. Not read.
    HardLinked,
}

impl Word {
    /// The command, or why it is none (see [`CommandError`]).
    fn action(&self) -> Result<FileCommand, CommandError> {
        match self {
            Word::Text(text) => std::str::from_utf8(text)
                .ok()
                .and_then(FileCommand::parse)
                .ok_or_else(|| match echoable(text) {
                    Some(digits) => CommandError::UnknownDigits(digits.to_string()),
                    None => CommandError::Unknown,
                }),
            Word::TooLong => Err(CommandError::TooLong),
            Word::NotRegular => Err(CommandError::NotRegular),
            Word::HardLinked => Err(CommandError::HardLinked),
        }
    }

    /// What the log says of it: the text escaped and cut (the host's log, not the VM's).
    fn logged(&self) -> String {
        match self {
            Word::Text(text) => format!("'{}'", shown(text)),
            Word::TooLong => "(too long)".to_owned(),
            Word::NotRegular => "(not a regular file)".to_owned(),
            Word::HardLinked => "(hard link)".to_owned(),
        }
    }
}

/// The text, when it may be echoed to the VM: 1 to 10 ASCII digits.
fn echoable(text: &[u8]) -> Option<&str> {
    let digits =
        !text.is_empty() && text.len() <= MAX_ECHOED_DIGITS && text.iter().all(u8::is_ascii_digit);
    digits.then(|| std::str::from_utf8(text).ok()).flatten()
}

/// What one read of `command.txt` found.
#[derive(Debug, PartialEq, Eq)]
enum Observed {
    /// Missing, empty or blank.
    Nothing,
    /// Being written: look again at the next scan.
    Changing,
    /// Text without its trailing newline, as read.
    Unterminated(Vec<u8>),
    Complete(Word),
}

fn observe(file: CommandFile) -> Observed {
    match file {
        CommandFile::Missing => Observed::Nothing,
        CommandFile::NotRegular => Observed::Complete(Word::NotRegular),
        CommandFile::HardLinked => Observed::Complete(Word::HardLinked),
        CommandFile::Changing => Observed::Changing,
        CommandFile::Contents(raw) if raw.len() > MAX_COMMAND_BYTES => {
            Observed::Complete(Word::TooLong)
        }
        CommandFile::Contents(raw) => {
            let text = raw.trim_ascii();
            if text.is_empty() {
                Observed::Nothing
            } else if raw.ends_with(b"\n") {
                Observed::Complete(Word::Text(text.to_vec()))
            } else {
                Observed::Unterminated(raw)
            }
        }
    }
}

/// Command text for the log: printable, one line, at most 40 characters.
fn shown(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let mut out: String = s.chars().take(40).flat_map(char::escape_debug).collect();
    if s.chars().count() > 40 {
        out.push_str("...");
    }
    out
}

fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Identifies the response file the mediator wrote, to notice anyone else's change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(st: &libc::stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }
}

enum CommandFile {
    Missing,
    NotRegular,
    HardLinked,
    /// Two reads in a row differed: being written right now.
    Changing,
    Contents(Vec<u8>),
}

/// Up to `MAX_COMMAND_BYTES + 1` bytes from the start of the file.
fn read_at_start(file: &File) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; MAX_COMMAND_BYTES + 1];
    let mut len = 0;
    while len < buf.len() {
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

fn cstring(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `Ok(v)` when `rc` >= 0, else the OS error.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn is_regular(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is read only after fstat succeeded.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Opens for I/O the regular file that `path` (an `O_PATH` descriptor, `st` its `fstat`)
/// refers to: that inode, through `/proc/self/fd`, never by name again. Refuses anything
/// but a regular file, so no FIFO or device is ever opened here.
fn reopen_regular(path: &OwnedFd, st: &libc::stat, flags: libc::c_int) -> io::Result<File> {
    if !is_regular(st.st_mode) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let link = cstring(&format!("/proc/self/fd/{}", path.as_raw_fd()))?;
    // SAFETY: a NUL-terminated path; the result is checked. No O_NOFOLLOW: the magic
    // link is the way to the descriptor's own inode (with it the open fails, ELOOP).
    let rc = unsafe {
        libc::open(
            link.as_ptr(),
            flags | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let fd = check(rc).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot reopen through /proc/self/fd (is /proc mounted?): {e}"),
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let now = fstat(file.as_raw_fd())?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) || !is_regular(now.st_mode) {
        return Err(io::Error::other("the file changed while it was opened"));
    }
    Ok(file)
}

/// A directory opened for one scan. Files in it are reached relative to its descriptor,
/// never through a symbolic link: a guest owns the directory's contents.
struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens a trusted path (the configured root), following symbolic links.
    fn open(path: &Path) -> io::Result<Dir> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)?;
        Ok(Dir { fd: file.into() })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// A subdirectory; a symbolic link in its place is refused (ELOOP).
    fn child(&self, name: &str) -> io::Result<Dir> {
        let c = cstring(name)?;
        // SAFETY: a valid descriptor, a NUL-terminated name; the result is checked.
        let fd = check(unsafe {
            libc::openat(
                self.raw(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd })
    }

    /// `lstat` of a name in the directory; `None` when it does not exist.
    fn stat(&self, name: &str) -> io::Result<Option<libc::stat>> {
        let c = cstring(name)?;
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is written by fstatat before it is read, on success only.
        let rc = unsafe {
            libc::fstatat(
                self.raw(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(rc) {
            // SAFETY: fstatat succeeded, so it filled `st`.
            Ok(_) => Ok(Some(unsafe { st.assume_init() })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn mode(&self) -> io::Result<u32> {
        let file = File::from(self.fd.try_clone()?);
        Ok(file.metadata()?.permissions().mode())
    }

    /// What is at `name`, looked at without opening it: `O_PATH | O_NOFOLLOW` opens no
    /// file (a FIFO gets no reader, a device's driver no open call, a symbolic link is
    /// the link itself), and `fstat` of that descriptor says what it is. `None`: nothing.
    fn open_path(&self, name: &str) -> io::Result<Option<(OwnedFd, libc::stat)>> {
        let c = cstring(name)?;
        // SAFETY: as in `child`.
        let rc = unsafe {
            libc::openat(
                self.raw(),
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        let fd = match check(rc) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(fd.as_raw_fd())?;
        Ok(Some((fd, st)))
    }

    /// Reads up to `MAX_COMMAND_BYTES + 1` bytes of `command.txt` if it is a regular file
    /// with one link. The file is looked up once ([`Dir::open_path`]); the checks and the
    /// read use that one descriptor, so nothing swapped in by name meanwhile is opened:
    /// links, FIFOs, device nodes and hard links are reported, never opened for reading.
    fn read_command(&self) -> io::Result<CommandFile> {
        let Some((path, st)) = self.open_path(COMMAND_FILE)? else {
            return Ok(CommandFile::Missing);
        };
        if !is_regular(st.st_mode) {
            return Ok(CommandFile::NotRegular);
        }
        match st.st_nlink {
            // Unlinked since the lookup: being replaced (a rename over it).
            0 => return Ok(CommandFile::Changing),
            1 => {}
            _ => return Ok(CommandFile::HardLinked),
        }
        let file = reopen_regular(&path, &st, libc::O_RDONLY)?;
        // A read that overlaps a write in place can return old and new bytes mixed
        // ("0\n" then "vm1-7\n" read as "0\n1-7\n"): only content read the same twice
        // in a row is believed.
        let first = read_at_start(&file)?;
        let second = read_at_start(&file)?;
        match fstat(file.as_raw_fd())?.st_nlink {
            0 => return Ok(CommandFile::Changing),
            1 => {}
            // Linked meanwhile: what was read is not trusted either.
            _ => return Ok(CommandFile::HardLinked),
        }
        if second != first {
            return Ok(CommandFile::Changing);
        }
        Ok(CommandFile::Contents(first))
    }

    /// Creates a file of our own that nobody else has a name for yet.
    fn create_private(&self, stem: &str) -> io::Result<(CString, File)> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let mut tries = 0;
        loop {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let name = cstring(&format!(".{stem}.{pid}.{seq}.tmp"))?;
            // SAFETY: as in `child`; O_EXCL | O_NOFOLLOW: never a file someone planted.
            let rc = unsafe {
                libc::openat(
                    self.raw(),
                    name.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                )
            };
            match check(rc) {
                // SAFETY: `fd` was just opened and is owned by nobody else.
                Ok(fd) => return Ok((name, unsafe { File::from_raw_fd(fd) })),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn unlink(&self, name: &CString) {
        // SAFETY: a valid descriptor and a NUL-terminated name of a file we created.
        unsafe { libc::unlinkat(self.raw(), name.as_ptr(), 0) };
    }

    /// Replaces `name` whole: a temporary file in this directory, then a rename.
    fn replace(&self, name: &str, contents: &[u8]) -> io::Result<FileId> {
        let target = cstring(name)?;
        let (tmp, mut file) = self.create_private(name)?;
        let written = (|| {
            // Readable by a squashed NFS client whatever the umask.
            file.set_permissions(Permissions::from_mode(0o644))?;
            file.write_all(contents)?;
            let mut st = MaybeUninit::<libc::stat>::uninit();
            // SAFETY: `st` is read only after fstat succeeded.
            check(unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) })?;
            // SAFETY: fstat succeeded, so it filled `st`.
            let id = FileId::of(&unsafe { st.assume_init() });
            drop(file);
            // SAFETY: a valid descriptor and NUL-terminated names.
            check(unsafe {
                libc::renameat(self.raw(), tmp.as_ptr(), self.raw(), target.as_ptr())
            })?;
            Ok(id)
        })();
        if written.is_err() {
            self.unlink(&tmp);
        }
        written
    }

    /// Fails unless a file can be created in the directory (and removes that file).
    fn probe_writable(&self) -> io::Result<()> {
        let (name, file) = self.create_private("vgpu-probe")?;
        drop(file);
        self.unlink(&name);
        Ok(())
    }

    /// Opens (creating if needed) and exclusively locks a file; `WouldBlock` when held.
    /// An existing one is opened only if it is a regular file (see [`Dir::open_path`]).
    fn lock(&self, name: &str) -> io::Result<File> {
        let c = cstring(name)?;
        // SAFETY: as in `child`. O_EXCL: a new file of our own, or nothing.
        let rc = unsafe {
            libc::openat(
                self.raw(),
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        let file = match check(rc) {
            // SAFETY: `fd` was just opened and is owned by nobody else.
            Ok(fd) => unsafe { File::from_raw_fd(fd) },
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let (path, st) = self
                    .open_path(name)?
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                if !is_regular(st.st_mode) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{name} is not a regular file"),
                    ));
                }
                reopen_regular(&path, &st, libc::O_RDWR)?
            }
            Err(e) => return Err(e),
        };
        // SAFETY: flock on a descriptor we own.
        check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) })?;
        Ok(file)
    }

    /// Makes sure a subdirectory exists (not a link), creating it with `mode`.
    fn ensure_child_dir(&self, name: &str, mode: u32) -> io::Result<()> {
        match self.child(name) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it is a symbolic link, which the mediator does not follow",
                ))
            }
            Err(e) => return Err(e),
        }
        let c = cstring(name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        check(unsafe { libc::mkdirat(self.raw(), c.as_ptr(), 0o700) })?;
        let dir = self.child(name)?;
        // The root's permissions, umask aside: a squashed client needs what the root has.
        // SAFETY: fchmod on a descriptor we own.
        check(unsafe { libc::fchmod(dir.raw(), mode as libc::mode_t) })?;
        Ok(())
    }
}

/// Wakes the transport when something changes in a watched directory.
struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    const MASK: u32 = libc::IN_CLOSE_WRITE
        | libc::IN_MODIFY
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_ONLYDIR;

    fn new() -> io::Result<Inotify> {
        // SAFETY: no pointers; the result is checked.
        let fd = check(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inotify { fd })
    }

    /// Watches a directory. Watching one already watched is a no-op, and the kernel drops
    /// the watch of a directory that goes away, so this is simply repeated every scan.
    fn watch(&self, path: &Path, follow: bool) {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return;
        };
        let mask = if follow {
            Self::MASK
        } else {
            Self::MASK | libc::IN_DONT_FOLLOW
        };
        // SAFETY: a valid descriptor and a NUL-terminated path. A failure only means no
        // early wake-ups for that directory.
        unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
    }

    /// Reads every pending event; true when one concerns something other than the
    /// transport's own response files.
    fn drain(&self) -> bool {
        let mut relevant = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return relevant;
            }
            let mut events = &buf[..n as usize];
            // struct inotify_event: wd, mask, cookie, len (4 bytes each), then the name.
            while events.len() >= 16 {
                let field =
                    |i: usize| u32::from_ne_bytes(events[i..i + 4].try_into().expect("4 bytes"));
                let mask = field(4);
                let len = field(12) as usize;
                let end = (16 + len).min(events.len());
                let name = &events[16..end];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                let ours = name == RESPONSE_FILE.as_bytes() || name.starts_with(b".response.txt.");
                relevant |= !ours || mask & libc::IN_Q_OVERFLOW != 0;
                events = &events[end..];
            }
        }
    }
}

/// One served directory: the state machine of the module documentation.
struct Endpoint {
    /// `root` or the VM directory's name.
    name: String,
    /// `None`: the pair at the root.
    dir: Option<String>,
    /// Named with `--vm`: kept even while its directory is missing.
    listed: bool,
    tenant: TenantId,
    token: u64,
    /// The command last acted on; the same text again is not a new command.
    last: Option<Word>,
    /// Submitted to the mediator, not answered yet.
    running: Option<Word>,
    /// Text without its newline and when it was first read so.
    unterminated: Option<(Vec<u8>, Instant)>,
    /// What `response.txt` must read (without the newline).
    line: String,
    /// The response file as written, `None` until it is.
    written: Option<FileId>,
    /// `line` has not been written since it changed.
    fresh: bool,
    /// The last problem logged, so one that persists is logged once.
    trouble: Option<String>,
}

impl Endpoint {
    fn open(&self, root: &Dir) -> io::Result<Dir> {
        match &self.dir {
            None => root.try_clone(),
            Some(name) => root.child(name),
        }
    }

    fn set_line(&mut self, line: String) {
        self.line = line;
        self.fresh = true;
        self.written = None;
    }

    fn trouble(&mut self, what: String) {
        if self.trouble.as_ref() != Some(&what) {
            log::error!("nfs {}: {what}", self.name);
            self.trouble = Some(what);
        }
    }

    /// The command to act on now, if one is complete (see [`NfsOptions::settle`]).
    fn settled(&mut self, observed: Observed, settle: Duration, now: Instant) -> Option<Word> {
        match observed {
            Observed::Nothing => {
                self.unterminated = None;
                None
            }
            Observed::Changing => None,
            Observed::Complete(word) => {
                self.unterminated = None;
                Some(word)
            }
            Observed::Unterminated(raw) => {
                let since = match &self.unterminated {
                    Some((seen, since)) if *seen == raw => *since,
                    _ => now,
                };
                let word = Word::Text(raw.trim_ascii().to_vec());
                self.unterminated = Some((raw, since));
                (now.duration_since(since) >= settle).then_some(word)
            }
        }
    }

    /// Writes `line` unless `response.txt` still is the file written last. A response
    /// someone else replaced is written again; one someone deleted (an administrator
    /// clearing the directory away) is left alone until the next answer.
    fn keep_response(&mut self, dir: &Dir) {
        if let Some(written) = self.written {
            match dir.stat(RESPONSE_FILE) {
                Ok(Some(st)) if FileId::of(&st) == written => return,
                Ok(None) => return,
                _ => {}
            }
        }
        let contents = format!("{}\n", self.line);
        match dir.replace(RESPONSE_FILE, contents.as_bytes()) {
            Ok(id) => {
                if self.fresh {
                    log::info!("nfs {}: response sent: {}", self.name, self.line);
                } else if self.trouble.is_none() {
                    log::warn!(
                        "nfs {}: {RESPONSE_FILE} was changed by someone else; rewrote it",
                        self.name
                    );
                }
                self.written = Some(id);
                self.fresh = false;
                if self.trouble.take().is_some() {
                    log::info!("nfs {}: {RESPONSE_FILE} written again", self.name);
                }
            }
            Err(e) => self.trouble(format!("cannot write {RESPONSE_FILE}: {e}")),
        }
    }
}

/// The transport's thread.
struct Server {
    mediator: Arc<Mediator>,
    opts: NfsOptions,
    endpoints: Vec<Endpoint>,
    completions: Arc<CompletionQueue>,
    inotify: Option<Inotify>,
    next_token: u64,
    shared: Arc<Shared>,
    /// Discovered directories whose tenant could not be added (logged once).
    refused: HashSet<String>,
    /// Directories ignored because discovery reached `max_vms`, each warned about once
    /// (at most `MAX_NAMED_IGNORED` remembered, then one line for all further ones).
    ignored: HashSet<String>,
    ignored_unnamed: bool,
    root_trouble: Option<String>,
    _lock: File,
}

impl Server {
    /// The endpoints served from the start; each writes `0:Ready` before `start` returns.
    fn start_endpoints(&mut self, root: &Dir) -> Result<(), NfsError> {
        let fixed: Vec<(Option<String>, bool)> = if self.opts.vms.is_empty() {
            vec![(None, false)]
        } else {
            self.opts
                .vms
                .iter()
                .map(|v| (Some(v.clone()), true))
                .collect()
        };
        for (dir, listed) in fixed {
            let name = dir.clone().unwrap_or_else(|| ROOT_ENDPOINT.to_owned());
            let index = self.add_endpoint(name.clone(), dir.clone(), listed)?;
            let ep = &mut self.endpoints[index];
            let opened = ep.open(root);
            let written = opened.and_then(|d| d.replace(RESPONSE_FILE, b"0:Ready\n"));
            match written {
                Ok(id) => {
                    ep.written = Some(id);
                    ep.fresh = false;
                }
                Err(source) => {
                    let base = self.opts.root.join(dir.unwrap_or_default());
                    return Err(NfsError::WriteResponse {
                        path: base.join(RESPONSE_FILE),
                        source,
                    });
                }
            }
        }
        if self.opts.discover {
            self.discover(root);
        }
        Ok(())
    }

    fn add_endpoint(
        &mut self,
        name: String,
        dir: Option<String>,
        listed: bool,
    ) -> Result<usize, NfsError> {
        let placement = self.opts.placements.get(&name).copied().unwrap_or_default();
        let tenant = self
            .mediator
            .add_tenant_on(
                TenantConfig {
                    name: format!("nfs:{name}"),
                    mem_quota: self.opts.mem_quota,
                    weight: self.opts.weight,
                },
                placement,
            )
            .map_err(|source| NfsError::AddTenant {
                name: name.clone(),
                source,
            })?;
        self.shared.tenants().insert(name.clone(), tenant);
        let token = self.next_token;
        self.next_token += 1;
        self.endpoints.push(Endpoint {
            name,
            dir,
            listed,
            tenant,
            token,
            last: None,
            running: None,
            unterminated: None,
            line: READY_LINE.to_owned(),
            written: None,
            fresh: true,
            trouble: None,
        });
        Ok(self.endpoints.len() - 1)
    }

    fn remove_endpoint(&mut self, index: usize) {
        let ep = self.endpoints.swap_remove(index);
        self.shared.tenants().remove(&ep.name);
        self.mediator.remove_tenant(ep.tenant);
    }

    fn remove_all(&mut self) {
        while !self.endpoints.is_empty() {
            self.remove_endpoint(self.endpoints.len() - 1);
        }
    }

    /// Serves new `vm*` directories, up to `max_vms` discovered at once, and lets go of
    /// those that are gone.
    fn discover(&mut self, root: &Dir) {
        let entries = match std::fs::read_dir(&self.opts.root) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("cannot list {}: {e}", self.opts.root.display());
                return;
            }
        };
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // file_type does not follow links: a link named vm9 is not served.
            if !discoverable_vm_name(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            present.insert(name);
        }
        let mut i = 0;
        while i < self.endpoints.len() {
            let ep = &self.endpoints[i];
            let gone = ep.dir.as_ref().is_some_and(|d| !present.contains(d));
            if gone && !ep.listed && ep.running.is_none() {
                log::info!("nfs {}: directory gone; tenant removed", ep.name);
                self.remove_endpoint(i);
            } else {
                i += 1;
            }
        }
        let mut new: Vec<String> = present
            .into_iter()
            .filter(|n| !self.endpoints.iter().any(|e| e.dir.as_ref() == Some(n)))
            .collect();
        new.sort();
        let mut served = self
            .endpoints
            .iter()
            .filter(|e| e.dir.is_some() && !e.listed)
            .count();
        for name in new {
            if served >= self.opts.max_vms {
                self.ignore(name);
                continue;
            }
            match self.add_endpoint(name.clone(), Some(name.clone()), false) {
                Ok(index) => {
                    served += 1;
                    log::info!("nfs {name}: new VM directory");
                    self.refused.remove(&name);
                    if let Ok(dir) = self.endpoints[index].open(root) {
                        self.endpoints[index].keep_response(&dir);
                    }
                }
                Err(e) => {
                    if self.refused.insert(name.clone()) {
                        log::error!("nfs {name}: {e}");
                    }
                }
            }
        }
    }

    /// A discovered directory beyond `max_vms`: warned about once, never served (unless
    /// a served one goes away and frees its place).
    fn ignore(&mut self, name: String) {
        if self.ignored.contains(&name) || self.ignored_unnamed {
            return;
        }
        if self.ignored.len() >= MAX_NAMED_IGNORED {
            log::warn!(
                "nfs: more VM directories in {} beyond the cap of {} are ignored; no \
                 further ones are named",
                self.opts.root.display(),
                self.opts.max_vms
            );
            self.ignored_unnamed = true;
            return;
        }
        log::warn!(
            "nfs: ignoring VM directory {}: {} discovered directories are served already \
             (the most allowed; list VMs explicitly, or raise the cap)",
            self.opts.root.join(&name).display(),
            self.opts.max_vms
        );
        self.ignored.insert(name);
    }

    fn run(mut self, stop: &EventFd) {
        let poll = self.opts.poll_interval;
        let mut next_pass = Instant::now();
        loop {
            let timeout = next_pass.saturating_duration_since(Instant::now());
            let (stopping, changed) = self.wait(stop, timeout);
            if stopping {
                break;
            }
            for (token, response) in self.completions.drain() {
                self.finish(token, response);
            }
            let changed = changed && self.inotify.as_ref().is_some_and(Inotify::drain);
            if changed || Instant::now() >= next_pass {
                self.pass();
                next_pass = Instant::now() + poll;
            }
        }
        self.shutdown();
    }

    /// Sleeps until `timeout`, a stop, a completion or a change. Returns (stop, change).
    fn wait(&self, stop: &EventFd, timeout: Duration) -> (bool, bool) {
        let fd = |raw: RawFd| libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            fd(stop.as_raw_fd()),
            fd(self.completions.eventfd().as_raw_fd()),
            fd(self.inotify.as_ref().map_or(-1, |i| i.fd.as_raw_fd())),
        ];
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: a valid array of pollfd and its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return (false, false);
        }
        (fds[0].revents != 0, fds[2].revents != 0)
    }

    /// Looks at every served directory once.
    fn pass(&mut self) {
        let root = match Dir::open(&self.opts.root) {
            Ok(root) => {
                if self.root_trouble.take().is_some() {
                    log::info!("NFS root {} is back", self.opts.root.display());
                }
                root
            }
            Err(e) => {
                let what = format!("cannot open NFS root {}: {e}", self.opts.root.display());
                if self.root_trouble.as_ref() != Some(&what) {
                    log::error!("{what}");
                    self.root_trouble = Some(what);
                }
                return;
            }
        };
        if let Some(inotify) = &self.inotify {
            inotify.watch(&self.opts.root, true);
        }
        if self.opts.discover {
            self.discover(&root);
        }
        let now = Instant::now();
        for i in 0..self.endpoints.len() {
            self.scan(i, &root, now);
        }
        self.shared.passes.fetch_add(1, Ordering::AcqRel);
    }

    fn scan(&mut self, index: usize, root: &Dir, now: Instant) {
        let ep = &mut self.endpoints[index];
        let dir = match ep.open(root) {
            Ok(dir) => dir,
            Err(e) => {
                let path = self.opts.root.join(ep.dir.as_deref().unwrap_or_default());
                ep.trouble(format!("cannot open {}: {e}", path.display()));
                return;
            }
        };
        if let (Some(inotify), Some(name)) = (&self.inotify, &ep.dir) {
            inotify.watch(&self.opts.root.join(name), false);
        }
        if ep.running.is_none() {
            match dir.read_command() {
                Ok(file) => {
                    let word = ep.settled(observe(file), self.opts.settle, now);
                    if let Some(word) = word.filter(|w| ep.last.as_ref() != Some(w)) {
                        act(ep, word, &self.mediator, &self.completions);
                    }
                }
                Err(e) => ep.trouble(format!("cannot read {COMMAND_FILE}: {e}")),
            }
        }
        ep.keep_response(&dir);
    }

    /// A command finished: answer it, unless the VM has asked something else meanwhile.
    fn finish(&mut self, token: u64, response: Response) {
        let Some(ep) = self.endpoints.iter_mut().find(|e| e.token == token) else {
            return;
        };
        let Some(ran) = ep.running.take() else {
            return;
        };
        let dir = Dir::open(&self.opts.root).and_then(|root| ep.open(&root));
        let now = match dir.as_ref().map(Dir::read_command) {
            Ok(Ok(file)) => match observe(file) {
                Observed::Complete(word) => Some(word),
                _ => None,
            },
            _ => None,
        };
        match now {
            Some(word) if word != ran => {
                log::info!(
                    "nfs {}: {COMMAND_FILE} changed while the command ran; answering the new one",
                    ep.name
                );
                ep.unterminated = None;
                act(ep, word, &self.mediator, &self.completions);
            }
            _ => ep.set_line(response_line(&response)),
        }
        match dir {
            Ok(dir) => ep.keep_response(&dir),
            Err(e) => ep.trouble(format!("cannot open the directory to answer: {e}")),
        }
    }

    fn shutdown(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        while self.endpoints.iter().any(|e| e.running.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut fds = [libc::pollfd {
                fd: self.completions.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: a valid array of one pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            for (token, response) in self.completions.drain() {
                self.finish(token, response);
            }
        }
        let mut i = 0;
        while i < self.endpoints.len() {
            if self.endpoints[i].running.is_some() {
                log::warn!(
                    "nfs {}: command still running at stop; left unanswered",
                    self.endpoints[i].name
                );
                i += 1;
            } else {
                self.remove_endpoint(i);
            }
        }
        log::info!("NFS transport stopped");
    }
}

/// Acts on a command that differs from the last one.
fn act(ep: &mut Endpoint, word: Word, mediator: &Mediator, sink: &Arc<CompletionQueue>) {
    ep.last = Some(word.clone());
    match word.action() {
        Ok(FileCommand::Reset) => {
            log::info!("nfs {}: received command 0 (reset)", ep.name);
            ep.set_line(READY_LINE.to_owned());
        }
        Ok(command) => {
            log::info!(
                "nfs {}: received command {} ({})",
                ep.name,
                command.code(),
                command.describe()
            );
            let test = if command == FileCommand::VectorAdd {
                SelftestKind::VectorAdd
            } else {
                SelftestKind::DeviceInfo
            };
            ep.running = Some(word);
            let sink: Arc<dyn CompletionSink> = sink.clone();
            mediator.submit(
                ep.tenant,
                Request::new(0, Command::Selftest { test }),
                ep.token,
                sink,
            );
        }
        Err(message) => {
            log::warn!(
                "nfs {}: {message} ({COMMAND_FILE}: {})",
                ep.name,
                word.logged()
            );
            ep.set_line(format!("2:{message}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(s: &str) -> Observed {
        observe(CommandFile::Contents(s.as_bytes().to_vec()))
    }

    fn text(s: &str) -> Observed {
        Observed::Complete(Word::Text(s.as_bytes().to_vec()))
    }

    #[test]
    fn blank_files_are_no_command_and_whitespace_around_a_word_is_ignored() {
        assert_eq!(observe(CommandFile::Missing), Observed::Nothing);
        assert_eq!(contents(""), Observed::Nothing);
        assert_eq!(contents(" \n\r\n"), Observed::Nothing);
        assert_eq!(contents("1\n"), text("1"));
        assert_eq!(contents("  2 \r\n"), text("2"));
        assert_eq!(contents("1"), Observed::Unterminated(b"1".to_vec()));
        assert_eq!(
            contents(&"7".repeat(MAX_COMMAND_BYTES + 1)),
            Observed::Complete(Word::TooLong)
        );
    }

    #[test]
    fn words_map_to_commands_and_anything_else_to_a_clear_error() {
        let w = |s: &str| {
            Word::Text(s.as_bytes().to_vec())
                .action()
                .map_err(|e| e.to_string())
        };
        assert_eq!(w("0"), Ok(FileCommand::Reset));
        assert_eq!(w("1"), Ok(FileCommand::VectorAdd));
        assert_eq!(w("2"), Ok(FileCommand::DeviceInfo));
        // Only a short run of digits is echoed: nothing else a file holds reaches the VM.
        assert_eq!(w("01"), Err(format!("unknown command '01': {HELP}")));
        assert_eq!(
            w("1234567890"),
            Err(format!("unknown command '1234567890': {HELP}"))
        );
        for hidden in [
            "hello",
            "1\n2",
            "1 2",
            "-1",
            "12345678901",
            "host secret: 12345",
        ] {
            assert_eq!(
                w(hidden),
                Err(format!("unknown command: {HELP}")),
                "{hidden:?}"
            );
        }
        assert_eq!(
            Word::NotRegular.action().unwrap_err().to_string(),
            format!("command.txt is not a regular file: {HELP}")
        );
        assert!(Word::HardLinked
            .action()
            .unwrap_err()
            .to_string()
            .contains("more than one link"));
        assert_eq!(Word::TooLong.action(), Err(CommandError::TooLong));
        assert_eq!(
            CommandError::TooLong.to_string(),
            format!("command.txt is longer than 256 bytes: {HELP}")
        );
        // The host's log still says what it was, escaped and cut.
        let long = "x".repeat(50);
        assert_eq!(
            Word::Text(long.into_bytes()).logged(),
            format!("'{}...'", "x".repeat(40))
        );
        assert_eq!(Word::Text(b"1\n2".to_vec()).logged(), "'1\\n2'");
    }

    #[test]
    fn unterminated_text_is_taken_only_after_it_stays_the_same_for_the_settle_time() {
        let mut ep = Endpoint {
            name: "t".into(),
            dir: None,
            listed: false,
            tenant: TenantId(1),
            token: 1,
            last: None,
            running: None,
            unterminated: None,
            line: READY_LINE.into(),
            written: None,
            fresh: false,
            trouble: None,
        };
        let t0 = Instant::now();
        let settle = Duration::from_secs(10);
        let raw = |s: &str| Observed::Unterminated(s.as_bytes().to_vec());
        assert_eq!(ep.settled(raw("1"), settle, t0), None);
        assert_eq!(
            ep.settled(raw("1"), settle, t0 + Duration::from_secs(9)),
            None
        );
        // Changed: the clock starts again.
        assert_eq!(
            ep.settled(raw("12"), settle, t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            ep.settled(raw("12"), settle, t0 + Duration::from_secs(21)),
            Some(Word::Text(b"12".to_vec()))
        );
        assert_eq!(
            ep.settled(text("1"), settle, t0),
            Some(Word::Text(b"1".to_vec()))
        );
    }

    #[test]
    fn responses_are_one_status_line() {
        let ok = Response::data(b"Vector add PASSED: 1024 elements\n".to_vec());
        assert_eq!(response_line(&ok), "1:Vector add PASSED: 1024 elements");
        let failed = Response {
            data: b"Vector add FAILED:\n3 errors".to_vec(),
            ..Response::error(vgpu_protocol::Status::LaunchFailed, 0)
        };
        assert_eq!(response_line(&failed), "2:Vector add FAILED: 3 errors");
        let lost = Response::error(vgpu_protocol::Status::DeviceLost, 0);
        assert_eq!(response_line(&lost), "2:mediator error DEVICE_LOST");
    }

    #[test]
    fn vm_names_are_plain_directory_names() {
        assert!(valid_vm_name("vm1"));
        assert!(valid_vm_name("web-01.prod"));
        for bad in ["", ".", "..", ".hidden", "a/b", "vm 1", &"v".repeat(65)] {
            assert!(!valid_vm_name(bad), "{bad:?}");
        }
        assert!(discoverable_vm_name("vm2"));
        assert!(!discoverable_vm_name("vm"));
        assert!(!discoverable_vm_name("data"));
    }
}
