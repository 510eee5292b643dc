// SPDX-License-Identifier: Apache-2.0
//! A whole test VM: guest RAM, one virtqueue and the vhost-user connection, with a
//! request API like the guest driver's and a raw API for hand-made chains.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu_protocol::{
    DecodeError, DeviceConfig, Request, ResponseHeader, CONFIG_SIZE, RESPONSE_HEADER_SIZE,
};

use super::frontend::{DRIVER_FEATURES, F_EVENT_IDX, F_INDIRECT_DESC};
use super::{Buf, Error, Frontend, GuestRam, Notify, RawDesc, Result, VirtQueue};

/// Request buffers are handed out in multiples of this, so every one is cache-line aligned.
const CHUNK: u64 = 64;
/// Filled into a response header before submission: status 0xffffffff is no status, so
/// a header the device never wrote cannot read as OK.
const UNWRITTEN: u8 = 0xff;

/// How a [`Vm`] is built.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub ram_size: u64,
    /// Entries of the virtqueue (a power of two, at most what the backend allows).
    pub queue_size: u16,
    pub notify: Notify,
    /// Virtio features the driver asks for; the VM uses what the backend also offers.
    pub features: u64,
    /// Send each request as one indirect descriptor (when negotiated).
    pub indirect: bool,
    /// Bytes of RAM for request buffers; the rest stays free for [`GuestRam::alloc`].
    pub arena_size: u64,
    /// Longest wait for a response, and for the backend's socket.
    pub timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            ram_size: 64 << 20,
            queue_size: 256,
            notify: Notify::Interrupt,
            features: DRIVER_FEATURES,
            indirect: false,
            arena_size: 32 << 20,
            timeout: Duration::from_secs(20),
        }
    }
}

/// How one request is cut into descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Writable payload bytes ahead of the response header; `None`: what the operation
    /// needs ([`vgpu_protocol::Header::writable_len`]).
    pub writable_payload: Option<u32>,
    /// Cut the readable and the writable byte streams into descriptors of at most this
    /// many bytes (the response header may then straddle two); `None`: one descriptor
    /// for the header, one per payload, one for the response header.
    pub segment: Option<u32>,
    /// Override [`VmOptions::indirect`] for this request.
    pub indirect: Option<bool>,
}

/// The device's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The response header, or why the last 32 writable bytes are not one (unwritten).
    pub header: std::result::Result<ResponseHeader, DecodeError>,
    /// The writable payload the header says was written (at most what the chain had).
    pub data: Vec<u8>,
}

/// A chain the device returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    /// The request's tag, or the token given with a raw chain.
    pub token: u64,
    /// Bytes the device says it wrote into the chain.
    pub used_len: u32,
    /// For requests submitted through [`Vm::submit`]; `None` for raw chains.
    pub reply: Option<Reply>,
}

impl Completion {
    /// The response header and payload, or [`Error::NoResponse`].
    pub fn response(self) -> Result<(ResponseHeader, Vec<u8>)> {
        match self.reply {
            Some(Reply {
                header: Ok(h),
                data,
            }) => Ok((h, data)),
            _ => Err(Error::NoResponse {
                head: self.head,
                used_len: self.used_len,
            }),
        }
    }
}

struct InFlight {
    token: u64,
    /// Arena range the request's buffers live in.
    buffer: Option<(u64, u64)>,
    /// Where the writable payload and the response header are.
    reply: Option<(u64, u32, u64)>,
}

/// A test VM connected to a vGPU backend.
pub struct Vm {
    frontend: Frontend,
    queue: VirtQueue,
    ram: Arc<GuestRam>,
    config: DeviceConfig,
    arena: Arena,
    in_flight: HashMap<u16, InFlight>,
    done: VecDeque<Completion>,
    options: VmOptions,
}

impl Vm {
    /// Connects with [`VmOptions::default`].
    pub fn connect(socket: impl AsRef<Path>) -> Result<Vm> {
        Vm::connect_with(socket, VmOptions::default())
    }

