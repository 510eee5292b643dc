// SPDX-License-Identifier: Apache-2.0
//! The driver side of a split virtqueue, over [`GuestRam`]: descriptor table, available
//! ring and used ring laid out as the virtio 1.x spec says (section 2.7), with the
//! notification suppression of `VIRTIO_RING_F_EVENT_IDX`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Error, GuestRam, Result};

/// Descriptor flag: `next` is valid.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Available-ring flag: the driver does not want interrupts (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want kicks (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

const DESC_SIZE: u64 = 16;

/// One buffer of a chain: a guest range and who may write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// True for a buffer the device writes (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Buf {
    pub fn readable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    pub fn writable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// Where a hand-made descriptor points next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Last descriptor: `NEXT` clear, `next` 0.
    End,
    /// `NEXT` set, pointing at the descriptor at this position of the same hand-made
    /// chain (it may point backwards: a loop).
    To(usize),
    /// `NEXT` set with this raw table index (out of the table, or someone else's slot).
    Raw(u16),
}

/// A hand-made descriptor: any address, length and flags. `NEXT` comes from `link`;
/// set `DESC_F_WRITE` or `DESC_F_INDIRECT` in `flags` as wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub link: Link,
}

/// One entry the device put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head of the returned chain.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// How the driver learns that the device used a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// Sleep on the call eventfd; the device signals it.
    Interrupt,
    /// Spin on the used index; interrupts are suppressed.
    Polling,
}

/// The driver's half of a split virtqueue.
pub struct VirtQueue {
    ram: Arc<GuestRam>,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    notify: Notify,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// For every head in flight, the descriptor indices its chain holds.
    chains: Vec<Option<Vec<u16>>>,
    /// Next available-ring index to fill (not yet visible to the device until published).
    avail_idx: u16,
    /// Available index the device last saw through a kick (EVENT_IDX bookkeeping).
    kicked_idx: u16,
    last_used: u16,
    in_flight: usize,
    kick: EventFd,
    call: EventFd,
}

impl VirtQueue {
    /// A queue of `size` entries (a power of two) with its rings allocated in `ram`.
    pub fn new(ram: Arc<GuestRam>, size: u16, event_idx: bool) -> Result<VirtQueue> {
        if !size.is_power_of_two() {
            return Err(Error::QueueSize(size));
        }
        let n = u64::from(size);
        // Alignments of virtio 1.x split rings: table 16, available 2, used 4.
        let desc = ram.alloc(DESC_SIZE * n, 16)?;
        let avail = ram.alloc(6 + 2 * n, 2)?;
        let used = ram.alloc(6 + 8 * n, 4)?;
        ram.fill(desc, DESC_SIZE * n, 0)?;
        ram.fill(avail, 6 + 2 * n, 0)?;
        ram.fill(used, 6 + 8 * n, 0)?;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(Error::Eventfd);
        Ok(VirtQueue {
            size,
            desc,
            avail,
            used,
            event_idx,
            notify: Notify::Interrupt,
            free: (0..size).rev().collect(),
            chains: vec![None; size as usize],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            in_flight: 0,
            kick: eventfd()?,
            call: eventfd()?,
            ram,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest physical addresses of the descriptor table, available ring and used ring.
    pub fn rings(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The eventfd the driver writes to kick the device (`SET_VRING_KICK`).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes to interrupt the driver (`SET_VRING_CALL`).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Chains added and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Chooses interrupts or polling, and tells the device through the rings.
    pub fn set_notify(&mut self, notify: Notify) -> Result<()> {
        self.notify = notify;
        self.update_interrupt_suppression()
    }

    pub fn notify(&self) -> Notify {
        self.notify
    }

    /// Adds a chain of buffers, readable ones first by convention (the order is kept).
    /// Returns its head; the device sees it after [`publish`](VirtQueue::publish).
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(Error::EmptyChain);
        }
        let descs: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| RawDesc {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { DESC_F_WRITE } else { 0 },
                link: if i + 1 < bufs.len() {
                    Link::To(i + 1)
                } else {
                    Link::End
                },
            })
            .collect();
        self.add_raw(&descs)
    }

    /// Adds a chain as one `INDIRECT` descriptor whose table, `bufs.len()` entries,
    /// is written at `table` (16-byte entries; the caller owns that guest range).
    pub fn add_indirect(&mut self, table: u64, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(Error::EmptyChain);
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            write_desc(
                &self.ram,
                table + DESC_SIZE * i as u64,
                b.addr,
                b.len,
                flags,
                next,
            )?;
        }
        let len = u32::try_from(DESC_SIZE * bufs.len() as u64).map_err(|_| Error::EmptyChain)?;
        self.add_raw(&[RawDesc {
            addr: table,
            len,
            flags: DESC_F_INDIRECT,
            link: Link::End,
        }])
    }

