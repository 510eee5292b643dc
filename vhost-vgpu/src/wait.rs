// SPDX-License-Identifier: Apache-2.0
//! Waiting for one of a few file descriptors to become readable.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Waits until one of `fds` is readable (or reports an error or hang-up) and returns its
/// index, or `None` once `timeout` has passed. `None` as timeout waits forever.
pub(crate) fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Option<usize>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so that a sub-millisecond remainder still sleeps.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        // SAFETY: `pollfds` is a valid, initialised array of `pollfds.len()` entries that
        // outlives the call.
        let n = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(i) = pollfds.iter().position(|p| p.revents != 0) {
            return Ok(Some(i));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[test]
    fn reports_the_readable_fd_or_times_out() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        assert_eq!(
            wait_readable(&fds, Some(Duration::from_millis(10))).unwrap(),
            None
        );
        b.write(1).unwrap();
        assert_eq!(wait_readable(&fds, None).unwrap(), Some(1));
    }
}
