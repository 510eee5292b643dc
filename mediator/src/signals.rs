// SPDX-License-Identifier: Apache-2.0
//! The daemons' stop (and reload) signals: caught with signal-hook, and blocked in every
//! thread but the one that waits for them.
//!
//! [`DaemonSignals::catch`] runs before any other thread starts and blocks the signals in
//! the calling thread, so every thread the daemon starts inherits the mask, and so do the
//! executor worker processes those threads start. A SIGINT, SIGTERM or SIGHUP sent to the
//! whole process group (a terminal's Ctrl-C or hang-up) therefore reaches the daemon,
//! which stops its workers in order, not the workers under it; and no other thread's
//! system call is interrupted by one. The thread that waits for the signals unblocks them
//! for itself ([`DaemonSignals::receive`]): the kernel delivers them there, to
//! signal-hook's handler, which hands them to the iterator. A signal that came before is
//! still pending then and is delivered at once.

use std::io;

use libc::c_int;
use signal_hook::iterator::Signals;
use vmm_sys_util::signal::{block_signal, unblock_signal};

/// Why the signals could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    /// The thread's signal mask could not be changed. vmm-sys-util's error does not
    /// implement `std::error::Error`: shown inline.
    #[error("{0}")]
    Mask(vmm_sys_util::signal::Error),
    /// signal-hook could not install its handlers.
    #[error(transparent)]
    Catch(io::Error),
}

/// Signals a daemon waits for, blocked everywhere but in the thread that receives them.
pub struct DaemonSignals {
    signals: Signals,
    list: Vec<c_int>,
}

impl std::fmt::Debug for DaemonSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonSignals")
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

impl DaemonSignals {
    /// Catches `list` and blocks it in the calling thread (and so in every thread it
    /// starts later). Call it before any thread starts.
    pub fn catch(list: &[c_int]) -> Result<DaemonSignals, SignalsError> {
        for &signal in list {
            match block_signal(signal) {
                // Blocked already (inherited so): as good.
                Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
                Err(e) => return Err(SignalsError::Mask(e)),
            }
        }
        let signals = Signals::new(list).map_err(SignalsError::Catch)?;
        Ok(DaemonSignals {
            signals,
            list: list.to_vec(),
        })
    }

    /// Unblocks the signals in the calling thread, which receives them from now on, and
    /// returns them as they arrive (one that arrives again before it is taken may be
    /// taken once), for ever.
    pub fn receive(&mut self) -> Result<impl Iterator<Item = c_int> + '_, SignalsError> {
        for &signal in &self.list {
            unblock_signal(signal).map_err(SignalsError::Mask)?;
        }
        Ok(self.signals.forever())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_sent_while_blocked_is_received_once_the_waiting_thread_unblocks_it() {
        // In a thread of its own, so that no other test's thread has the mask; SIGUSR2,
        // which nothing else in the tests uses.
        std::thread::spawn(|| {
            let mut signals = DaemonSignals::catch(&[libc::SIGUSR2]).unwrap();
            let waiter = std::thread::spawn(move || signals.receive().unwrap().next());
            // SAFETY: sends SIGUSR2 to this process, whose handler signal-hook installed.
            unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
            assert_eq!(waiter.join().unwrap(), Some(libc::SIGUSR2));
        })
        .join()
        .unwrap();
    }
}