    /// Writes hand-made descriptors into free table slots and adds the first as a head.
    /// Positions in [`Link::To`] are translated to the slots chosen; nothing is checked,
    /// so loops, out-of-RAM addresses and wrong directions reach the device as written.
    pub fn add_raw(&mut self, descs: &[RawDesc]) -> Result<u16> {
        if descs.is_empty() {
            return Err(Error::EmptyChain);
        }
        if descs.len() > self.free.len() {
            return Err(Error::QueueFull {
                needed: descs.len(),
                free: self.free.len(),
            });
        }
        if let Some(i) = descs.iter().find_map(|d| match d.link {
            Link::To(i) if i >= descs.len() => Some(i),
            _ => None,
        }) {
            return Err(Error::BadLink(i));
        }
        let slots: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("counted above"))
            .collect();
        for (d, &slot) in descs.iter().zip(&slots) {
            let (flags, next) = match d.link {
                Link::End => (d.flags & !DESC_F_NEXT, 0),
                Link::To(i) => (d.flags | DESC_F_NEXT, slots[i]),
                Link::Raw(n) => (d.flags | DESC_F_NEXT, n),
            };
            write_desc(
                &self.ram,
                self.desc + DESC_SIZE * u64::from(slot),
                d.addr,
                d.len,
                flags,
                next,
            )?;
        }
        let head = slots[0];
        self.chains[head as usize] = Some(slots);
        self.in_flight += 1;
        self.push_avail(head)?;
        Ok(head)
    }

    /// Puts any value in the next available-ring entry, e.g. a head outside the table.
    /// Nothing is tracked: the device cannot return such a head.
    pub fn push_avail(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        self.ram.write_u16(self.avail + 4 + 2 * slot, head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every added chain visible to the device. Returns whether the device asked
    /// to be kicked (its notification suppression, EVENT_IDX or `NO_NOTIFY`).
    pub fn publish(&mut self) -> Result<bool> {
        self.ram
            .store_u16(self.avail + 2, self.avail_idx, Ordering::Release)?;
        // The index store must be visible before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        if self.event_idx {
            let avail_event = self
                .ram
                .load_u16(self.used + 4 + 8 * u64::from(self.size), Ordering::Acquire)?;
            Ok(need_event(avail_event, new, old))
        } else {
            let flags = self.ram.load_u16(self.used, Ordering::Acquire)?;
            Ok(flags & USED_F_NO_NOTIFY == 0 && new != old)
        }
    }

    /// Signals the kick eventfd.
    pub fn kick(&self) -> Result<()> {
        self.kick.write(1).map_err(Error::Eventfd)
    }

    /// Publishes and kicks when the device wants a kick.
    pub fn publish_and_kick(&mut self) -> Result<()> {
        if self.publish()? {
            self.kick()?;
        }
        Ok(())
    }

    /// Whether the device returned entries not yet popped.
    pub fn has_used(&self) -> Result<bool> {
        Ok(self.ram.load_u16(self.used + 2, Ordering::Acquire)? != self.last_used)
    }

    /// Takes the next used entry and frees its descriptors. An id that is not a chain in
    /// flight (a duplicate, or never added) is [`Error::UnexpectedUsed`]; the entry is
    /// consumed either way.
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        let used_idx = self.ram.load_u16(self.used + 2, Ordering::Acquire)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        let id = self.ram.read_u32(elem)?;
        let len = self.ram.read_u32(elem + 4)?;
        self.last_used = self.last_used.wrapping_add(1);
        self.update_interrupt_suppression()?;
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get_mut(i))
            .and_then(Option::take);
        match chain {
            Some(slots) => {
                self.free.extend(slots);
                self.in_flight -= 1;
                Ok(Some(Used {
                    head: id as u16,
                    len,
                }))
            }
            None => Err(Error::UnexpectedUsed { id, len }),
        }
    }

    /// Waits until the device has returned something, by the queue's [`Notify`] mode,
    /// at most `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        match self.notify {
            Notify::Polling => {
                let mut spins = 0u32;
                while !self.has_used()? {
                    spins = spins.wrapping_add(1);
                    if spins % 1024 == 0 && Instant::now() > deadline {
                        return Err(Error::Timeout(timeout));
                    }
                    std::hint::spin_loop();
                }
                Ok(())
            }
            Notify::Interrupt => loop {
                // Consume a pending interrupt first, then look at the ring: an
                // interrupt that arrives after this look wakes the poll below.
                let _ = self.call.read();
                if self.has_used()? {
                    return Ok(());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout(timeout));
                }
                wait_readable(&self.call, left)?;
            },
        }
    }

    /// Tells the device when to interrupt: after the next used entry (interrupt mode), or
    /// never (polling).
    fn update_interrupt_suppression(&self) -> Result<()> {
        if self.event_idx {
            // used_event: interrupt once the used index passes this value. In polling
            // mode keep it half a ring-index space ahead, which is never reached because
            // it moves on with every pop.
            let event = match self.notify {
                Notify::Interrupt => self.last_used,
                Notify::Polling => self.last_used.wrapping_add(0x7fff),
            };
            self.ram.store_u16(
                self.avail + 4 + 2 * u64::from(self.size),
                event,
                Ordering::Release,
            )?;
        } else {
            let flags = match self.notify {
                Notify::Interrupt => 0,
                Notify::Polling => AVAIL_F_NO_INTERRUPT,
            };
            self.ram.store_u16(self.avail, flags, Ordering::Release)?;
        }
        // The suppression state must be visible before the driver next reads the used index.
        fence(Ordering::SeqCst);
        Ok(())
    }
}

