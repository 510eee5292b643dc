// SPDX-License-Identifier: Apache-2.0
//! The secure link between a mediator and a worker host: addresses, connections (TCP and
//! vsock), pre-shared keys, the Noise handshake and encrypted framing.
//!
//! **Handshake.** The mediator (initiator) opens with one cleartext hello —
//! [`MAGIC`], its link version (`u32` LE), its name (a `u8` length and the bytes), then
//! the first Noise message (`u16` LE length and bytes) — and the worker answers with one
//! byte: 0 and the second Noise message (`u16` LE length and bytes), or 1 and a refusal
//! (`u16` LE length and UTF-8 text: another version, an unknown name, a wrong key, a
//! full worker). The Noise pattern is `NNpsk0` with X25519, AES-256-GCM and SHA-256: the
//! key the worker holds for the mediator's name is mixed in before the first message, so
//! only a peer holding the same key can produce or read anything after the hello, and
//! the ephemeral Diffie-Hellman gives every connection fresh keys (forward secrecy).
//! The hello is the Noise prologue, so a tampered hello fails the handshake. The second
//! message carries the worker's [`super::wire::WorkerHello`], encrypted.
//!
//! **Records.** After the handshake each direction is a sequence of records: a `u16` LE
//! length, then that many bytes of AES-GCM ciphertext with its 16-byte tag (at most
//! 65,535 bytes in all), under a per-direction counter nonce. A message is a `u32` LE
//! length and that many bytes of postcard, cut into records; the receiver refuses a
//! message longer than its limit before it allocates anything for it, and a record that
//! does not authenticate ends the connection.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

/// The first bytes a mediator sends.
pub const MAGIC: [u8; 8] = *b"VGPU-RX\0";
/// The link and message version this build speaks. A worker refuses a mediator of another
/// version, and says which it speaks.
pub const LINK_VERSION: u32 = 1;
/// The Noise protocol of the handshake.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bytes of a pre-shared key.
pub const KEY_BYTES: usize = 32;
/// Longest peer name.
pub const MAX_NAME: usize = 64;
/// Default TCP port of a worker.
pub const DEFAULT_PORT: u16 = 7701;
/// Default key file of a mediator (its name and key).
pub const DEFAULT_MEDIATOR_KEY: &str = "/etc/vgpu/remote.key";
/// Default key file of a worker (one line per mediator it serves).
pub const DEFAULT_WORKER_KEYS: &str = "/etc/vgpu/worker.keys";
/// How long a handshake may take, each side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest record (ciphertext and tag).
const MAX_RECORD: usize = 65_535;
const TAG: usize = 16;
/// Largest plaintext of one record.
const RECORD_PLAIN: usize = MAX_RECORD - TAG;
/// Longest Noise handshake message we send or accept.
const MAX_HANDSHAKE: usize = 4096;

// ---------------------------------------------------------------------------------------
// Addresses

/// vsock's "any" address for listening, and the host's CID.
pub const VMADDR_CID_ANY: u32 = u32::MAX;
pub const VMADDR_CID_HOST: u32 = 2;

/// Where a worker listens or is reached: `HOST:PORT` (TCP; `tcp:` may precede it; an
/// IPv6 host in brackets) or `vsock:CID:PORT` (`vsock:any:PORT` to listen on every CID).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Vsock { cid: u32, port: u32 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Vsock { cid, port } if *cid == VMADDR_CID_ANY => {
                write!(f, "vsock:any:{port}")
            }
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        let bad = |why: &str| format!("'{s}': {why} (expected HOST:PORT or vsock:CID:PORT)");
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| bad("no port"))?;
            let cid = if cid == "any" {
                VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| bad("the CID is not a number"))?
            };
            let port = port.parse().map_err(|_| bad("the port is not a number"))?;
            return Ok(Endpoint::Vsock { cid, port });
        }
        let rest = s.strip_prefix("tcp:").unwrap_or(s);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, port) = v6.split_once("]:").ok_or_else(|| bad("no port"))?;
            (host, port)
        } else {
            rest.rsplit_once(':').ok_or_else(|| bad("no port"))?
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        Ok(Endpoint::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Keys

/// A pre-shared key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_BYTES]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> io::Result<Key> {
        let mut k = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut k).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Key(k))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(s: &str) -> Option<Key> {
        if s.len() != KEY_BYTES * 2 || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(k))
    }
}

