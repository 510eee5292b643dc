// SPDX-License-Identifier: Apache-2.0
//! What the mediator does with an executor that has modules (as a GPU's has): module
//! variables (MODULE_GLOBAL) as handles that copies and launches take and FREE refuses,
//! bounded by their size and gone with their module; FUNCTION_INFO of a module's kernel;
//! and COMPILE's answers (PTX and log, BUFFER_TOO_SMALL, MODULE_INVALID with the log).
//!
//! The executor here is the CPU executor with modules added: a module's variables are
//! CPU buffers of the sizes [`VARIABLES`] gives, its kernels have the layout [`KERNEL`]
//! gives, and its compiler answers from the source's text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::{CpuExecutor, CpuExecutorFactory};
use vgpu_mediator::executor::{
    BufferId, CompileOutput, DeviceInfo, ExecError, ExecParam, ExecResult, Executor,
    ExecutorFactory, KernelRef, ModuleId, StreamId,
};
use vgpu_mediator::{Limits, Mediator, TenantConfig, TenantId};
use vgpu_protocol::{
    Command, FunctionInfo, Launch, Param, Request, Response, Status, FUNCTION_ATTRIBUTES,
};

/// Each module's variables: name and size.
const VARIABLES: &[(&str, u64)] = &[("table", 64), ("counter", 4)];
/// The one kernel of each module, and its parameters' (offset, size).
const KERNEL: (&str, &[(u32, u32)]) = ("mixed", &[(0, 1), (8, 8), (16, 4), (24, 8)]);
/// Its attributes.
const ATTRIBUTES: [i32; FUNCTION_ATTRIBUTES] = [256, 16, 0, 0, 32, 90, 90, 0, 49152, -1];

/// What the executors saw, for the tests to check.
#[derive(Default)]
struct Seen {
    /// A FREE of a module variable reached an executor.
    freed_a_variable: bool,
    /// The parameters of each module launch.
    launches: Vec<Vec<ExecParam>>,
    /// Variables alive, by address.
    variables: HashMap<u64, u64>,
}

struct WithModules {
    inner: CpuExecutor,
    seen: Arc<Mutex<Seen>>,
    /// Loaded modules -> their variables (name -> buffer) handed out so far.
    modules: HashMap<u64, HashMap<String, BufferId>>,
    next_module: u64,
}

impl WithModules {
    fn load(&mut self) -> ExecResult<ModuleId> {
        self.next_module += 1;
        self.modules.insert(self.next_module, HashMap::new());
        Ok(ModuleId(self.next_module))
    }
}

