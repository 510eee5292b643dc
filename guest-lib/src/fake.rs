// SPDX-License-Identifier: Apache-2.0
//! A small in-process device for unit tests: enough of the protocol to check what the
//! library sends (chunking, argument encoding, asynchronous submission) and how it maps
//! replies to errors.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vgpu_protocol::{
    Command, DeviceConfig, ExecutorKind, FunctionInfo, Header, InfoReply, Launch, Opcode, Param,
    Request, Response, ResponseHeader, Status, REQUEST_HEADER_SIZE,
};

use crate::error::{Error, Result};
use crate::transport::{
    opcode_name, AsyncFailure, HostMemory, InProcessTransport, Reply, Transport, ASYNC_MAX_BYTES,
    POLL_MAX_US,
};
use crate::Session;

pub const QUOTA: u64 = 64 << 20;
pub const NAME: &str = "Fake vGPU (test)";
/// Device address of the first allocation; each later one follows the previous,
/// 256-byte aligned.
pub const ADDRESS_BASE: u64 = 0x7f00_0000_0000;
/// The device variable every loaded module of the fake device has, and its size.
pub const GLOBAL_NAME: &str = "counter";
pub const GLOBAL_SIZE: u64 = 16;

/// Attribute `n` of the fake device is `n * 10`.
pub fn attribute(n: u32) -> i32 {
    n as i32 * 10
}

/// The FUNCTION_INFO of the fake device's built-in kernels: pointers of 8 bytes and
/// 4-byte scalars, packed as a C compiler would.
pub fn builtin_info(name: &str) -> Option<FunctionInfo> {
    let params = match name {
        "vector_add_f32" => vec![(0, 8), (8, 8), (16, 8), (24, 4)],
        "scale_f32" => vec![(0, 8), (8, 4), (12, 4)],
        _ => return None,
    };
    Some(FunctionInfo {
        attributes: [1024, 0, 0, 0, 16, 80, 80, 0, 48 << 10, -1],
        params,
    })
}

#[derive(Default)]
struct FakeSession {
    buffers: HashMap<u64, Vec<u8>>,
    /// Buffers that are module globals: FREE refuses them, their unload frees them.
    globals: HashMap<u64, u64>,
    modules: HashSet<u64>,
    sticky: Option<(Status, u32)>,
}

#[derive(Default)]
pub struct State {
    sessions: HashMap<u64, FakeSession>,
    next_id: u64,
    next_address: u64,
    /// Every request the device executed, in order.
    pub log: Vec<Request>,
    /// The error the next SYNC of any session reports (an asynchronous failure).
    pub fail_sync: Option<(Status, u32)>,
    /// The host GPU the device says it is placed on.
    pub gpu: u32,
}

impl State {
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn buffers(&self) -> usize {
        self.sessions.values().map(|s| s.buffers.len()).sum()
    }

    pub fn modules(&self) -> usize {
        self.sessions.values().map(|s| s.modules.len()).sum()
    }

    fn mem_used(&self) -> u64 {
        self.sessions
            .values()
            .flat_map(|s| s.buffers.values())
            .map(|b| b.len() as u64)
            .sum()
    }
}

#[derive(Default)]
pub struct FakeDevice {
    pub state: Mutex<State>,
}

pub fn config() -> DeviceConfig {
    DeviceConfig {
        version: 1,
        num_queues: 1,
        max_request_bytes: 1 << 29,
        executor: ExecutorKind::Cpu,
        cc_major: 0,
        cc_minor: 0,
        mem_quota: QUOTA,
        device_memory: 1 << 30,
        multiprocessors: 2,
        max_sessions: 8,
        name: NAME.into(),
        gpu: 0,
    }
}

impl FakeDevice {
    pub fn new() -> Arc<FakeDevice> {
        Arc::new(FakeDevice::default())
    }

    /// A session over an [`InProcessTransport`] on this device.
    pub fn session(self: &Arc<Self>) -> Session {
        Session::from_transport(Box::new(self.transport()))
    }

    pub fn transport(self: &Arc<Self>) -> InProcessTransport {
        let dev = self.clone();
        InProcessTransport::new(Arc::new(move |r| dev.handle(r))).unwrap()
    }