/// Whether `name` may name a peer: 1 to [`MAX_NAME`] of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A key file: lines `NAME KEY` (the key as 64 hex digits), `#` comments and blank lines.
/// A mediator's file has one line (its own name and key); a worker's has one per
/// mediator it serves. The file must not be readable by group or others.
#[derive(Clone, Debug, Default)]
pub struct KeyFile {
    entries: Vec<(String, Key)>,
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct KeyFileError {
    pub path: PathBuf,
    pub why: String,
}

impl KeyFile {
    pub fn load(path: &Path) -> Result<KeyFile, KeyFileError> {
        let err = |why: String| KeyFileError {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!(
                "readable or writable by group or others (mode {:o}); chmod 600 it",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > 1 << 20 {
            return Err(err("larger than 1 MiB".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        KeyFile::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<KeyFile, String> {
        let mut entries: Vec<(String, Key)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(key), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {}: expected NAME KEY", n + 1));
            };
            if !valid_name(name) {
                return Err(format!(
                    "line {}: the name must be 1 to {MAX_NAME} of A-Z a-z 0-9 . _ -",
                    n + 1
                ));
            }
            let key = Key::from_hex(key)
                .ok_or_else(|| format!("line {}: the key must be 64 hex digits", n + 1))?;
            if entries.iter().any(|(e, _)| e == name) {
                return Err(format!("line {}: '{name}' appears twice", n + 1));
            }
            entries.push((name.to_string(), key));
        }
        if entries.is_empty() {
            return Err(
                "no keys (expected lines NAME KEY; vgpu-worker keygen NAME makes one)".into(),
            );
        }
        Ok(KeyFile { entries })
    }

    /// The single identity of a mediator's key file.
    pub fn identity(&self) -> Result<(String, Key), String> {
        match self.entries.as_slice() {
            [(name, key)] => Ok((name.clone(), key.clone())),
            _ => Err(format!(
                "a mediator's key file holds exactly one NAME KEY line, this one {}",
                self.entries.len()
            )),
        }
    }

    /// The keys by name, for a worker.
    pub fn by_name(&self) -> HashMap<String, Key> {
        self.entries.iter().cloned().collect()
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Connections

/// A connected stream socket (TCP or vsock).
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
    peer: String,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: `v` lives across the call and its size is passed.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

impl Conn {
    /// Connects to `endpoint` within [`CONNECT_TIMEOUT`] per address.
    pub fn connect(endpoint: &Endpoint) -> io::Result<Conn> {
        match endpoint {
            Endpoint::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => return Ok(Conn::from_tcp(s, addr)),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Endpoint::Vsock { cid, port } => {
                // SAFETY: plain socket creation; the fd is owned below.
                let fd = cvt(unsafe {
                    libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
                })?;
                // SAFETY: `fd` was just created and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let a = vsock_addr(*cid, *port);
                // SAFETY: `a` is a valid sockaddr_vm of the size passed.
                cvt(unsafe {
                    libc::connect(
                        fd.as_raw_fd(),
                        (&a as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                })?;
                Ok(Conn {
                    fd,
                    peer: endpoint.to_string(),
                })
            }
        }
    }

    /// A TCP connection with the options every link uses: no Nagle delay, and a dead peer
    /// found within about six seconds: keepalive probes after 2 s idle, 1 s apart, and
    /// data or probes unacknowledged for 6 s end the connection (`TCP_USER_TIMEOUT`,
    /// which also bounds the keepalive probing).
    pub fn from_tcp(s: TcpStream, peer: SocketAddr) -> Conn {
        let _ = s.set_nodelay(true);
        let fd = OwnedFd::from(s);
        let raw = fd.as_raw_fd();
        setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2);
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 6_000);
        Conn {
            fd,
            peer: peer.to_string(),
        }
    }

    /// An accepted vsock connection.
    pub fn from_vsock(fd: OwnedFd, cid: u32, port: u32) -> Conn {
        Conn {
            fd,
            peer: format!("vsock:{cid}:{port}"),
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            fd: self.fd.try_clone()?,
            peer: self.peer.clone(),
        })
    }

    /// Ends the connection both ways; a read blocked on it (any clone) returns.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on an fd we own.
        let _ = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sets (or clears) the timeout of every read and write.
    pub fn set_timeout(&self, t: Option<Duration>) {
        self.set_timeouts(t, &[libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]);
    }

    /// Sets (or clears) the timeout of every write.
    pub fn set_send_timeout(&self, t: Option<Duration>) {
        self.set_timeouts(t, &[libc::SO_SNDTIMEO]);
    }

    fn set_timeouts(&self, t: Option<Duration>, which: &[libc::c_int]) {
        let tv = match t {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for &opt in which {
            // SAFETY: `tv` lives across the call and its size is passed.
            let _ = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for reads of its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket (TCP or vsock).
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Vsock(OwnedFd),
}

impl Listener {
    pub fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        match endpoint {
            Endpoint::Tcp { host, port } => Ok(Listener::Tcp(std::net::TcpListener::bind((
                host.as_str(),
                *port,
            ))?)),
            Endpoint::Vsock { cid, port } => {
                // SAFETY: plain socket creation; the fd is owned below.
                let fd = cvt(unsafe {
                    libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
                })?;
                // SAFETY: `fd` was just created and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let a = vsock_addr(*cid, *port);
                // SAFETY: `a` is a valid sockaddr_vm of the size passed.
                cvt(unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&a as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                })?;
                // SAFETY: listen on a bound socket we own.
                cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
                Ok(Listener::Vsock(fd))
            }
        }
    }

    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn local(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(Endpoint::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
            Listener::Vsock(fd) => {
                let mut a = vsock_addr(0, 0);
                let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: `a` has room for `len` bytes.
                cvt(unsafe {
                    libc::getsockname(
                        fd.as_raw_fd(),
                        (&mut a as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                    )
                })?;
                Ok(Endpoint::Vsock {
                    cid: a.svm_cid,
                    port: a.svm_port,
                })
            }
        }
    }

    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok(Conn::from_tcp(s, peer))
            }
            Listener::Vsock(fd) => {
                let mut a = vsock_addr(0, 0);
                let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: `a` has room for `len` bytes; the new fd is owned below.
                let c = cvt(unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        (&mut a as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_CLOEXEC,
                    )
                })?;
                // SAFETY: `c` was just returned by accept4 and is owned by nobody else.
                let c = unsafe { OwnedFd::from_raw_fd(c) };
                Ok(Conn::from_vsock(c, a.svm_cid, a.svm_port))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handshake

fn noise_builder<'a>(prologue: &'a [u8], key: &'a Key) -> snow::Builder<'a> {
    let params = NOISE_PARAMS
        .parse()
        .expect("NOISE_PARAMS is a valid pattern");
    // ring's AES-GCM (AES-NI and carry-less multiplication: several times the throughput
    // of the portable implementation); X25519 from the portable resolver.
    let resolver = snow::resolvers::FallbackResolver::new(
        Box::new(snow::resolvers::RingResolver),
        Box::<snow::resolvers::DefaultResolver>::default(),
    );
    snow::Builder::with_resolver(params, Box::new(resolver))
        .prologue(prologue)
        .psk(0, &key.0)
}

fn hello_prologue(version: u32, name: &str) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p.push(name.len() as u8);
    p.extend_from_slice(name.as_bytes());
    p
}

/// Fills `buf` from `conn`, all of it by `deadline` (however slowly the peer sends).
fn read_by(conn: &Conn, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        if !wait_readable(conn, Some(deadline))? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        let n = (&mut &*conn).read(&mut buf[at..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        at += n;
    }
    Ok(())
}

fn read_exact_vec(conn: &Conn, len: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    read_by(conn, &mut v, deadline)?;
    Ok(v)
}

fn read_u16(conn: &Conn, deadline: Instant) -> io::Result<usize> {
    let mut b = [0u8; 2];
    read_by(conn, &mut b, deadline)?;
    Ok(u16::from_le_bytes(b) as usize)
}

/// An I/O error of a handshake in words: a read that timed out says so (the system's text
/// for it is "Resource temporarily unavailable"), and so does a peer that closed the
/// connection before the handshake ended ("failed to fill whole buffer").
pub fn handshake_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
        io::ErrorKind::UnexpectedEof => "the connection closed before the handshake ended".into(),
        _ => e.to_string(),
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The worker refused, saying why.
    #[error("refused by the worker: {0}")]
    Refused(String),
    #[error("authentication failed (the worker does not hold this key for this name)")]
    BadKey,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a vGPU worker, or a broken handshake")]
    Protocol,
}

/// An established, authenticated link, split into its two directions.
#[derive(Debug)]
pub struct Link {
    pub tx: Sender,
    pub rx: Receiver,
}

/// The mediator's side: hello, handshake; the worker's hello payload is returned.
pub fn initiate(conn: Conn, name: &str, key: &Key) -> Result<(Link, Vec<u8>), HandshakeError> {
    initiate_version(conn, name, key, LINK_VERSION)
}

/// [`initiate`] claiming another link version (for tests of the refusal).
pub fn initiate_version(
    conn: Conn,
    name: &str,
    key: &Key,
    version: u32,
) -> Result<(Link, Vec<u8>), HandshakeError> {
    conn.set_timeout(Some(HANDSHAKE_TIMEOUT));
    let prologue = hello_prologue(version, name);
    let mut hs = noise_builder(&prologue, key)
        .build_initiator()
        .map_err(|_| HandshakeError::Protocol)?;
    let mut msg = vec![0u8; MAX_HANDSHAKE];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(|_| HandshakeError::Protocol)?;
    let mut hello = prologue.clone();
    hello.extend_from_slice(&(n as u16).to_le_bytes());
    hello.extend_from_slice(&msg[..n]);
    (&conn).write_all(&hello)?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut status = [0u8; 1];
    read_by(&conn, &mut status, deadline)?;
    let len = read_u16(&conn, deadline)?;
    let body = read_exact_vec(&conn, len, deadline)?;
    match status[0] {
        0 => {}
        1 => {
            return Err(HandshakeError::Refused(
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
        _ => return Err(HandshakeError::Protocol),
    }
    let mut payload = vec![0u8; MAX_HANDSHAKE];
    let n = hs
        .read_message(&body, &mut payload)
        .map_err(|_| HandshakeError::BadKey)?;
    payload.truncate(n);
    let state = hs
        .into_stateless_transport_mode()
        .map_err(|_| HandshakeError::Protocol)?;
    conn.set_timeout(None);
    Ok((Link::new(conn, state)?, payload))
}

/// What a worker decides about a mediator's hello: its key, or why it is refused.
pub type Admit<'a> = &'a dyn Fn(u32, &str) -> Result<Key, String>;

/// The worker's side, up to the point where the hello's name and version are known and
/// the mediator proved its key: returns the half-done handshake for [`respond`] to finish
/// with the worker's hello payload, and the mediator's name. A refusal is sent to the
/// mediator before the error returns.
pub fn accept(conn: &Conn, admit: Admit<'_>) -> Result<(snow::HandshakeState, String), String> {
    conn.set_timeout(Some(HANDSHAKE_TIMEOUT));
    let refuse = |why: String| {
        let mut out = vec![1u8];
        let text = why.as_bytes();
        let text = &text[..text.len().min(1024)];
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text);
        let _ = (&*conn).write_all(&out);
        why
    };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut head = [0u8; 13];
    read_by(conn, &mut head, deadline)
        .map_err(|e| format!("reading the hello: {}", handshake_io(&e)))?;
    if head[..8] != MAGIC {
        return Err("not a vGPU mediator (bad magic); closed".into());
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let name_len = head[12] as usize;
    if version != LINK_VERSION {
        return Err(refuse(format!(
            "protocol version {version} is not spoken here: this worker speaks version \
             {LINK_VERSION} ({} {}); run the same release on both sides",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        )));
    }
    if name_len == 0 || name_len > MAX_NAME {
        return Err(refuse("malformed hello (name length)".into()));
    }
    let name = read_exact_vec(conn, name_len, deadline)
        .map_err(|e| format!("reading the hello: {}", handshake_io(&e)))?;
    let name = match String::from_utf8(name) {
        Ok(n) if valid_name(&n) => n,
        _ => return Err(refuse("malformed hello (name)".into())),
    };
    let len =
        read_u16(conn, deadline).map_err(|e| format!("reading the hello: {}", handshake_io(&e)))?;
    if len > MAX_HANDSHAKE {
        return Err(refuse("malformed hello (handshake length)".into()));
    }
    let msg = read_exact_vec(conn, len, deadline)
        .map_err(|e| format!("reading the hello: {}", handshake_io(&e)))?;
    let key = admit(version, &name).map_err(refuse)?;
    let prologue = hello_prologue(version, &name);
    let mut hs = noise_builder(&prologue, &key)
        .build_responder()
        .map_err(|e| refuse(format!("handshake: {e}")))?;
    let mut payload = vec![0u8; MAX_HANDSHAKE];
    if hs.read_message(&msg, &mut payload).is_err() {
        return Err(refuse(format!(
            "authentication failed for mediator '{name}' (wrong key)"
        )));
    }
    Ok((hs, name))
}

/// Finishes what [`accept`] began: sends the second Noise message carrying `payload`.
pub fn respond(conn: Conn, mut hs: snow::HandshakeState, payload: &[u8]) -> Result<Link, String> {
    let mut msg = vec![0u8; MAX_HANDSHAKE + payload.len()];
    let n = hs
        .write_message(payload, &mut msg)
        .map_err(|e| format!("handshake: {e}"))?;
    let mut out = vec![0u8];
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&msg[..n]);
    (&conn)
        .write_all(&out)
        .map_err(|e| format!("sending the handshake: {}", handshake_io(&e)))?;
    let state = hs
        .into_stateless_transport_mode()
        .map_err(|e| format!("handshake: {e}"))?;
    conn.set_timeout(None);
    Link::new(conn, state).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Records

impl Link {
    fn new(conn: Conn, state: StatelessTransportState) -> io::Result<Link> {
        let state = Arc::new(state);
        let rconn = conn.try_clone()?;
        Ok(Link {
            tx: Sender {
                conn,
                state: state.clone(),
                nonce: 0,
                plain: Vec::new(),
                wire: Vec::new(),
            },
            rx: Receiver {
                conn: rconn,
                state,
                nonce: 0,
                deadline: None,
                buf: Vec::new(),
                at: 0,
                end: 0,
            },
        })
    }
}

/// The sending direction of a link.
pub struct Sender {
    conn: Conn,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    plain: Vec<u8>,
    wire: Vec<u8>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sender({})", self.conn.peer)
    }
}

impl Sender {
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Sends one message (postcard bytes made by `encode`, which appends to the buffer it
    /// is given), with any queued before it.
    pub fn send_with(
        &mut self,
        encode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, postcard::Error>,
    ) -> io::Result<()> {
        self.queue_with(encode)?;
        self.flush()
    }

    /// Encrypts one message into the queue of bytes to send, without sending; returns
    /// the bytes it added.
    pub fn queue_with(
        &mut self,
        encode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, postcard::Error>,
    ) -> io::Result<usize> {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        plain.extend_from_slice(&[0; 4]);
        let mut plain = encode(plain).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let len = u32::try_from(plain.len() - 4)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message too large"))?;
        plain[..4].copy_from_slice(&len.to_le_bytes());
        let before = self.wire.len();
        let r = self.encrypt(&plain);
        self.plain = plain;
        if self.plain.capacity() > 4 << 20 {
            self.plain = Vec::new();
        }
        r.map(|()| self.wire.len() - before)
    }

    fn encrypt(&mut self, plain: &[u8]) -> io::Result<()> {
        let records = plain.len().div_ceil(RECORD_PLAIN);
        self.wire.reserve(plain.len() + records * (TAG + 2));
        for chunk in plain.chunks(RECORD_PLAIN) {
            let at = self.wire.len();
            self.wire.resize(at + 2 + chunk.len() + TAG, 0);
            let n = self
                .state
                .write_message(self.nonce, chunk, &mut self.wire[at + 2..])
                .map_err(|e| io::Error::other(format!("encrypting: {e}")))?;
            self.nonce += 1;
            self.wire[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
            self.wire.truncate(at + 2 + n);
        }
        Ok(())
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let r = (&self.conn).write_all(&self.wire);
        self.wire.clear();
        if self.wire.capacity() > 4 << 20 {
            self.wire = Vec::new();
        }
        r
    }
}

/// The receiving direction of a link.
pub struct Receiver {
    conn: Conn,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// When set, reads fail once it has passed.
    deadline: Option<Instant>,
    /// Bytes read from the socket not yet taken as records: `buf[at..end]`.
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receiver({})", self.conn.peer)
    }
}

impl Receiver {
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Whether a whole record is already buffered (the next `recv` may not block).
    pub fn has_buffered(&self) -> bool {
        let n = self.end - self.at;
        n >= 2 && n >= 2 + u16::from_le_bytes([self.buf[self.at], self.buf[self.at + 1]]) as usize
    }

    fn fill(&mut self, want: usize) -> io::Result<()> {
        if self.buf.len() < 256 << 10 {
            self.buf.resize(256 << 10, 0);
        }
        if self.end - self.at >= want {
            return Ok(());
        }
        if self.at > 0 {
            self.buf.copy_within(self.at..self.end, 0);
            self.end -= self.at;
            self.at = 0;
        }
        while self.end < want {
            if let Some(d) = self.deadline {
                if !wait_readable(&self.conn, Some(d))? {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "too slow"));
                }
            }
            let n = (&self.conn).read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            self.end += n;
        }
        Ok(())
    }

    /// Reads one record and appends its plaintext to `dst` (which must have room for
    /// `limit` more bytes at most; a longer record is an error).
    fn record_into(&mut self, dst: &mut Vec<u8>, limit: usize) -> io::Result<()> {
        self.fill(2)?;
        let len = u16::from_le_bytes([self.buf[self.at], self.buf[self.at + 1]]) as usize;
        if len < TAG {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short record"));
        }
        if len - TAG > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "overlong message",
            ));
        }
        self.fill(2 + len)?;
        let start = dst.len();
        dst.resize(start + len - TAG, 0);
        let n = self
            .state
            .read_message(
                self.nonce,
                &self.buf[self.at + 2..self.at + 2 + len],
                &mut dst[start..],
            )
            .map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "a record failed authentication")
            })?;
        dst.truncate(start + n);
        self.at += 2 + len;
        self.nonce += 1;
        Ok(())
    }

    /// The next message's bytes, at most `max` of them (a longer one is an error before
    /// anything is allocated for it). Blocks until it is whole.
    pub fn recv(&mut self, max: usize, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        self.record_into(out, RECORD_PLAIN)?;
        if out.len() < 4 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short message"));
        }
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message of {len} bytes exceeds the limit of {max}"),
            ));
        }
        if out.len() - 4 > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "overlong message",
            ));
        }
        out.drain(..4);
        out.try_reserve_exact(len - out.len())
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "no memory for a message"))?;
        while out.len() < len {
            let room = len - out.len();
            self.record_into(out, room)?;
        }
        if out.capacity() > 4 * len.max(1 << 20) {
            out.shrink_to(len);
        }
        Ok(())
    }
}

