// SPDX-License-Identifier: Apache-2.0
//! The VMM's side of the vhost-user socket: feature negotiation, config space, the memory
//! table and vring setup, in the order QEMU sends them.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend as VhostFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{Error, GuestRam, Result, VirtQueue};

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
/// The virtio features a guest driver of this device asks for.
pub const DRIVER_FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC;

/// A connected vhost-user frontend.
pub struct Frontend {
    inner: VhostFrontend,
    /// Dropping it stops the watchdog that cuts a setup that takes too long.
    watchdog: Option<mpsc::Sender<()>>,
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
}

impl Frontend {
    /// Connects to a backend's socket, retrying while it is not (yet, or again) listening,
    /// and takes ownership of the device (`SET_OWNER`, `GET_FEATURES`, protocol features).
    ///
    /// The whole setup must be over within `timeout`: unless [`Frontend::setup_done`] is
    /// called by then, the connection is cut, so that a backend that stops answering fails
    /// the call waiting for its reply instead of hanging it.
    pub fn connect(socket: &Path, num_queues: u64, timeout: Duration) -> Result<Frontend> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(Error::Connect(e)),
            }
        };
        // The vhost crate waits for replies without a limit: a watchdog cuts the
        // connection at the deadline unless the setup is done by then.
        let connection = stream.try_clone().map_err(Error::Connect)?;
        let (watchdog, disarmed) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(left) {
                let _ = connection.shutdown(std::net::Shutdown::Both);
            }
        });
        let mut inner = VhostFrontend::from_stream(stream, num_queues);
        inner.set_owner().map_err(Error::vhost("SET_OWNER"))?;
        let offered = inner.get_features().map_err(Error::vhost("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let theirs = inner
                .get_protocol_features()
                .map_err(Error::vhost("GET_PROTOCOL_FEATURES"))?;
            protocol = theirs
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK);
            inner
                .set_protocol_features(protocol)
                .map_err(Error::vhost("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later message is acknowledged, so a refused one fails here.
                inner.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Frontend {
            inner,
            watchdog: Some(watchdog),
            offered,
            acked: 0,
            protocol,
        })
    }

    /// The virtio features the backend offers.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The virtio features acknowledged by [`Frontend::set_features`].
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Acknowledges `wanted & offered` (plus the vhost-user protocol-features bit when
    /// offered, as QEMU does) and returns what was acknowledged.
    pub fn set_features(&mut self, wanted: u64) -> Result<u64> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let acked = (wanted | protocol_bit) & self.offered;
        self.inner
            .set_features(acked)
            .map_err(Error::vhost("SET_FEATURES"))?;
        self.acked = acked;
        Ok(acked)
    }

    /// Queues the backend serves (`GET_QUEUE_NUM`, with protocol feature MQ), else 1.
    pub fn queue_num(&mut self) -> Result<u64> {
        if !self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Ok(1);
        }
        self.inner
            .get_queue_num()
            .map_err(Error::vhost("GET_QUEUE_NUM"))
    }

    /// `size` bytes of config space from `offset` (`GET_CONFIG`).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .inner
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .map_err(Error::vhost("GET_CONFIG"))?;
        Ok(data)
    }

    /// Shares all of `ram` (`SET_MEM_TABLE` with its memfd).
    pub fn set_mem_table(&self, ram: &GuestRam) -> Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: ram.base(),
            memory_size: ram.size(),
            userspace_addr: ram.userspace_addr(),
            mmap_offset: 0,
            mmap_handle: ram.fd(),
        };
        self.inner
            .set_mem_table(&[region])
            .map(|_| ())
            .map_err(Error::vhost("SET_MEM_TABLE"))
    }

    /// Hands queue `index` to the backend: size, base 0, ring addresses (as this
    /// process's addresses, which the backend translates through the memory table),
    /// call, kick, then enable.
    pub fn start_vring(&mut self, index: usize, vq: &VirtQueue) -> Result<()> {
        let ram = vq.ram();
        let n = u64::from(vq.size());
        let (desc, avail, used) = vq.rings();
        let config = VringConfigData {
            queue_max_size: vq.size(),
            queue_size: vq.size(),
            flags: 0,
            desc_table_addr: ram.userspace_addr_of(desc, 16 * n)?,
            used_ring_addr: ram.userspace_addr_of(used, 6 + 8 * n)?,
            avail_ring_addr: ram.userspace_addr_of(avail, 6 + 2 * n)?,
            log_addr: None,
        };
        self.inner
            .set_vring_num(index, vq.size())
            .map_err(Error::vhost("SET_VRING_NUM"))?;
        self.inner
            .set_vring_base(index, 0)
            .map_err(Error::vhost("SET_VRING_BASE"))?;
        self.inner
            .set_vring_addr(index, &config)
            .map_err(Error::vhost("SET_VRING_ADDR"))?;
        // Call before kick: the backend starts the ring on the kick fd, and an interrupt
        // raised before it knows the call fd would be lost.
        self.inner
            .set_vring_call(index, vq.call_fd())
            .map_err(Error::vhost("SET_VRING_CALL"))?;
        self.inner
            .set_vring_kick(index, vq.kick_fd())
            .map_err(Error::vhost("SET_VRING_KICK"))?;
        if self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.inner
                .set_vring_enable(index, true)
                .map_err(Error::vhost("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Disarms the connect watchdog: the setup is complete.
    pub fn setup_done(&mut self) {
        self.watchdog = None;
    }

    /// The vhost crate's frontend, for messages this wrapper does not cover.
    pub fn inner(&mut self) -> &mut VhostFrontend {
        &mut self.inner
    }
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("protocol", &self.protocol)
            .finish()
    }
}
