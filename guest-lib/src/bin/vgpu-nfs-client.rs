// SPDX-License-Identifier: Apache-2.0
//! `vgpu-nfs-client`: the VM side of the Phase 1 file protocol over NFS.
//!
//! Writes a command to `DIR/command.txt` and polls `DIR/response.txt` until the mediator
//! answers, following the rule of the mediator's NFS transport (`vgpu_mediator::nfs`):
//! when the directory is not idle (the response's status is not 0, or the command file
//! holds a command), first write `0` and wait for `0:Ready`, so that the answer read
//! afterwards can only be the answer to this command. Every access is an explicit
//! open/read/close or open/write/close; nothing is mapped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

const COMMAND_FILE: &str = "command.txt";
const RESPONSE_FILE: &str = "response.txt";
/// Longest response read; the mediator writes one short line.
const MAX_RESPONSE_BYTES: u64 = 64 << 10;

#[derive(Parser)]
#[command(
    name = "vgpu-nfs-client",
    version,
    about = "Runs one Phase 1 command through the mediator's NFS file protocol",
    long_about = "Runs one Phase 1 command through the mediator's NFS file protocol: writes it to \
                  DIR/command.txt and polls DIR/response.txt until the mediator answers.\n\n\
                  Commands: 1 = vector-add validation on the host's GPU, 2 = device \
                  information. Prints 'SUCCESS: <message>' and exits 0 when the answer is \
                  1:<message>.\n\n\
                  Exit codes: 0 success; 1 the mediator answered with an error \
                  (2:<message>); 2 bad usage; 3 no answer within the timeout; 4 DIR is not a \
                  directory or command.txt cannot be written."
)]
struct Args {
    /// The VM's directory on the NFS mount, e.g. /mnt/vgpu/vm1 (or /mnt/vgpu for the
    /// single pair at the root).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The command: 1 (vector-add validation) or 2 (device information). Other words are
    /// sent as they are and answered with an error.
    #[arg(long, value_name = "N", value_parser = parse_command)]
    command: String,
    /// Seconds to wait for the mediator's answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    timeout: f64,
    /// Milliseconds between reads of response.txt.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    poll_ms: u64,
}

fn parse_command(s: &str) -> Result<String, String> {
    let word = s.trim();
    if word.is_empty() {
        Err("the command is empty".into())
    } else if word == "0" {
        Err("0 is the reset, not a command: use 1 or 2".into())
    } else if word.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("the command must be one word".into())
    } else if word.len() > 200 {
        Err("the command is too long".into())
    } else {
        Ok(word.to_owned())
    }
}

/// Why a command did not succeed; each maps to an exit code.
#[derive(Debug)]
enum Failure {
    /// The mediator answered `2:<message>`.
    Refused(String),
    Timeout(String),
    Io(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Timeout(_) => 3,
            Failure::Io(_) => 4,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Refused(m) | Failure::Timeout(m) | Failure::Io(m) => m,
        }
    }
}

/// What `response.txt` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reading {
    Missing,
    /// The read failed. Over NFS that can be momentary while the mediator replaces the
    /// file (nfs-ganesha answers an OPEN racing a rename with NFS4ERR_SERVERFAULT, which
    /// Linux reports as "Remote I/O error"), so it is retried until the deadline.
    Unreadable(String),
    /// Not a `status:message` line (someone else wrote it, or it is not the mediator's).
    Malformed(String),
    Line {
        status: u32,
        message: String,
    },
}

impl Reading {
    fn parse(text: &str) -> Reading {
        let line = text.lines().next().unwrap_or("").trim_end();
        match line.split_once(':') {
            Some((status, message)) if !status.is_empty() => match status.parse() {
                Ok(status) => Reading::Line {
                    status,
                    message: message.to_owned(),
                },
                Err(_) => Reading::Malformed(line.to_owned()),
            },
            _ => Reading::Malformed(line.to_owned()),
        }
    }