    pub fn handle(&self, r: Request) -> Response {
        let mut st = self.state.lock().unwrap();
        st.log.push(r.clone());
        let st = &mut *st;
        let Request {
            session, command, ..
        } = r;
        match command {
            Command::Info => {
                let info = InfoReply {
                    config: DeviceConfig {
                        gpu: st.gpu,
                        ..config()
                    },
                    mem_used: st.mem_used(),
                    sessions: st.sessions.len() as u32,
                    allocations: st.buffers() as u32,
                    modules: st.modules() as u32,
                    weight: 1,
                };
                return Response::data(info.encode().to_vec());
            }
            Command::SessionOpen => {
                st.next_id += 1;
                st.sessions.insert(st.next_id, FakeSession::default());
                return Response::value(st.next_id);
            }
            Command::SessionClose => {
                return match st.sessions.remove(&session) {
                    Some(_) => Response::ok(),
                    None => Response::error(Status::InvalidSession, 0),
                };
            }
            Command::Selftest { .. } => return Response::data(b"fake self-test passed".to_vec()),
            _ => {}
        }
        let used = st.mem_used();
        let fail_sync = st.fail_sync;
        let Some(s) = st.sessions.get_mut(&session) else {
            return Response::error(Status::InvalidSession, 0);
        };
        if let Some((status, detail)) = s.sticky {
            return Response::error(status, detail);
        }
        let ids = Ids {
            next_id: &mut st.next_id,
            next_address: &mut st.next_address,
        };
        match run(s, ids, used, fail_sync, command) {
            Ok(r) => r,
            Err(status) => Response::error(status, 0),
        }
    }
}

fn range(buf: &[u8], offset: u64, len: u64) -> Result<std::ops::Range<usize>, Status> {
    let end = offset.checked_add(len).ok_or(Status::OutOfRange)?;
    if end > buf.len() as u64 {
        return Err(Status::OutOfRange);
    }
    Ok(offset as usize..end as usize)
}

/// The device's counters: handles, and device addresses for new buffers.
struct Ids<'a> {
    next_id: &'a mut u64,
    next_address: &'a mut u64,
}

impl Ids<'_> {
    fn buffer(&mut self, size: u64) -> (u64, u64) {
        *self.next_id += 1;
        let address = ADDRESS_BASE + *self.next_address;
        *self.next_address += size.div_ceil(256).max(1) * 256;
        (*self.next_id, address)
    }
}