impl Executor for WithModules {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.inner.open_stream()
    }
    fn close_stream(&mut self, s: StreamId) {
        self.inner.close_stream(s)
    }
    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.inner.alloc(bytes)
    }
    fn free(&mut self, b: BufferId) {
        let mut seen = self.seen.lock().unwrap();
        if seen.variables.contains_key(&b.0) {
            seen.freed_a_variable = true;
        }
        self.inner.free(b)
    }
    fn htod(&mut self, s: StreamId, d: BufferId, o: u64, data: &[u8]) -> ExecResult<()> {
        self.inner.htod(s, d, o, data)
    }
    fn dtoh(&mut self, s: StreamId, b: BufferId, o: u64, out: &mut [u8]) -> ExecResult<()> {
        self.inner.dtoh(s, b, o, out)
    }
    fn dtod(
        &mut self,
        s: StreamId,
        d: BufferId,
        dof: u64,
        b: BufferId,
        so: u64,
        l: u64,
    ) -> ExecResult<()> {
        self.inner.dtod(s, d, dof, b, so, l)
    }
    fn memset(
        &mut self,
        s: StreamId,
        d: BufferId,
        o: u64,
        l: u64,
        v: u32,
        w: u32,
    ) -> ExecResult<()> {
        self.inner.memset(s, d, o, l, v, w)
    }
    fn load_module(&mut self, _ptx: &str) -> ExecResult<ModuleId> {
        self.load()
    }
    fn load_module_image(&mut self, _image: &[u8]) -> ExecResult<ModuleId> {
        self.load()
    }
    fn unload_module(&mut self, m: ModuleId) {
        if let Some(vars) = self.modules.remove(&m.0) {
            for b in vars.into_values() {
                self.seen.lock().unwrap().variables.remove(&b.0);
                self.inner.free(b);
            }
        }
    }
    fn launch(
        &mut self,
        s: StreamId,
        k: KernelRef<'_>,
        shape: &LaunchShape,
        p: &[ExecParam],
    ) -> ExecResult<()> {
        match k {
            KernelRef::Builtin(_) => self.inner.launch(s, k, shape, p),
            KernelRef::Module(..) => {
                self.seen.lock().unwrap().launches.push(p.to_vec());
                Ok(())
            }
        }
    }
    fn sync(&mut self, s: StreamId) -> ExecResult<()> {
        self.inner.sync(s)
    }
    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        match kernel {
            KernelRef::Module(m, name) if self.modules.contains_key(&m.0) && name == KERNEL.0 => {
                Ok(FunctionInfo {
                    attributes: ATTRIBUTES,
                    params: KERNEL.1.to_vec(),
                })
            }
            KernelRef::Module(..) => Err(ExecError::new(Status::KernelNotFound, 500, "no kernel")),
            KernelRef::Builtin(_) => self.inner.function_info(kernel),
        }
    }
    fn module_global(&mut self, module: ModuleId, name: &str) -> ExecResult<(BufferId, u64)> {
        let size = VARIABLES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, size)| size)
            .ok_or_else(|| ExecError::new(Status::KernelNotFound, 500, "no variable"))?;
        let known = self
            .modules
            .get(&module.0)
            .ok_or_else(|| ExecError::new(Status::InvalidHandle, 0, "no module"))?
            .get(name)
            .copied();
        let b = match known {
            Some(b) => b,
            None => {
                let b = self.inner.alloc(size)?;
                self.modules
                    .get_mut(&module.0)
                    .unwrap()
                    .insert(name.into(), b);
                self.seen.lock().unwrap().variables.insert(b.0, size);
                b
            }
        };
        Ok((b, size))
    }
    /// "fail" in the source fails with a log; otherwise the PTX is the source's length
    /// in `p`s and the log says "ok".
    fn compile(
        &mut self,
        source: &str,
        _options: &[String],
        out_len: u32,
    ) -> ExecResult<CompileOutput> {
        if source.contains("fail") {
            let mut log = b"guest.cu(1): error: this is not C++\n".to_vec();
            let log_len = log.len() as u64;
            log.truncate(out_len as usize);
            return Ok(CompileOutput::Failed {
                code: 6,
                log,
                log_len,
            });
        }
        let ptx = vec![b'p'; source.len()];
        let log = b"ok".to_vec();
        let needed = (ptx.len() + log.len()) as u64;
        if needed > u64::from(out_len) {
            return Ok(CompileOutput::TooLarge { needed });
        }
        Ok(CompileOutput::Ptx { ptx, log })
    }
}

struct Factory {
    cpu: CpuExecutorFactory,
    seen: Arc<Mutex<Seen>>,
}

impl ExecutorFactory for Factory {
    fn device(&self) -> &DeviceInfo {
        self.cpu.device()
    }
    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        Ok(Box::new(WithModules {
            inner: CpuExecutor::default(),
            seen: self.seen.clone(),
            modules: HashMap::new(),
            next_module: 0,
        }))
    }
}

fn setup_with(limits: Limits) -> (Arc<Mediator>, TenantId, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let factory = Factory {
        cpu: CpuExecutorFactory::new(),
        seen: seen.clone(),
    };
    let m = Mediator::with_limits(Arc::new(factory), limits);
    let t = m
        .add_tenant(TenantConfig {
            name: "vm-modules".into(),
            mem_quota: 64 << 20,
            weight: 1,
        })
        .unwrap();
    (m, t, seen)
}

fn setup() -> (Arc<Mediator>, TenantId, Arc<Mutex<Seen>>) {
    setup_with(Limits::default())
}

fn call(m: &Mediator, t: TenantId, s: u64, c: Command) -> Response {
    m.call(t, Request::new(s, c))
}

fn ok(m: &Mediator, t: TenantId, s: u64, c: Command) -> Response {
    let r = call(m, t, s, c.clone());
    assert_eq!(r.status, Status::Ok, "{c:?}: {r:?}");
    r
}

fn open(m: &Mediator, t: TenantId) -> u64 {
    ok(m, t, 0, Command::SessionOpen).value0
}

/// A module loaded from a (fake) cubin.
fn load(m: &Mediator, t: TenantId, s: u64) -> u64 {
    let mut image = vec![0x7f, b'E', b'L', b'F', 2, 1, 1];
    image.resize(128, 0);
    ok(m, t, s, Command::ModuleLoadImage { image }).value0
}

fn global(module: u64, name: &str) -> Command {
    Command::ModuleGlobal {
        module,
        name: name.into(),
    }
}

fn status(m: &Mediator, t: TenantId, s: u64, c: Command) -> Status {
    call(m, t, s, c).status
}