impl std::fmt::Debug for VirtQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtQueue")
            .field("size", &self.size)
            .field("event_idx", &self.event_idx)
            .field("notify", &self.notify)
            .field("in_flight", &self.in_flight)
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish()
    }
}

/// The spec's `vring_need_event`: whether moving an index from `old` to `new` passes
/// the other side's `event` value.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Writes one 16-byte descriptor at guest address `at`.
pub fn write_desc(
    ram: &GuestRam,
    at: u64,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<()> {
    let mut d = [0u8; DESC_SIZE as usize];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write(at, &d)
}

/// Blocks until `fd` is readable or `timeout` passes (then returns Ok anyway: the
/// caller looks at the ring again and decides).
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Eventfd(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    /// The device side: virtio-queue's `Queue` over a second mapping of the same memfd.
    fn device(vq: &VirtQueue) -> (GuestMemoryMmap, Queue) {
        let ram = vq.ram();
        // SAFETY: dup of a valid fd.
        let fd = unsafe { libc::dup(ram.fd()) };
        assert!(fd >= 0);
        // SAFETY: `fd` is ours.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(ram.base()),
            ram.size() as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let mut q = Queue::new(vq.size()).unwrap();
        let (d, a, u) = vq.rings();
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q.set_event_idx(vq.event_idx());
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        (mem, q)
    }

    use std::os::fd::FromRawFd;

    fn queue(event_idx: bool) -> VirtQueue {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        VirtQueue::new(ram, 8, event_idx).unwrap()
    }

    #[test]
    fn chains_reach_the_device_in_order_and_come_back_freed() {
        let mut vq = queue(false);
        let buf = vq.ram().alloc(64, 8).unwrap();
        vq.ram().write(buf, b"hello").unwrap();
        let h1 = vq
            .add(&[Buf::readable(buf, 5), Buf::writable(buf + 32, 32)])
            .unwrap();
        let h2 = vq.add(&[Buf::writable(buf + 8, 4)]).unwrap();
        assert_eq!(vq.num_free(), 5);
        assert!(vq.publish().unwrap(), "no suppression: a kick is due");
        let (mem, mut q) = device(&vq);
        let chains: Vec<_> = q.iter(&mem).unwrap().collect();
        assert_eq!(chains.len(), 2);
        let d: Vec<_> = chains[0].clone().collect();
        assert_eq!((chains[0].head_index(), d.len()), (h1, 2));
        assert_eq!(
            (d[0].addr().0, d[0].len(), d[0].is_write_only()),
            (buf, 5, false)
        );
        assert_eq!(
            (d[1].addr().0, d[1].len(), d[1].is_write_only()),
            (buf + 32, 32, true)
        );
        q.add_used(&mem, h2, 4).unwrap();
        q.add_used(&mem, h1, 32).unwrap();
        assert_eq!(vq.pop_used().unwrap(), Some(Used { head: h2, len: 4 }));
        assert_eq!(vq.pop_used().unwrap(), Some(Used { head: h1, len: 32 }));
        assert_eq!(vq.pop_used().unwrap(), None);
        assert_eq!((vq.num_free(), vq.in_flight()), (8, 0));
    }

    #[test]
    fn indirect_tables_and_duplicate_returns_are_seen() {
        let mut vq = queue(false);
        let table = vq.ram().alloc(48, 16).unwrap();
        let h = vq
            .add_indirect(
                table,
                &[
                    Buf::readable(0x1000, 80),
                    Buf::readable(0x2000, 8),
                    Buf::writable(0x3000, 32),
                ],
            )
            .unwrap();
        vq.publish().unwrap();
        let (mem, mut q) = device(&vq);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let d: Vec<_> = chain.collect();
        assert_eq!(d.len(), 3);
        assert_eq!((d[2].addr().0, d[2].is_write_only()), (0x3000, true));
        q.add_used(&mem, h, 0).unwrap();
        q.add_used(&mem, h, 0).unwrap();
        assert_eq!(vq.pop_used().unwrap(), Some(Used { head: h, len: 0 }));
        assert!(matches!(vq.pop_used(), Err(Error::UnexpectedUsed { .. })));
    }

    #[test]
    fn event_idx_suppresses_kicks_and_interrupts_as_asked() {
        let mut vq = queue(true);
        let (mem, mut q) = device(&vq);
        // The device wants a kick once avail idx passes 0 (its avail_event starts at 0).
        vq.add(&[Buf::writable(0x1000, 32)]).unwrap();
        assert!(vq.publish().unwrap());
        let chain = q.iter(&mem).unwrap().next().unwrap();
        // The device now asks for a kick only after index 5.
        q.set_next_avail(1);
        let (_, _, used) = vq.rings();
        vq.ram()
            .store_u16(used + 4 + 8 * 8, 5, Ordering::SeqCst)
            .unwrap();
        vq.add(&[Buf::writable(0x1000, 32)]).unwrap();
        assert!(!vq.publish().unwrap(), "avail_event not passed: no kick");
        q.add_used(&mem, chain.head_index(), 0).unwrap();
        // Interrupt mode: used_event = last used, so the device must signal.
        vq.set_notify(Notify::Interrupt).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
        vq.pop_used().unwrap().unwrap();
        // Polling: the device need not signal.
        vq.set_notify(Notify::Polling).unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        q.add_used(&mem, chain.head_index(), 0).unwrap();
        assert!(!q.needs_notification(&mem).unwrap());
    }

    #[test]
    fn hand_made_loops_and_raw_links_are_written_as_given() {
        let mut vq = queue(false);
        let h = vq
            .add_raw(&[
                RawDesc {
                    addr: 1,
                    len: 2,
                    flags: 0,
                    link: Link::To(1),
                },
                RawDesc {
                    addr: 3,
                    len: 4,
                    flags: DESC_F_WRITE,
                    link: Link::To(0),
                },
            ])
            .unwrap();
        vq.publish().unwrap();
        let (mem, mut q) = device(&vq);
        // virtio-queue stops a loop after queue-size descriptors.
        let n = q.iter(&mem).unwrap().next().unwrap().count();
        assert_eq!(n, 8);
        assert!(matches!(
            vq.add_raw(&[RawDesc {
                addr: 0,
                len: 0,
                flags: 0,
                link: Link::To(5)
            }]),
            Err(Error::BadLink(5))
        ));
        let _ = h;
    }

    #[test]
    fn need_event_matches_the_spec() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(1, 2, 0));
        assert!(need_event(0xffff, 0, 0xffff));
        assert!(!need_event(5, 3, 1));
    }
}
