// SPDX-License-Identifier: Apache-2.0
//! A tiny HTTP/1.1 server for the metrics: `GET /metrics` and nothing else.
//!
//! One request per connection (the answer says `Connection: close`), read with a timeout
//! and a bound on its size; each connection on its own short-lived thread, a few at a time,
//! so a client that stalls cannot hold up a scrape. Nothing a client sends can stop the
//! server or the daemon: failures are logged and the connection dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Format;
use crate::mediator::Mediator;

/// Largest request (request line and headers) read; a longer one is answered 431.
pub const MAX_REQUEST_BYTES: usize = 8192;

/// How long a client has to send its request (and to take the answer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 8;

/// Why [`parse_addr`] refused an address (the text as given is in each). Its `Display`
/// is the message clap shows, the resolver's reason included (so that is no `source()`).
#[derive(Debug, thiserror::Error)]
pub enum ParseAddrError {
    /// Neither an IP address and port nor a name and port that resolves.
    #[error("'{text}' is not ADDR:PORT (such as 127.0.0.1:9477 or [::1]:9477): {error}")]
    NotAnAddress { text: String, error: io::Error },
    /// The name resolved to nothing.
    #[error("'{0}' resolves to no address")]
    NoAddress(String),
}

/// Parses `--metrics ADDR:PORT`: an IP address and port such as `127.0.0.1:9477` or
/// `[::1]:9477`, or a host name that resolves, such as `localhost:9477`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, ParseAddrError> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|error| ParseAddrError::NotAnAddress {
            text: s.to_string(),
            error,
        })?;
    addrs
        .next()
        .ok_or_else(|| ParseAddrError::NoAddress(s.to_string()))
}

/// The running metrics endpoint; stops (and waits for its thread) when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the server's thread. Connections being answered
    /// finish on their own threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("metrics endpoint: signalling the stop: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("metrics endpoint: its thread panicked");
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetricsServer({})", self.addr)
    }
}

/// Listens on `addr` and answers `GET /metrics` with `mediator`'s metrics until stopped.
/// Fails only when it cannot listen (the address taken, not this host's, no permission).
/// The server does not keep the mediator alive: once it is gone, scrapes get 503.
pub fn serve(addr: SocketAddr, mediator: &Arc<Mediator>) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let server = Server {
        listener,
        stop: stop.clone(),
        mediator: Arc::downgrade(mediator),
        active: Arc::new(AtomicUsize::new(0)),
    };
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || server.run())?;
    log::info!("metrics: serving http://{addr}/metrics");
    Ok(MetricsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

struct Server {
    listener: TcpListener,
    stop: Arc<EventFd>,
    mediator: Weak<Mediator>,
    /// Connections being answered now.
    active: Arc<AtomicUsize>,
}

impl Server {
    fn run(self) {
        loop {
            match self.wait() {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    log::error!("metrics endpoint: waiting for connections: {e}; stopped");
                    return;
                }
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, peer)) => self.dispatch(stream, peer),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of fds, or a connection reset before it was taken: carry on,
                        // without spinning.
                        log::warn!("metrics endpoint: accepting a connection: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
    }

    /// Waits until a connection can be accepted (false) or a stop is requested (true).
    fn wait(&self) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n >= 0 {
                return Ok(fds[1].revents != 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Answers a connection on a thread of its own, if fewer than [`MAX_CONNECTIONS`] are.
    fn dispatch(&self, mut stream: TcpStream, peer: SocketAddr) {
        // Accepted sockets inherit nothing from the non-blocking listener on Linux, but
        // make sure: the timeouts below need a blocking socket.
        if let Err(e) = stream.set_nonblocking(false) {
            log::debug!("metrics endpoint: {peer}: {e}");
            return;
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.active.fetch_sub(1, Ordering::AcqRel);
            log::debug!("metrics endpoint: {peer}: too many connections, answered 503");
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_response(&mut stream, &Answer::status(503, "Service Unavailable"));
            return;
        }
        let (mediator, active) = (self.mediator.clone(), self.active.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                answer(stream, peer, &mediator);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("metrics endpoint: {peer}: starting a thread: {e}");
        }
    }
}

/// An answer: status, content type and body.
struct Answer {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers only.
    head: bool,
    extra: &'static str,
}

impl Answer {
    fn status(code: u16, reason: &'static str) -> Answer {
        Answer {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{code} {reason}\n"),
            head: false,
            extra: "",
        }
    }
}

fn answer(mut stream: TcpStream, peer: SocketAddr, mediator: &Weak<Mediator>) {
    let started = Instant::now();
    let deadline = started + READ_TIMEOUT;
    if let Err(e) = stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(READ_TIMEOUT)))
    {
        log::debug!("metrics endpoint: {peer}: {e}");
        return;
    }
    let response = match read_request(&mut stream, deadline) {
        Ok(request) => route(&request, mediator),
        Err(RequestError::Io(e)) => {
            log::debug!("metrics endpoint: {peer}: reading the request: {e}");
            return;
        }
        Err(RequestError::TooLarge) => {
            log::debug!("metrics endpoint: {peer}: request larger than {MAX_REQUEST_BYTES} bytes");
            Answer::status(431, "Request Header Fields Too Large")
        }
        Err(RequestError::Malformed(why)) => {
            log::debug!("metrics endpoint: {peer}: bad request: {why}");
            Answer::status(400, "Bad Request")
        }
    };
    if let Err(e) = write_response(&mut stream, &response) {
        log::debug!("metrics endpoint: {peer}: writing the answer: {e}");
    }
    close(stream);
    log::trace!(
        "metrics endpoint: {peer}: {} in {} us",
        response.code,
        started.elapsed().as_micros()
    );
}

/// Closes after the answer: the write side first, then what the client still sends is
/// read and dropped (a little, briefly), so that unread bytes do not make the system reset
/// the connection before the client read the answer.
fn close(mut stream: TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left -= n.min(left),
        }
    }
}