fn run(
    s: &mut FakeSession,
    mut ids: Ids<'_>,
    used: u64,
    fail_sync: Option<(Status, u32)>,
    command: Command,
) -> Result<Response, Status> {
    let next_id = &mut *ids.next_id;
    Ok(match command {
        Command::Alloc { size } => {
            if used + size > QUOTA {
                return Err(Status::QuotaExceeded);
            }
            let (handle, address) = ids.buffer(size);
            s.buffers.insert(handle, vec![0xA5; size as usize]);
            Response {
                value1: address,
                ..Response::value(handle)
            }
        }
        Command::Free { handle } => {
            if s.globals.contains_key(&handle) {
                return Err(Status::InvalidHandle);
            }
            s.buffers.remove(&handle).ok_or(Status::InvalidHandle)?;
            Response::ok()
        }
        Command::Htod { dst, offset, data } => {
            let b = s.buffers.get_mut(&dst).ok_or(Status::InvalidHandle)?;
            let r = range(b, offset, data.len() as u64)?;
            b[r].copy_from_slice(&data);
            Response::ok()
        }
        Command::Dtoh { src, offset, len } => {
            let b = s.buffers.get(&src).ok_or(Status::InvalidHandle)?;
            Response::data(b[range(b, offset, len)?].to_vec())
        }
        Command::Dtod {
            dst,
            dst_offset,
            src,
            src_offset,
            len,
        } => {
            let from = s.buffers.get(&src).ok_or(Status::InvalidHandle)?;
            let data = from[range(from, src_offset, len)?].to_vec();
            let to = s.buffers.get_mut(&dst).ok_or(Status::InvalidHandle)?;
            let r = range(to, dst_offset, len)?;
            to[r].copy_from_slice(&data);
            Response::ok()
        }
        Command::Memset {
            dst,
            offset,
            len,
            value,
            width,
        } => {
            let b = s.buffers.get_mut(&dst).ok_or(Status::InvalidHandle)?;
            let r = range(b, offset, len)?;
            if width == 1 {
                b[r].fill(value as u8);
            } else {
                b[r].chunks_exact_mut(4)
                    .for_each(|w| w.copy_from_slice(&value.to_le_bytes()));
            }
            Response::ok()
        }
        Command::ModuleLoad { .. } => {
            *next_id += 1;
            s.modules.insert(*next_id);
            Response::value(*next_id)
        }
        // A cubin (ELF) or fatbin loads; anything else is not an image.
        Command::ModuleLoadImage { image } => {
            if !image.starts_with(b"\x7fELF") && !image.starts_with(&0xBA55_ED50u32.to_le_bytes()) {
                return Err(Status::ModuleInvalid);
            }
            *next_id += 1;
            s.modules.insert(*next_id);
            Response::value(*next_id)
        }
        Command::ModuleUnload { module } => {
            if !s.modules.remove(&module) {
                return Err(Status::InvalidHandle);
            }
            let gone: Vec<u64> = s
                .globals
                .iter()
                .filter(|&(_, &m)| m == module)
                .map(|(&h, _)| h)
                .collect();
            for h in gone {
                s.globals.remove(&h);
                s.buffers.remove(&h);
            }
            Response::ok()
        }
        Command::DeviceAttributes { count } => Response::data(
            (1..=count)
                .flat_map(|n| attribute(n).to_le_bytes())
                .collect(),
        ),
        Command::FunctionInfo { module, name } => {
            if module != 0 {
                return Err(if s.modules.contains(&module) {
                    Status::KernelNotFound
                } else {
                    Status::InvalidHandle
                });
            }
            Response::data(builtin_info(&name).ok_or(Status::KernelNotFound)?.encode())
        }
        Command::ModuleGlobal { module, name } => {
            if !s.modules.contains(&module) {
                return Err(Status::InvalidHandle);
            }
            if name != GLOBAL_NAME {
                return Err(Status::KernelNotFound);
            }
            // One buffer per module and name, as a loaded module has its variables.
            let existing = s.globals.iter().find(|&(_, &m)| m == module);
            let handle = match existing {
                Some((&h, _)) => h,
                None => {
                    let (h, _) = ids.buffer(GLOBAL_SIZE);
                    s.buffers.insert(h, vec![0; GLOBAL_SIZE as usize]);
                    s.globals.insert(h, module);
                    h
                }
            };
            Response {
                value0: handle,
                value1: ADDRESS_BASE + (1 << 40) + handle * 256,
                ..Response::data(GLOBAL_SIZE.to_le_bytes().to_vec())
            }
        }
        Command::Launch(l) => {
            launch(s, l)?;
            Response::ok()
        }
        Command::Sync => {
            if let Some((status, detail)) = fail_sync {
                s.sticky = Some((status, detail));
                return Ok(Response::error(status, detail));
            }
            Response::ok()
        }
        Command::HostRegister { .. } | Command::HostUnregister { .. } => {
            return Err(Status::Unsupported)
        }
        Command::Compile {
            source,
            options,
            out_len,
        } => compile(&source, &options, out_len),
        Command::Info | Command::SessionOpen | Command::SessionClose | Command::Selftest { .. } => {
            unreachable!("answered before the session lookup")
        }
    })
}

/// Options the host refuses because they read the host's files.
pub const HOST_FILE_OPTIONS: [&str; 6] = [
    "-I",
    "--include-path",
    "--pre-include",
    "-include",
    "--pch",
    "--use-pch",
];

/// NVRTC_ERROR_COMPILATION, the detail of a compile error.
pub const NVRTC_ERROR_COMPILATION: u32 = 6;

