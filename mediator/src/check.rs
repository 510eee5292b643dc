// SPDX-License-Identifier: Apache-2.0
//! What the GPU check binaries (`vgpu-gpu-check`, `vgpu-share-bench`) share: a guest
//! session driven straight through a [`Mediator`] (every call answers a [`Response`]; the
//! helpers turn a status other than OK into a message naming the request), a counter of
//! answers to requests submitted without waiting, inputs and figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vgpu_protocol::{Command, Launch, Param, Request, Response, Status};

use crate::{CompletionSink, Mediator, TenantId};

/// A response's status and detail, with the CUDA error's name when the detail is one.
pub fn describe(r: &Response) -> String {
    match r.status {
        Status::LaunchFailed | Status::OutOfMemory | Status::Internal if r.detail != 0 => {
            format!(
                "{} (detail {} = {})",
                r.status,
                r.detail,
                crate::cuda::error_name_of(r.detail)
            )
        }
        _ => format!("{} (detail {})", r.status, r.detail),
    }
}

/// OK, or an error naming `what` and the response's status.
pub fn expect_ok(r: &Response, what: &str) -> Result<(), String> {
    if r.status == Status::Ok {
        Ok(())
    } else {
        Err(format!("{what} returned {}", describe(r)))
    }
}

/// `want`, described, or an error naming `what` and the status it got instead.
pub fn expect_status(r: &Response, want: Status, what: &str) -> Result<String, String> {
    if r.status == want {
        Ok(format!("{what} -> {}", describe(r)))
    } else {
        Err(format!("{what} returned {}, expected {want}", describe(r)))
    }
}

/// A LAUNCH without dynamic shared memory.
pub fn launch_command(
    module: u64,
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    params: Vec<Param>,
) -> Command {
    Command::Launch(Launch {
        module,
        kernel: kernel.into(),
        grid,
        block,
        shared_bytes: 0,
        params,
    })
}

/// Blocks of `per_block` threads for `n` elements.
pub fn blocks(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block) as u32
}

/// An open session of a tenant; closed when dropped.
pub struct Guest<'a> {
    pub m: &'a Mediator,
    pub tenant: TenantId,
    pub session: u64,
}

impl<'a> Guest<'a> {
    pub fn open(m: &'a Mediator, tenant: TenantId) -> Result<Guest<'a>, String> {
        let r = m.call(tenant, Request::new(0, Command::SessionOpen));
        expect_ok(&r, "SESSION_OPEN")?;
        Ok(Guest {
            m,
            tenant,
            session: r.value0,
        })
    }

    pub fn call(&self, command: Command) -> Response {
        self.m
            .call(self.tenant, Request::new(self.session, command))
    }

    /// The response, when it is OK.
    pub fn ok(&self, command: Command, what: &str) -> Result<Response, String> {
        let r = self.call(command);
        expect_ok(&r, what)?;
        Ok(r)
    }

    pub fn alloc(&self, size: u64) -> Result<u64, String> {
        Ok(self.ok(Command::Alloc { size }, "ALLOC")?.value0)
    }

    pub fn htod(&self, dst: u64, offset: u64, data: Vec<u8>) -> Result<(), String> {
        self.ok(Command::Htod { dst, offset, data }, "HTOD")
            .map(drop)
    }

    /// Exactly `len` bytes.
    pub fn dtoh(&self, src: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let data = self.ok(Command::Dtoh { src, offset, len }, "DTOH")?.data;
        if data.len() as u64 != len {
            return Err(format!(
                "DTOH returned {} bytes, expected {len}",
                data.len()
            ));
        }
        Ok(data)
    }

    pub fn memset32(&self, dst: u64, offset: u64, len: u64, value: u32) -> Result<(), String> {
        self.ok(
            Command::Memset {
                dst,
                offset,
                len,
                value,
                width: 4,
            },
            "MEMSET",
        )
        .map(drop)
    }

    pub fn launch(
        &self,
        module: u64,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        params: Vec<Param>,
    ) -> Result<(), String> {
        self.ok(
            launch_command(module, kernel, grid, block, params),
            &format!("LAUNCH {kernel}"),
        )
        .map(drop)
    }

    /// A LAUNCH built once (by [`launch_command`]) and sent again and again.
    pub fn launch_prepared(&self, command: &Command) -> Result<(), String> {
        self.ok(command.clone(), "LAUNCH").map(drop)
    }

    pub fn sync(&self) -> Result<(), String> {
        self.ok(Command::Sync, "SYNC").map(drop)
    }

    pub fn load(&self, ptx: &str) -> Result<u64, String> {
        Ok(self
            .ok(Command::ModuleLoad { ptx: ptx.into() }, "MODULE_LOAD")?
            .value0)
    }
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        let _ = self.call(Command::SessionClose);
    }
}

/// Counts the answers to requests submitted without waiting, and their failures.
#[derive(Default)]
pub struct Answers {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Answers {
    pub fn reset(&self) {
        self.ok.store(0, Ordering::SeqCst);
        self.failed.store(0, Ordering::SeqCst);
        *self.first_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// All `n` answered OK (a later SYNC's answer came after theirs).
    pub fn expect(&self, n: u64) -> Result<(), String> {
        let ok = self.ok.load(Ordering::SeqCst);
        let failed = self.failed.load(Ordering::SeqCst);
        if ok == n && failed == 0 {
            return Ok(());
        }
        let first = self
            .first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        Err(format!(
            "{ok} of {n} answered OK, {failed} failed (first: {first})"
        ))
    }
}

impl CompletionSink for Answers {
    fn complete(&self, _token: u64, response: Response) {
        if response.status == Status::Ok {
            self.ok.fetch_add(1, Ordering::SeqCst);
        } else {
            self.failed.fetch_add(1, Ordering::SeqCst);
            self.first_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| describe(&response));
        }
    }
}

/// splitmix64: fresh inputs every run, reproducible from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub fn f32s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32_in(lo, hi)).collect()
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The median sample (the upper one of an even count); zero for none.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The `.version`, `.target` and `.address_size` lines NVRTC wrote for this device, for
/// hand-written PTX of the same device.
pub fn ptx_header(catalog_ptx: &str) -> String {
    let mut header = String::new();
    for prefix in [".version", ".target", ".address_size"] {
        if let Some(line) = catalog_ptx
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
        {
            header.push_str(line);
            header.push('\n');
        }
    }
    if !header.contains(".address_size") {
        header.push_str(".address_size 64\n");
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let (x, y) = (a.f32s(1000, -2.0, 3.0), b.f32s(1000, -2.0, 3.0));
        assert_eq!(x, y);
        assert!(x.iter().all(|v| (-2.0..3.0).contains(v)));
        assert_eq!(f32_bytes(&[1.0]), 1.0f32.to_le_bytes().to_vec());
    }

    #[test]
    fn median_and_ptx_header() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(median(Vec::new()), Duration::ZERO);
        let ptx = "//\n.version 9.0\n.target sm_90\n.entry k() {}\n";
        assert_eq!(
            ptx_header(ptx),
            ".version 9.0\n.target sm_90\n.address_size 64\n"
        );
    }
}
