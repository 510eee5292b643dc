// SPDX-License-Identifier: Apache-2.0
//! Asynchronous failures: sticky for the session that caused them, and a lost context
//! restarted for the tenant without touching other tenants.

use std::sync::Arc;

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::{CpuExecutor, CpuExecutorFactory};
use vgpu_mediator::executor::{
    BufferId, DeviceInfo, ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef,
    ModuleId, StreamId,
};
use vgpu_mediator::{Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

/// The value that makes `fill_u32` "fault" on the device, like a kernel that traps.
const TRAP: u32 = 0xdead;
const CUDA_ERROR_LAUNCH_FAILED: u32 = 719;

/// A CPU executor whose `fill_u32` with [`TRAP`] fails later, the way a faulting CUDA
/// kernel does: the launch is accepted, the next synchronizing call fails, and the
/// context stays unusable.
struct Faulty {
    inner: CpuExecutor,
    fault_pending: bool,
    poisoned: bool,
}

impl Faulty {
    fn check(&mut self) -> ExecResult<()> {
        if self.fault_pending || self.poisoned {
            self.fault_pending = false;
            self.poisoned = true;
            return Err(ExecError::new(
                Status::LaunchFailed,
                CUDA_ERROR_LAUNCH_FAILED,
                "trap",
            ));
        }
        Ok(())
    }
}

impl Executor for Faulty {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.inner.open_stream()
    }
    fn close_stream(&mut self, s: StreamId) {
        self.inner.close_stream(s)
    }
    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.check()?;
        self.inner.alloc(bytes)
    }
    fn free(&mut self, b: BufferId) {
        self.inner.free(b)
    }
    fn htod(&mut self, s: StreamId, d: BufferId, o: u64, data: &[u8]) -> ExecResult<()> {
        self.check()?;
        self.inner.htod(s, d, o, data)
    }
    fn dtoh(&mut self, s: StreamId, b: BufferId, o: u64, out: &mut [u8]) -> ExecResult<()> {
        self.check()?;
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
        self.check()?;
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
        self.check()?;
        self.inner.memset(s, d, o, l, v, w)
    }
    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId> {
        self.inner.load_module(ptx)
    }
    fn unload_module(&mut self, m: ModuleId) {
        self.inner.unload_module(m)
    }
    fn launch(
        &mut self,
        s: StreamId,
        k: KernelRef<'_>,
        shape: &LaunchShape,
        p: &[ExecParam],
    ) -> ExecResult<()> {
        self.check()?;
        if p.get(1) == Some(&ExecParam::Value(TRAP.to_le_bytes().to_vec())) {
            self.fault_pending = true;
            return Ok(());
        }
        self.inner.launch(s, k, shape, p)
    }
    fn sync(&mut self, _s: StreamId) -> ExecResult<()> {
        self.check()
    }
    fn poisoned(&self) -> bool {
        self.poisoned
    }
}

struct FaultyFactory(CpuExecutorFactory);

impl ExecutorFactory for FaultyFactory {
    fn device(&self) -> &DeviceInfo {
        self.0.device()
    }
    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        Ok(Box::new(Faulty {
            inner: CpuExecutor::default(),
            fault_pending: false,
            poisoned: false,
        }))
    }
}

fn call(m: &Mediator, t: TenantId, s: u64, c: Command) -> Response {
    m.call(t, Request::new(s, c))
}

fn fill(buf: u64, value: u32) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "fill_u32".into(),
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(buf), Param::u32(value), Param::u32(16)],
    })
}

fn setup(m: &Mediator, name: &str) -> (TenantId, u64, u64) {
    let t = m
        .add_tenant(TenantConfig {
            name: name.into(),
            mem_quota: 1 << 20,
            weight: 1,
        })
        .unwrap();
    let s = call(m, t, 0, Command::SessionOpen).value0;
    let b = call(m, t, s, Command::Alloc { size: 64 }).value0;
    (t, s, b)
}

#[test]
fn a_faulting_kernel_is_sticky_for_its_session_while_the_vms_other_sessions_work_on() {
    let m = Mediator::new(Arc::new(FaultyFactory(CpuExecutorFactory::new())));
    let (t1, s1, b1) = setup(&m, "vm1");
    let other_session = call(&m, t1, 0, Command::SessionOpen).value0;
    let (t2, s2, b2) = setup(&m, "vm2");

    // The launch itself is accepted: the failure is asynchronous.
    assert_eq!(call(&m, t1, s1, fill(b1, TRAP)).status, Status::Ok);
    let sync = call(&m, t1, s1, Command::Sync);
    assert_eq!(
        (sync.status, sync.detail),
        (Status::LaunchFailed, CUDA_ERROR_LAUNCH_FAILED)
    );
    // Sticky: every later request of the session answers the same error.
    for c in [
        Command::Sync,
        Command::Alloc { size: 4 },
        Command::Dtoh {
            src: b1,
            offset: 0,
            len: 4,
        },
    ] {
        let r = call(&m, t1, s1, c);
        assert_eq!(
            (r.status, r.detail),
            (Status::LaunchFailed, CUDA_ERROR_LAUNCH_FAILED)
        );
    }
    // The tenant's other session has its own context: it never noticed.
    let ob = call(&m, t1, other_session, Command::Alloc { size: 64 }).value0;
    assert_eq!(call(&m, t1, other_session, fill(ob, 7)).status, Status::Ok);
    assert_eq!(
        call(&m, t1, other_session, Command::Sync).status,
        Status::Ok
    );
    let u = m.usage(t1).unwrap();
    assert_eq!((u.restarts, u.mem_used, u.allocations), (1, 64, 1));

    // The other tenant never noticed.
    assert_eq!(call(&m, t2, s2, fill(b2, 5)).status, Status::Ok);
    let out = call(
        &m,
        t2,
        s2,
        Command::Dtoh {
            src: b2,
            offset: 0,
            len: 64,
        },
    )
    .data;
    assert!(out
        .chunks_exact(4)
        .take(16)
        .all(|w| w == 5u32.to_le_bytes()));

    // Closing the broken sessions works, and a new session gets a fresh context.
    assert_eq!(call(&m, t1, s1, Command::SessionClose).status, Status::Ok);
    assert_eq!(
        call(&m, t1, other_session, Command::SessionClose).status,
        Status::Ok
    );
    let fresh = call(&m, t1, 0, Command::SessionOpen).value0;
    let b = call(&m, t1, fresh, Command::Alloc { size: 64 }).value0;
    assert_eq!(call(&m, t1, fresh, fill(b, 3)).status, Status::Ok);
    assert_eq!(call(&m, t1, fresh, Command::Sync).status, Status::Ok);
    assert_eq!(m.usage(t1).unwrap().sessions, 1);
}