    /// Connects and sets the device up as a guest driver would, retrying while the
    /// backend is (re)starting its listener.
    pub fn connect_with(socket: impl AsRef<Path>, options: VmOptions) -> Result<Vm> {
        let deadline = Instant::now() + options.timeout;
        loop {
            match Vm::try_connect(socket.as_ref(), &options, deadline) {
                Err(e @ (Error::Connect(_) | Error::Vhost { .. })) if Instant::now() < deadline => {
                    log::debug!("test VM connect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    fn try_connect(socket: &Path, options: &VmOptions, deadline: Instant) -> Result<Vm> {
        let left = deadline.saturating_duration_since(Instant::now());
        let frontend = Frontend::connect(socket, 1, left)?;
        let mut vm = Vm::set_up(frontend, options)?;
        vm.frontend.setup_done();
        Ok(vm)
    }

    fn set_up(mut frontend: Frontend, options: &VmOptions) -> Result<Vm> {
        let acked = frontend.set_features(options.features)?;
        let raw_config = frontend.get_config(0, CONFIG_SIZE as u32)?;
        let config = DeviceConfig::decode(&raw_config).map_err(Error::Config)?;
        let ram = Arc::new(GuestRam::new(options.ram_size)?);
        let mut queue = VirtQueue::new(ram.clone(), options.queue_size, acked & F_EVENT_IDX != 0)?;
        queue.set_notify(options.notify)?;
        let arena_size = options.arena_size.min(ram.free()) / CHUNK * CHUNK;
        let arena = Arena::new(ram.alloc(arena_size, 4096)?, arena_size);
        frontend.set_mem_table(&ram)?;
        frontend.start_vring(0, &queue)?;
        Ok(Vm {
            frontend,
            queue,
            ram,
            config,
            arena,
            in_flight: HashMap::new(),
            done: VecDeque::new(),
            options: options.clone(),
        })
    }

    /// The config space read at connect time.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub fn queue(&self) -> &VirtQueue {
        &self.queue
    }

    /// The queue itself, for raw driver work (push a bad head, publish without a kick).
    pub fn queue_mut(&mut self) -> &mut VirtQueue {
        &mut self.queue
    }

    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Virtio features in force.
    pub fn features(&self) -> u64 {
        self.frontend.acked_features()
    }

    /// Chains submitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Switches between interrupts and polling.
    pub fn set_notify(&mut self, notify: Notify) -> Result<()> {
        self.options.notify = notify;
        self.queue.set_notify(notify)
    }

    /// Sends one request and waits for its response. Completions of other chains that
    /// arrive meanwhile are kept for [`Vm::wait`].
    pub fn request(&mut self, request: &Request) -> Result<(ResponseHeader, Vec<u8>)> {
        let head = self.submit(request)?;
        self.wait_for(head)?.response()
    }

    /// Sends a request and kicks; returns the chain's head. The completion carries the
    /// request's tag as its token.
    pub fn submit(&mut self, request: &Request) -> Result<u16> {
        self.submit_shaped(request, Shape::default())
    }

    /// [`Vm::submit`] with the descriptor layout chosen by `shape`.
    pub fn submit_shaped(&mut self, request: &Request, shape: Shape) -> Result<u16> {
        let head = self.add_request(request, shape)?;
        self.queue.publish_and_kick()?;
        Ok(head)
    }

    /// Adds a request without publishing it, to batch several behind one
    /// [`Vm::flush`].
    pub fn add_request(&mut self, request: &Request, shape: Shape) -> Result<u16> {
        let readable = request.encode();
        let writable_payload = match shape.writable_payload {
            Some(n) => u64::from(n),
            None => request.header().writable_len(),
        };
        let indirect = shape.indirect.unwrap_or(self.options.indirect)
            && self.features() & F_INDIRECT_DESC != 0;
        let rlen = readable.len() as u64;
        let wlen = writable_payload + RESPONSE_HEADER_SIZE as u64;
        // Readable bytes, then the writable payload and the response header, then room
        // for an indirect table of the most descriptors this layout can make.
        let wstart = rlen.next_multiple_of(CHUNK);
        let mut parts: Vec<(u64, u64, bool)> = Vec::new();
        let max_descs = match shape.segment {
            Some(seg) => {
                let seg = u64::from(seg.max(1));
                rlen.div_ceil(seg) + wlen.div_ceil(seg)
            }
            None => 4,
        };
        let table_off = (wstart + wlen).next_multiple_of(CHUNK);
        let total = table_off + if indirect { 16 * max_descs } else { 0 };
        let base = self.arena.alloc(total)?;
        let release = |vm: &mut Vm, e: Error| {
            vm.arena.free(base, total);
            e
        };
        if let Err(e) = self.ram.write(base, &readable) {
            return Err(release(self, e));
        }
        let _ = self.ram.fill(base + wstart, wlen, UNWRITTEN);
        match shape.segment {
            Some(seg) => {
                let seg = u64::from(seg.max(1));
                split(&mut parts, base, rlen, seg, false);
                split(&mut parts, base + wstart, wlen, seg, true);
            }
            None => {
                let header = vgpu_protocol::REQUEST_HEADER_SIZE as u64;
                parts.push((base, header.min(rlen), false));
                if rlen > header {
                    parts.push((base + header, rlen - header, false));
                }
                if writable_payload > 0 {
                    parts.push((base + wstart, writable_payload, true));
                }
                parts.push((base + wstart + writable_payload, 32, true));
            }
        }
        let bufs: Vec<Buf> = parts
            .iter()
            .map(|&(addr, len, writable)| Buf {
                addr,
                len: len as u32,
                writable,
            })
            .collect();
        let added = if indirect {
            self.queue.add_indirect(base + table_off, &bufs)
        } else {
            self.queue.add(&bufs)
        };
        let head = match added {
            Ok(h) => h,
            Err(e) => return Err(release(self, e)),
        };
        self.in_flight.insert(
            head,
            InFlight {
                token: request.tag,
                buffer: Some((base, total)),
                reply: Some((
                    base + wstart,
                    writable_payload as u32,
                    base + wstart + writable_payload,
                )),
            },
        );
        Ok(head)
    }

    /// Submits a well-formed chain of buffers the caller laid out in guest RAM itself
    /// (e.g. a DMA buffer filled in place); the completion carries `token` and no reply.
    pub fn submit_chain(&mut self, bufs: &[Buf], token: u64) -> Result<u16> {
        let head = self.queue.add(bufs)?;
        self.track_raw(head, token);
        self.queue.publish_and_kick()?;
        Ok(head)
    }

    /// Submits hand-made descriptors exactly as given (see [`VirtQueue::add_raw`]).
    pub fn submit_raw(&mut self, descs: &[RawDesc], token: u64) -> Result<u16> {
        let head = self.queue.add_raw(descs)?;
        self.track_raw(head, token);
        self.queue.publish_and_kick()?;
        Ok(head)
    }

    fn track_raw(&mut self, head: u16, token: u64) {
        self.in_flight.insert(
            head,
            InFlight {
                token,
                buffer: None,
                reply: None,
            },
        );
    }

    /// Publishes added chains and kicks if the device wants it.
    pub fn flush(&mut self) -> Result<()> {
        self.queue.publish_and_kick()
    }

    /// Collects every completion the device has returned so far, without waiting.
    /// Returns how many are ready for [`Vm::take_completions`].
    pub fn reap(&mut self) -> Result<usize> {
        while let Some(used) = self.queue.pop_used()? {
            let Some(f) = self.in_flight.remove(&used.head) else {
                return Err(Error::UnexpectedUsed {
                    id: u32::from(used.head),
                    len: used.len,
                });
            };
            let reply = match f.reply {
                Some((payload, payload_len, resp)) => {
                    let mut raw = [0u8; RESPONSE_HEADER_SIZE];
                    self.ram.read(resp, &mut raw)?;
                    let header = ResponseHeader::decode(&raw);
                    let n = header.as_ref().map_or(0, |h| h.written.min(payload_len));
                    Some(Reply {
                        header,
                        data: self.ram.read_vec(payload, n as usize)?,
                    })
                }
                None => None,
            };
            if let Some((base, len)) = f.buffer {
                self.arena.free(base, len);
            }
            self.done.push_back(Completion {
                head: used.head,
                token: f.token,
                used_len: used.len,
                reply,
            });
        }
        Ok(self.done.len())
    }

    /// Takes the completions collected so far.
    pub fn take_completions(&mut self) -> Vec<Completion> {
        self.done.drain(..).collect()
    }

    /// Waits (by interrupt or polling) until at least one completion is ready, and
    /// returns all that are.
    pub fn wait(&mut self) -> Result<Vec<Completion>> {
        self.wait_timeout(self.options.timeout)
    }

    /// [`Vm::wait`] with its own limit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        if self.reap()? == 0 {
            self.queue.wait_used(timeout)?;
            self.reap()?;
        }
        Ok(self.take_completions())
    }

    /// Waits for the chain with this head; others returned meanwhile stay queued.
    pub fn wait_for(&mut self, head: u16) -> Result<Completion> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            self.reap()?;
            if let Some(i) = self.done.iter().position(|c| c.head == head) {
                return Ok(self.done.remove(i).expect("index just found"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(self.options.timeout));
            }
            self.queue.wait_used(left)?;
        }
    }