#[test]
fn a_module_variable_is_a_handle_that_copies_take_within_its_size() {
    let (m, t, seen) = setup();
    let s = open(&m, t);
    let module = load(&m, t, s);
    let r = ok(&m, t, s, global(module, "table"));
    let (table, address) = (r.value0, r.value1);
    assert_eq!(r.data, 64u64.to_le_bytes());
    assert_eq!(seen.lock().unwrap().variables.get(&address), Some(&64));
    // Asked again: the same handle and address.
    let again = ok(&m, t, s, global(module, "table"));
    assert_eq!((again.value0, again.value1), (table, address));

    // HTOD, DTOH, MEMSET and DTOD take it with offsets, like a buffer.
    let data: Vec<u8> = (0..64).collect();
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: table,
            offset: 0,
            data: data.clone(),
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Memset {
            dst: table,
            offset: 8,
            len: 8,
            value: 0xee,
            width: 1,
        },
    );
    let buf = ok(&m, t, s, Command::Alloc { size: 64 }).value0;
    ok(
        &m,
        t,
        s,
        Command::Dtod {
            dst: buf,
            dst_offset: 0,
            src: table,
            src_offset: 4,
            len: 60,
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Dtod {
            dst: table,
            dst_offset: 60,
            src: buf,
            src_offset: 0,
            len: 4,
        },
    );
    let back = ok(
        &m,
        t,
        s,
        Command::Dtoh {
            src: table,
            offset: 0,
            len: 64,
        },
    )
    .data;
    let mut expected = data.clone();
    expected[8..16].fill(0xee);
    expected[60..64].copy_from_slice(&data[4..8]);
    assert_eq!(back, expected);

    // Past its end: OUT_OF_RANGE, however the range gets there.
    for c in [
        Command::Dtoh {
            src: table,
            offset: 0,
            len: 65,
        },
        Command::Dtoh {
            src: table,
            offset: 64,
            len: 1,
        },
        Command::Htod {
            dst: table,
            offset: 60,
            data: vec![0; 5],
        },
        Command::Memset {
            dst: table,
            offset: 1,
            len: 64,
            value: 0,
            width: 1,
        },
        Command::Dtod {
            dst: buf,
            dst_offset: 0,
            src: table,
            src_offset: 1,
            len: 64,
        },
        Command::Dtod {
            dst: table,
            dst_offset: 32,
            src: buf,
            src_offset: 0,
            len: 33,
        },
    ] {
        assert_eq!(status(&m, t, s, c.clone()), Status::OutOfRange, "{c:?}");
    }
    // Overlapping copies within it are refused as for any buffer.
    let overlap = Command::Dtod {
        dst: table,
        dst_offset: 0,
        src: table,
        src_offset: 8,
        len: 16,
    };
    assert_eq!(status(&m, t, s, overlap), Status::InvalidArgument);
    // Not charged: the module's memory is.
    let u = m.usage(t).unwrap();
    assert_eq!((u.allocations, u.buffer_bytes), (1, 64));
}

#[test]
fn free_refuses_a_module_variable_which_goes_with_its_module() {
    let (m, t, seen) = setup();
    let s = open(&m, t);
    let module = load(&m, t, s);
    let counter = ok(&m, t, s, global(module, "counter")).value0;
    assert_eq!(
        status(&m, t, s, Command::Free { handle: counter }),
        Status::InvalidArgument
    );
    assert!(!seen.lock().unwrap().freed_a_variable);
    // Still there.
    let read = Command::Dtoh {
        src: counter,
        offset: 0,
        len: 4,
    };
    assert_eq!(ok(&m, t, s, read.clone()).data, vec![0; 4]);
    // Unloading the module takes its variables: their handles mean nothing after.
    ok(&m, t, s, Command::ModuleUnload { module });
    assert!(seen.lock().unwrap().variables.is_empty());
    assert_eq!(status(&m, t, s, read), Status::InvalidHandle);
    assert_eq!(
        status(&m, t, s, Command::Free { handle: counter }),
        Status::InvalidHandle
    );
    assert_eq!(
        status(&m, t, s, global(module, "counter")),
        Status::InvalidHandle
    );
    assert!(!seen.lock().unwrap().freed_a_variable);
}