/// A stand-in for the host's compiler. Its "PTX" names the options and repeats the
/// source as comments (so a large source needs more room than the first buffer); the
/// log has a line per `#warning`. A source with `#error` fails with the compiler's
/// NVRTC_ERROR_COMPILATION and a log; an option that reads host files is refused with
/// its index.
fn compile(source: &str, options: &[String], out_len: u32) -> Response {
    let host_file = |o: &String| HOST_FILE_OPTIONS.iter().any(|p| o.starts_with(p));
    if let Some(i) = options.iter().position(host_file) {
        return Response::error(Status::InvalidArgument, i as u32);
    }
    let too_small = |needed: usize| Response {
        value0: needed as u64,
        ..Response::error(Status::BufferTooSmall, 0)
    };
    if source.contains("#error") {
        let log = "fake.cu(1): catastrophic error: #error directive\n".to_string();
        if log.len() > out_len as usize {
            return too_small(log.len());
        }
        return Response {
            value1: log.len() as u64,
            data: log.into_bytes(),
            ..Response::error(Status::ModuleInvalid, NVRTC_ERROR_COMPILATION)
        };
    }
    let mut ptx = format!(
        "//\n// fake PTX\n//\n.version 9.0\n.target sm_90\n.address_size 64\n// options: {}\n",
        options.join(" ")
    );
    let mut log = String::new();
    for line in source.lines() {
        ptx.push_str("// ");
        ptx.push_str(line);
        ptx.push('\n');
        if line.trim_start().starts_with("#warning") {
            log.push_str("fake.cu: warning: #warning directive\n");
        }
    }
    let needed = ptx.len() + log.len();
    if needed > out_len as usize {
        return too_small(needed);
    }
    let (ptx_len, log_len) = (ptx.len() as u64, log.len() as u64);
    let mut data = ptx.into_bytes();
    data.extend_from_slice(log.as_bytes());
    Response {
        value0: ptx_len,
        value1: log_len,
        ..Response::data(data)
    }
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn launch(s: &mut FakeSession, l: Launch) -> Result<(), Status> {
    if l.module != 0 {
        return Err(if s.modules.contains(&l.module) {
            Status::KernelNotFound
        } else {
            Status::InvalidHandle
        });
    }
    let buf = |p: &Param| match p {
        Param::Buffer(h) => Ok(*h),
        Param::Value(_) => Err(Status::InvalidArgument),
    };
    let val = |p: &Param| match p {
        Param::Value(v) if v.len() == 4 => Ok(<[u8; 4]>::try_from(&v[..]).unwrap()),
        _ => Err(Status::InvalidArgument),
    };
    match (l.kernel.as_str(), &l.params[..]) {
        ("vector_add_f32", [a, b, c, n]) => {
            let n = u32::from_le_bytes(val(n)?) as usize;
            let get = |h| s.buffers.get(&h).ok_or(Status::InvalidHandle);
            let (a, b) = (floats(get(buf(a)?)?), floats(get(buf(b)?)?));
            if a.len() < n || b.len() < n {
                return Err(Status::OutOfRange);
            }
            let c = s.buffers.get_mut(&buf(c)?).ok_or(Status::InvalidHandle)?;
            if c.len() < n * 4 {
                return Err(Status::OutOfRange);
            }
            for i in 0..n {
                c[4 * i..4 * i + 4].copy_from_slice(&(a[i] + b[i]).to_le_bytes());
            }
        }
        ("scale_f32", [x, alpha, n]) => {
            let alpha = f32::from_le_bytes(val(alpha)?);
            let n = u32::from_le_bytes(val(n)?) as usize;
            let x = s.buffers.get_mut(&buf(x)?).ok_or(Status::InvalidHandle)?;
            if x.len() < n * 4 {
                return Err(Status::OutOfRange);
            }
            for w in x[..n * 4].chunks_exact_mut(4) {
                let v = f32::from_le_bytes((&*w).try_into().unwrap()) * alpha;
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => return Err(Status::KernelNotFound),
    }
    Ok(())
}

/// Async submission the way the guest driver does it (`VGPU_IOC_SUBMIT_ASYNC`), over a
/// synchronous transport: an async request runs at once (the fake device answers in
/// order anyway), a failure is kept (the first; later ones are dropped) and reported
/// with the next synchronous request, which still runs.
/// Like the driver's transport, it keeps the polling setting of synchronous requests.
pub struct AsyncDriver<T> {
    pub inner: T,
    failed: Mutex<Option<AsyncFailure>>,
    /// Like an older driver: every async request goes synchronously.
    pub unsupported: bool,
    poll_us: AtomicU32,
}

impl<T: Transport> AsyncDriver<T> {
    pub fn new(inner: T) -> AsyncDriver<T> {
        AsyncDriver {
            inner,
            failed: Mutex::default(),
            unsupported: false,
            poll_us: AtomicU32::new(0),
        }
    }
}

impl<T: Transport> Transport for AsyncDriver<T> {
    fn submit(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        let reply = self.submit_reply(header, input, output)?;
        Ok(match reply.earlier {
            Some(f) => ResponseHeader {
                status: f.status,
                detail: f.detail,
                ..reply.response
            },
            None => reply.response,
        })
    }

    fn submit_reply(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<Reply> {
        let response = self.inner.submit(header, input, output)?;
        Ok(Reply {
            response,
            earlier: self.failed.lock().unwrap().take(),
        })
    }

    fn submit_async(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
    ) -> Result<Option<Reply>> {
        let op = Header::decode(header).map_err(Error::Protocol)?.op.opcode();
        if !matches!(
            op,
            Opcode::Launch | Opcode::Memset | Opcode::Dtod | Opcode::Htod
        ) {
            return Err(Error::invalid(format!("async {}", opcode_name(op))));
        }
        let bytes: usize = input.iter().map(|s| s.len()).sum();
        if self.unsupported || bytes > ASYNC_MAX_BYTES {
            return self.submit_reply(header, input, &mut []).map(Some);
        }
        let r = self.inner.submit(header, input, &mut [])?;
        if r.status != Status::Ok {
            self.failed.lock().unwrap().get_or_insert(AsyncFailure {
                op: opcode_name(op),
                status: r.status,
                detail: r.detail,
            });
        }
        Ok(None)
    }

    fn set_poll_us(&self, us: u32) {
        self.poll_us.store(us.min(POLL_MAX_US), Ordering::Relaxed);
    }

    fn poll_us(&self) -> u32 {
        self.poll_us.load(Ordering::Relaxed)
    }

    fn config(&self) -> Result<DeviceConfig> {
        self.inner.config()
    }

    fn host_memory(&self, bytes: usize) -> Result<HostMemory> {
        self.inner.host_memory(bytes)
    }
}

/// What the library put in one chain.
#[derive(Clone, Debug)]
pub struct Chain {
    pub header: Header,
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    /// Sent with [`Transport::submit_async`].
    pub queued: bool,
    /// The transport's polling when it was sent synchronously (0 for a queued one).
    pub poll_us: u32,
}

impl Chain {
    pub fn opcode(&self) -> Opcode {
        self.header.op.opcode()
    }
}

/// Wraps a transport: records every chain and, like the guest driver with a short
/// queue, refuses chains whose payload is over a limit.
pub struct Recorder<T> {
    pub inner: T,
    pub chains: Arc<Mutex<Vec<Chain>>>,
    pub payload_limit: Option<usize>,
    pub rejected: Arc<Mutex<usize>>,
    pub contiguous_host_memory: bool,
}

impl<T: Transport> Recorder<T> {
    pub fn new(inner: T) -> Recorder<T> {
        Recorder {
            inner,
            chains: Arc::default(),
            payload_limit: None,
            rejected: Arc::default(),
            contiguous_host_memory: false,
        }
    }
}

impl<T: Transport> Recorder<T> {
    /// Records a chain; refuses a synchronous one over the payload limit.
    fn record(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &[&mut [u8]],
        queued: bool,
    ) -> Result<()> {
        let chain = Chain {
            header: Header::decode(header).map_err(Error::Protocol)?,
            input: input.iter().map(|s| s.len()).collect(),
            output: output.iter().map(|s| s.len()).collect(),
            queued,
            poll_us: if queued { 0 } else { self.inner.poll_us() },
        };
        let payload: usize = chain.input.iter().chain(&chain.output).sum();
        if !queued && self.payload_limit.is_some_and(|l| payload > l) {
            *self.rejected.lock().unwrap() += 1;
            return Err(Error::ChainTooLong);
        }
        self.chains.lock().unwrap().push(chain);
        Ok(())
    }
}

impl<T: Transport> Transport for Recorder<T> {
    fn submit(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        self.record(header, input, output, false)?;
        self.inner.submit(header, input, output)
    }

    fn submit_reply(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<Reply> {
        self.record(header, input, output, false)?;
        self.inner.submit_reply(header, input, output)
    }

    fn submit_async(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
    ) -> Result<Option<Reply>> {
        self.record(header, input, &[], true)?;
        self.inner.submit_async(header, input)
    }

    fn set_poll_us(&self, us: u32) {
        self.inner.set_poll_us(us);
    }

    fn poll_us(&self) -> u32 {
        self.inner.poll_us()
    }

    fn config(&self) -> Result<DeviceConfig> {
        self.inner.config()
    }

    fn host_memory(&self, bytes: usize) -> Result<HostMemory> {
        let m = self.inner.host_memory(bytes)?;
        Ok(if self.contiguous_host_memory {
            m.assume_contiguous()
        } else {
            m
        })
    }
}