    fn status(&self) -> Option<u32> {
        match self {
            Reading::Line { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Reading::Missing => format!("{RESPONSE_FILE} does not exist"),
            Reading::Unreadable(e) => format!("{RESPONSE_FILE} cannot be read: {e}"),
            Reading::Malformed(line) => format!("{RESPONSE_FILE} reads '{line}'"),
            Reading::Line { status, message } => {
                format!("{RESPONSE_FILE} reads '{status}:{message}'")
            }
        }
    }
}

struct Client {
    dir: PathBuf,
    poll: Duration,
    deadline: Instant,
    timeout: Duration,
}

impl Client {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_response(&self) -> Reading {
        match read_small(&self.path(RESPONSE_FILE), MAX_RESPONSE_BYTES) {
            Ok(Some(text)) => Reading::parse(&text),
            Ok(None) => Reading::Missing,
            Err(e) => {
                log::debug!("reading {RESPONSE_FILE}: {e}");
                Reading::Unreadable(e.to_string())
            }
        }
    }

    /// Whether the command file is missing, blank or the reset. An unreadable one is
    /// not: the reset that follows is always safe.
    fn command_idle(&self) -> bool {
        match read_small(&self.path(COMMAND_FILE), 4096) {
            Ok(None) => true,
            Ok(Some(text)) => matches!(text.trim(), "" | "0"),
            Err(e) => {
                log::debug!("reading {COMMAND_FILE}: {e}");
                false
            }
        }
    }

    /// open, write, close. A failure is tried again a few times (NFS errors can be
    /// momentary); one that persists ends the run.
    fn write_command(&self, word: &str) -> Result<(), Failure> {
        let path = self.path(COMMAND_FILE);
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            file.write_all(format!("{word}\n").as_bytes())?;
            // Over NFS close flushes too, but only sync reports a failed write.
            file.sync_all()
        };
        let mut tries = 0;
        loop {
            match write() {
                Ok(()) => break,
                Err(e) if tries < 3 && Instant::now() < self.deadline => {
                    log::debug!("writing {}: {e}; trying again", path.display());
                    tries += 1;
                    std::thread::sleep(self.poll);
                }
                Err(e) => return Err(Failure::Io(format!("cannot write {}: {e}", path.display()))),
            }
        }
        log::debug!("wrote '{word}' to {}", path.display());
        Ok(())
    }

    /// Polls `response.txt` until `done` holds for what it reads.
    fn wait_until(&self, what: &str, done: impl Fn(&Reading) -> bool) -> Result<Reading, Failure> {
        loop {
            let reading = self.read_response();
            if done(&reading) {
                return Ok(reading);
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(Failure::Timeout(format!(
                    "no {what} from the mediator within {:.0} s ({}); is `vgpu-mediator serve` \
                     running and serving {}?",
                    self.timeout.as_secs_f64(),
                    reading.describe(),
                    self.dir.display()
                )));
            }
            std::thread::sleep(self.poll.min(self.deadline - now));
        }
    }

    /// Runs one command; `Ok` carries the success message.
    fn run(&self, command: &str) -> Result<String, Failure> {
        let response = self.read_response();
        let idle = response.status() == Some(0) && self.command_idle();
        if !idle {
            log::debug!("directory not idle ({}); resetting", response.describe());
            self.write_command("0")?;
            self.wait_until("reset acknowledgement (0:Ready)", |r| r.status() == Some(0))?;
        }
        self.write_command(command)?;
        match self.wait_until("answer", |r| r.status().is_some_and(|s| s != 0))? {
            Reading::Line { status: 1, message } => Ok(message),
            Reading::Line { status: 2, message } => Err(Failure::Refused(message)),
            other => Err(Failure::Refused(format!(
                "unexpected answer: {}",
                other.describe()
            ))),
        }
    }
}