/// [`Receiver::recv`] of a message that must arrive whole within `within`.
pub fn recv_within(
    rx: &mut Receiver,
    max: usize,
    out: &mut Vec<u8>,
    within: Duration,
) -> io::Result<()> {
    rx.deadline = Some(Instant::now() + within);
    let r = rx.recv(max, out);
    rx.deadline = None;
    r
}

/// Waits until `conn` is readable or hung up, or `deadline` passes; true when it is.
pub fn wait_readable(conn: &Conn, deadline: Option<Instant>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
            }
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        let e: Endpoint = "10.0.0.2:7701".parse().unwrap();
        assert_eq!(
            e,
            Endpoint::Tcp {
                host: "10.0.0.2".into(),
                port: 7701
            }
        );
        assert_eq!(e.to_string(), "10.0.0.2:7701");
        let e: Endpoint = "tcp:[::1]:9".parse().unwrap();
        assert_eq!(e.to_string(), "[::1]:9");
        let e: Endpoint = "vsock:3:7701".parse().unwrap();
        assert_eq!(e, Endpoint::Vsock { cid: 3, port: 7701 });
        let e: Endpoint = "vsock:any:5".parse().unwrap();
        assert_eq!(e.to_string(), "vsock:any:5");
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:99999",
            "vsock:x:1",
            "vsock:3",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files_parse() {
        let k = Key::generate().unwrap();
        let text = format!("# comment\n\nmed-1 {}\n", k.to_hex());
        let f = KeyFile::parse(&text).unwrap();
        assert_eq!(f.identity().unwrap(), ("med-1".to_string(), k.clone()));
        assert!(KeyFile::parse("").is_err());
        assert!(KeyFile::parse("a b c").is_err());
        assert!(KeyFile::parse("a 00").is_err());
        assert!(KeyFile::parse(&format!("bad/name {}", k.to_hex())).is_err());
        let two = format!("a {0}\na {0}\n", k.to_hex());
        assert!(KeyFile::parse(&two).is_err());
        let two = format!("a {0}\nb {0}\n", k.to_hex());
        let f = KeyFile::parse(&two).unwrap();
        assert!(f.identity().is_err());
        assert_eq!(f.by_name().len(), 2);
        assert_eq!(format!("{k:?}"), "Key(..)");
    }

    fn pair() -> (Conn, Conn) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let c = TcpStream::connect(a).unwrap();
        let (s, peer) = l.accept().unwrap();
        (Conn::from_tcp(c, a), Conn::from_tcp(s, peer))
    }

    fn serve_one(server: Conn, key: Key) -> std::thread::JoinHandle<Result<Link, String>> {
        std::thread::spawn(move || {
            let admit = move |_: u32, name: &str| {
                if name == "m" {
                    Ok(key.clone())
                } else {
                    Err(format!("unknown mediator '{name}'"))
                }
            };
            let (hs, _) = accept(&server, &admit)?;
            respond(server, hs, b"hello payload")
        })
    }

    #[test]
    fn handshake_and_messages_both_ways() {
        let key = Key::generate().unwrap();
        let (c, s) = pair();
        let worker = serve_one(s, key.clone());
        let (mut link, payload) = initiate(c, "m", &key).unwrap();
        assert_eq!(payload, b"hello payload");
        let mut wlink = worker.join().unwrap().unwrap();
        // Messages of every size around the record boundary, and a large one.
        for len in [
            0usize,
            1,
            RECORD_PLAIN - 4,
            RECORD_PLAIN - 3,
            RECORD_PLAIN * 3 + 7,
            3 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let d2 = data.clone();
            link.tx
                .send_with(move |mut v| {
                    v.extend_from_slice(&d2);
                    Ok(v)
                })
                .unwrap();
            let mut out = Vec::new();
            wlink.rx.recv(4 << 20, &mut out).unwrap();
            assert_eq!(out, data, "{len}");
        }
        wlink
            .tx
            .send_with(|mut v| {
                v.push(42);
                Ok(v)
            })
            .unwrap();
        let mut out = Vec::new();
        link.rx.recv(16, &mut out).unwrap();
        assert_eq!(out, [42]);
        // Over the receiver's limit: refused.
        link.tx
            .send_with(|mut v| {
                v.extend_from_slice(&[0; 100]);
                Ok(v)
            })
            .unwrap();
        assert!(wlink.rx.recv(99, &mut out).is_err());
    }

    #[test]
    fn handshake_io_errors_read_as_words() {
        // A read timeout (SO_RCVTIMEO) is EAGAIN: "Resource temporarily unavailable".
        let timeout = io::Error::from_raw_os_error(libc::EAGAIN);
        assert_eq!(handshake_io(&timeout), "no answer within 10 s");
        let closed = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(
            handshake_io(&closed),
            "the connection closed before the handshake ended"
        );
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(handshake_io(&reset), reset.to_string());
    }

    #[test]
    fn wrong_key_unknown_name_and_version_are_refused() {
        let key = Key::generate().unwrap();
        let (c, s) = pair();
        let worker = serve_one(s, key.clone());
        let other = Key::generate().unwrap();
        match initiate(c, "m", &other) {
            Err(HandshakeError::Refused(why)) => assert!(why.contains("wrong key"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(worker.join().unwrap().is_err());

        let (c, s) = pair();
        let worker = serve_one(s, key.clone());
        match initiate(c, "stranger", &key) {
            Err(HandshakeError::Refused(why)) => assert!(why.contains("unknown"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(worker.join().unwrap().is_err());

        let (c, s) = pair();
        let worker = serve_one(s, key.clone());
        match initiate_version(c, "m", &key, LINK_VERSION + 1) {
            Err(HandshakeError::Refused(why)) => {
                assert!(why.contains("version"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(worker.join().unwrap().is_err());
    }

    #[test]
    fn tampered_records_end_the_link() {
        let key = Key::generate().unwrap();
        let (c, s) = pair();
        let worker = serve_one(s, key.clone());
        let (link, _) = initiate(c, "m", &key).unwrap();
        let mut wlink = worker.join().unwrap().unwrap();
        // A record that was not made with the key.
        let mut forged = vec![40u8, 0];
        forged.extend_from_slice(&[0xa5; 40]);
        (&link.tx.conn).write_all(&forged).unwrap();
        let mut out = Vec::new();
        let e = wlink.rx.recv(1 << 20, &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn record_throughput() {
        let key = Key::generate().unwrap();
        let p = hello_prologue(LINK_VERSION, "m");
        let mut i = noise_builder(&p, &key).build_initiator().unwrap();
        let mut r = noise_builder(&p, &key).build_responder().unwrap();
        let mut m = vec![0u8; 4096];
        let mut pl = vec![0u8; 4096];
        let n = i.write_message(&[], &mut m).unwrap();
        r.read_message(&m[..n], &mut pl).unwrap();
        let n = r.write_message(&[], &mut m).unwrap();
        i.read_message(&m[..n], &mut pl).unwrap();
        let t = i.into_stateless_transport_mode().unwrap();
        let plain = vec![7u8; RECORD_PLAIN];
        let mut out = vec![0u8; MAX_RECORD];
        let start = Instant::now();
        let mut bytes = 0;
        for nonce in 0..20_000u64 {
            t.write_message(nonce, &plain, &mut out).unwrap();
            bytes += plain.len();
        }
        let s = start.elapsed().as_secs_f64();
        eprintln!("encrypt: {:.2} GB/s", bytes as f64 / s / 1e9);
    }
}