    /// Guest RAM from the request arena, e.g. for hand-made chains; give it back with
    /// [`Vm::free_buffer`].
    pub fn alloc_buffer(&mut self, len: u64) -> Result<u64> {
        self.arena.alloc(len)
    }

    pub fn free_buffer(&mut self, addr: u64, len: u64) {
        self.arena.free(addr, len);
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("frontend", &self.frontend)
            .field("queue", &self.queue)
            .field("ram", &self.ram)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

/// Cuts `[addr, addr+len)` into pieces of at most `seg` bytes.
fn split(parts: &mut Vec<(u64, u64, bool)>, addr: u64, len: u64, seg: u64, writable: bool) {
    let mut off = 0;
    while off < len {
        let n = seg.min(len - off);
        parts.push((addr + off, n, writable));
        off += n;
    }
}

/// First-fit allocator of request buffers inside one guest range, so requests of any
/// size can be in flight together and come back in any order.
struct Arena {
    /// Free ranges by start address, coalesced.
    free: BTreeMap<u64, u64>,
}

impl Arena {
    fn new(start: u64, len: u64) -> Arena {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(start, len);
        }
        Arena { free }
    }

    fn alloc(&mut self, len: u64) -> Result<u64> {
        let len = len.max(1).next_multiple_of(CHUNK);
        let found = self
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&s, &l)| (s, l));
        let Some((start, have)) = found else {
            return Err(Error::OutOfGuestRam {
                wanted: len,
                free: self.free.values().copied().max().unwrap_or(0),
            });
        };
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Ok(start)
    }

    fn free(&mut self, start: u64, len: u64) {
        let mut start = start;
        let mut len = len.max(1).next_multiple_of(CHUNK);
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_reuses_and_coalesces_freed_ranges() {
        let mut a = Arena::new(0x1000, 0x1000);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(64).unwrap();
        let z = a.alloc(0x1000 - 192).unwrap();
        assert_eq!((x, y, z), (0x1000, 0x1080, 0x10c0));
        assert!(a.alloc(1).is_err());
        a.free(y, 64);
        a.free(x, 100);
        assert_eq!(a.alloc(192).unwrap(), 0x1000);
        a.free(0x1000, 192);
        a.free(z, 0x1000 - 192);
        assert_eq!(a.alloc(0x1000).unwrap(), 0x1000);
    }

    #[test]
    fn split_cuts_into_bounded_pieces() {
        let mut parts = Vec::new();
        split(&mut parts, 100, 10, 4, true);
        assert_eq!(parts, vec![(100, 4, true), (104, 4, true), (108, 2, true)]);
    }
}