/// open, read (at most `cap` bytes), close. `None` when the file does not exist.
fn read_small(path: &Path, cap: u64) -> io::Result<Option<String>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(cap).read_to_end(&mut bytes)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if !args.timeout.is_finite() || args.timeout <= 0.0 || args.timeout > 86_400.0 {
        eprintln!("FAILED: --timeout must be between 0 and 86400 seconds");
        return ExitCode::from(2);
    }
    if !args.dir.is_dir() {
        eprintln!(
            "FAILED: {} is not a directory (is the NFS export mounted?)",
            args.dir.display()
        );
        return ExitCode::from(4);
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let client = Client {
        dir: args.dir,
        poll: Duration::from_millis(args.poll_ms.max(1)),
        deadline: Instant::now() + timeout,
        timeout,
    };
    match client.run(&args.command) {
        Ok(message) => {
            println!("SUCCESS: {message}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("FAILED: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_lines_parse_into_status_and_message() {
        assert_eq!(
            Reading::parse("1:Vector add PASSED: 1024 elements\n"),
            Reading::Line {
                status: 1,
                message: "Vector add PASSED: 1024 elements".into()
            }
        );
        assert_eq!(Reading::parse("0:Ready\n").status(), Some(0));
        assert_eq!(Reading::parse("2:bad\r\n").status(), Some(2));
        assert_eq!(Reading::parse(""), Reading::Malformed(String::new()));
        assert_eq!(Reading::parse("Ready"), Reading::Malformed("Ready".into()));
        assert_eq!(Reading::parse("x:y"), Reading::Malformed("x:y".into()));
    }

    #[test]
    fn commands_are_one_word_and_never_the_reset() {
        assert_eq!(parse_command(" 1 "), Ok("1".into()));
        assert_eq!(parse_command("hello"), Ok("hello".into()));
        assert!(parse_command("0").is_err());
        assert!(parse_command("").is_err());
        assert!(parse_command("1 2").is_err());
    }

    /// A mediator stand-in that follows the transport's rule on one directory.
    fn responder(dir: PathBuf, answers: usize) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut last = String::new();
            let mut answered = 0;
            std::fs::write(dir.join(RESPONSE_FILE), "0:Ready\n").unwrap();
            while answered < answers {
                let cmd = std::fs::read_to_string(dir.join(COMMAND_FILE)).unwrap_or_default();
                if cmd.ends_with('\n') && cmd.trim() != last {
                    last = cmd.trim().to_owned();
                    let line = match last.as_str() {
                        "0" => "0:Ready".to_owned(),
                        "1" | "2" => {
                            answered += 1;
                            format!("1:answer {last} #{answered}")
                        }
                        other => {
                            answered += 1;
                            format!("2:unknown command '{other}'")
                        }
                    };
                    let tmp = dir.join(".response.tmp");
                    std::fs::write(&tmp, format!("{line}\n")).unwrap();
                    std::fs::rename(&tmp, dir.join(RESPONSE_FILE)).unwrap();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vgpu-nfs-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_same_command_twice_gets_two_fresh_answers_through_the_reset() {
        let dir = temp_dir("twice");
        let server = responder(dir.clone(), 3);
        while !dir.join(RESPONSE_FILE).exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let client = Client {
            dir: dir.clone(),
            poll: Duration::from_millis(1),
            deadline: Instant::now() + Duration::from_secs(60),
            timeout: Duration::from_secs(60),
        };
        assert_eq!(client.run("1").unwrap(), "answer 1 #1");
        assert_eq!(client.run("1").unwrap(), "answer 1 #2");
        match client.run("7") {
            Err(Failure::Refused(m)) => assert_eq!(m, "unknown command '7'"),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_mediator_is_a_timeout_that_says_what_the_response_reads() {
        let dir = temp_dir("timeout");
        let client = Client {
            dir: dir.clone(),
            poll: Duration::from_millis(1),
            deadline: Instant::now(),
            timeout: Duration::ZERO,
        };
        match client.run("1") {
            Err(f @ Failure::Timeout(_)) => {
                assert_eq!(f.exit_code(), 3);
                assert!(f.message().contains("response.txt does not exist"), "{f:?}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