fn route(request: &Request, mediator: &Weak<Mediator>) -> Answer {
    let path = request.target.split(['?', '#']).next().unwrap_or_default();
    if path != "/metrics" {
        return Answer::status(404, "Not Found");
    }
    let head = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Answer {
                extra: "Allow: GET, HEAD\r\n",
                ..Answer::status(405, "Method Not Allowed")
            }
        }
    };
    let Some(mediator) = mediator.upgrade() else {
        return Answer::status(503, "Service Unavailable");
    };
    // Prometheus asks for OpenMetrics; a plain client (curl) gets the classic text.
    let format = if request.accepts_openmetrics {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    };
    Answer {
        code: 200,
        reason: "OK",
        content_type: format.content_type(),
        body: mediator.metrics(format),
        head,
        extra: "",
    }
}

fn write_response(stream: &mut TcpStream, a: &Answer) -> io::Result<()> {
    let header = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        a.code,
        a.reason,
        a.content_type,
        a.body.len(),
        a.extra
    );
    stream.write_all(header.as_bytes())?;
    if !a.head {
        stream.write_all(a.body.as_bytes())?;
    }
    stream.flush()
}

#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    accepts_openmetrics: bool,
}

#[derive(Debug)]
enum RequestError {
    Io(io::Error),
    TooLarge,
    Malformed(&'static str),
}

/// Reads the request line and headers (a body, if any, is not read).
fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = find_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge);
        }
        if Instant::now() >= deadline {
            // A client that trickles a byte at a time does not get to keep the thread.
            return Err(RequestError::Io(io::ErrorKind::TimedOut.into()));
        }
        let want = chunk.len().min(MAX_REQUEST_BYTES - buf.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) if buf.is_empty() => {
                return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => return Err(RequestError::Malformed("connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RequestError::Io(e)),
        }
    };
    parse_request(&buf[..end])
}

/// Where the headers end (the blank line), if they do.
fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

fn parse_request(head: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(head).map_err(|_| RequestError::Malformed("not UTF-8"))?;
    let mut lines = text.lines();
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed("request line"));
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(RequestError::Malformed("request line"));
    }
    let mut accepts_openmetrics = false;
    for header in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = header
            .split_once(':')
            .ok_or(RequestError::Malformed("header"))?;
        if name.trim().eq_ignore_ascii_case("accept")
            && value.contains("application/openmetrics-text")
        {
            accepts_openmetrics = true;
        }
    }
    Ok(Request {
        method: method.into(),
        target: target.into(),
        accepts_openmetrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, RequestError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        let r = parse("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.target.as_str()), ("GET", "/metrics"));
        assert!(!r.accepts_openmetrics);
        let r = parse(
            "GET /metrics?x=1 HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0,\
             text/plain;q=0.5\r\n\r\n",
        )
        .unwrap();
        assert!(r.accepts_openmetrics);
        for bad in [
            "",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "get /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(RequestError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse_addr("127.0.0.1:9477").ok(),
            Some("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(
            parse_addr("[::1]:80").ok(),
            Some("[::1]:80".parse().unwrap())
        );
        assert!(parse_addr("localhost:9477").is_ok_and(|a| a.port() == 9477));
        for bad in ["127.0.0.1", "127.0.0.1:99999"] {
            let e = parse_addr(bad).unwrap_err();
            assert!(matches!(&e, ParseAddrError::NotAnAddress { text, .. } if text == bad));
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("'{bad}' is not ADDR:PORT (such as 127.0.0.1:9477")),
                "{message}"
            );
            assert!(!message.contains('\n'), "{message}");
        }
    }
}