#[test]
fn unknown_variables_and_other_sessions_handles_are_refused() {
    let (m, t, _) = setup();
    let s = open(&m, t);
    let other = open(&m, t);
    let module = load(&m, t, s);
    assert_eq!(
        status(&m, t, s, global(module, "no_such_variable")),
        Status::KernelNotFound
    );
    let table = ok(&m, t, s, global(module, "table")).value0;
    // Another session knows neither the module nor the variable.
    assert_eq!(
        status(&m, t, other, global(module, "table")),
        Status::InvalidHandle
    );
    let read = Command::Dtoh {
        src: table,
        offset: 0,
        len: 4,
    };
    assert_eq!(status(&m, t, other, read), Status::InvalidHandle);
    // A closed session's variables go with it.
    ok(&m, t, s, Command::SessionClose);
    let s2 = open(&m, t);
    let read = Command::Dtoh {
        src: table,
        offset: 0,
        len: 4,
    };
    assert_eq!(status(&m, t, s2, read), Status::InvalidHandle);
}

#[test]
fn variables_a_session_may_hold_are_bounded() {
    let (m, t, _) = setup_with(Limits {
        max_buffers_per_session: 1,
        ..Limits::default()
    });
    let s = open(&m, t);
    let module = load(&m, t, s);
    ok(&m, t, s, global(module, "table"));
    // The same variable again costs nothing; a new one is one handle too many.
    ok(&m, t, s, global(module, "table"));
    assert_eq!(
        status(&m, t, s, global(module, "counter")),
        Status::LimitExceeded
    );
}

#[test]
fn a_launch_passes_a_variables_address() {
    let (m, t, seen) = setup();
    let s = open(&m, t);
    let module = load(&m, t, s);
    let r = ok(&m, t, s, global(module, "table"));
    let launch = Command::Launch(Launch {
        module,
        kernel: "mixed".into(),
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Value(vec![1]), Param::Buffer(r.value0)],
    });
    ok(&m, t, s, launch);
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.launches.last().unwrap()[1],
        ExecParam::Buffer(BufferId(r.value1))
    );
}

#[test]
fn function_info_of_a_modules_kernel_comes_from_the_executor() {
    let (m, t, _) = setup();
    let s = open(&m, t);
    let module = load(&m, t, s);
    let r = ok(
        &m,
        t,
        s,
        Command::FunctionInfo {
            module,
            name: "mixed".into(),
        },
    );
    let info = FunctionInfo::decode(&r.data).unwrap();
    assert_eq!(info.attributes, ATTRIBUTES);
    assert_eq!(info.params, KERNEL.1);
    let unknown = Command::FunctionInfo {
        module,
        name: "other".into(),
    };
    let r = call(&m, t, s, unknown);
    assert_eq!((r.status, r.detail), (Status::KernelNotFound, 500));
    ok(&m, t, s, Command::ModuleUnload { module });
    let gone = Command::FunctionInfo {
        module,
        name: "mixed".into(),
    };
    assert_eq!(status(&m, t, s, gone), Status::InvalidHandle);
}

fn compile(source: &str, out_len: u32) -> Command {
    Command::Compile {
        source: source.into(),
        options: vec!["-std=c++17".into()],
        out_len,
    }
}

#[test]
fn compile_answers_ptx_then_log_or_the_room_it_needs() {
    let (m, t, _) = setup();
    let s = open(&m, t);
    let source = "extern \"C\" __global__ void k() {}";
    let r = ok(&m, t, s, compile(source, 4096));
    assert_eq!((r.value0, r.value1), (source.len() as u64, 2));
    let mut expected = vec![b'p'; source.len()];
    expected.extend_from_slice(b"ok");
    assert_eq!(r.data, expected);

    // Exactly enough room, then one byte too little: the bytes needed come back.
    let needed = source.len() as u32 + 2;
    assert_eq!(ok(&m, t, s, compile(source, needed)).data, expected);
    let r = call(&m, t, s, compile(source, needed - 1));
    assert_eq!(r.status, Status::BufferTooSmall);
    assert_eq!(r.value0, u64::from(needed));
    assert!(r.data.is_empty());
}

#[test]
fn a_failed_compile_is_module_invalid_with_the_log() {
    let (m, t, _) = setup();
    let s = open(&m, t);
    let r = call(&m, t, s, compile("fail", 4096));
    let log = b"guest.cu(1): error: this is not C++\n";
    assert_eq!((r.status, r.detail), (Status::ModuleInvalid, 6));
    assert_eq!((r.value0, r.value1), (0, log.len() as u64));
    assert_eq!(r.data, log);
    // A log cut to the room there is; value1 still says how long it was.
    let r = call(&m, t, s, compile("fail", 8));
    assert_eq!(
        (r.status, r.value1),
        (Status::ModuleInvalid, log.len() as u64)
    );
    assert_eq!(r.data, &log[..8]);
    // Not sticky: the session serves on.
    ok(&m, t, s, Command::Sync);
    ok(&m, t, s, compile("fine", 64));
}
