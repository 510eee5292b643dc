// SPDX-License-Identifier: Apache-2.0
//! Handle-level access to a session: device memory, modules and launches by the
//! device's handles, for driver-API shims and the C ABI.
//!
//! Nothing here frees on drop: the caller owns every handle it gets and frees it (or
//! lets the session's close free everything). Copies go through the same machinery as
//! the typed API: large copies are split into chunks that the device accepts, and
//! launches, memsets, device copies and host-to-device copies of at most
//! [`crate::ASYNC_MAX_BYTES`] are queued without waiting for the device; a failure among
//! them is reported by a later synchronous call such as [`Session::sync`].

use vgpu_protocol::{
    FunctionInfo, Op, Param, MAX_DEVICE_ATTRIBUTES, MAX_MODULE_IMAGE_BYTES, MAX_PTX_BYTES,
};

use crate::error::{Error, Result};
use crate::session::{check_symbol, launch_request, HostBuffer, LaunchConfig, Session};
use crate::PAGEABLE_CHUNK_BYTES;

/// A device variable of a module (see [`Session::module_global`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleGlobal {
    /// A buffer handle for copies and memsets (freed with its module; FREE refuses it).
    pub handle: u64,
    /// Its device address in the session's context.
    pub address: u64,
    /// Its size in bytes.
    pub size: u64,
}

impl HostBuffer {
    /// `len` bytes at `at`, or an error naming the overrun.
    fn check_region(&self, at: usize, len: usize) -> Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "{len} bytes at {at} of a host buffer of {}",
                self.len()
            ))),
        }
    }

    /// The bytes `at..at + len`, made from the mapping's pointer for exactly that range.
    fn region(&self, at: usize, len: usize) -> Result<&[u8]> {
        self.check_region(at, len)?;
        // SAFETY: the range lies inside the live mapping (checked above); shared access
        // through &self, and no &mut view of the buffer exists while &self is borrowed.
        Ok(unsafe { std::slice::from_raw_parts(self.mem.as_ptr().add(at), len) })
    }
}

impl Session {
    /// Allocates `size` bytes of device memory: its buffer handle and its device address
    /// in the session's context. A device that reports no address answers 0.
    pub fn raw_alloc(&self, size: u64) -> Result<(u64, u64)> {
        if size == 0 {
            return Err(Error::invalid("an allocation of 0 bytes"));
        }
        let r = self.inner.request(Op::Alloc { size }, &[], &mut [])?;
        Ok((r.value0, r.value1))
    }

    /// Frees a buffer; an earlier asynchronous failure is reported here too.
    pub fn raw_free(&self, handle: u64) -> Result<()> {
        self.inner
            .request(Op::Free { handle }, &[], &mut [])
            .map(drop)
    }

    /// Copies `src` into the buffer at `offset` (queued when at most 64 KiB).
    pub fn raw_htod(&self, handle: u64, offset: u64, src: &[u8]) -> Result<()> {
        self.inner
            .htod(handle, offset, src, &self.inner.pageable_chunk)
    }

    /// Copies `dst.len()` bytes of the buffer at `offset` into `dst`.
    pub fn raw_dtoh(&self, handle: u64, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.inner
            .dtoh(handle, offset, dst, &self.inner.pageable_chunk)
    }

    /// Copies `len` bytes between two buffers of the session, on the device (queued).
    pub fn raw_dtod(
        &self,
        dst: u64,
        dst_offset: u64,
        src: u64,
        src_offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let op = Op::Dtod {
            dst,
            dst_offset,
            src,
            src_offset,
            len,
        };
        self.inner.request_async(op, &[])
    }

    /// Sets `len` bytes of the buffer at `offset` to `value`, `width` (1 or 4) bytes at a
    /// time; with width 4, `offset` and `len` must be multiples of 4 (queued).
    pub fn raw_memset(
        &self,
        handle: u64,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> Result<()> {
        match width {
            1 if value <= 0xff => {}
            4 if offset % 4 == 0 && len % 4 == 0 => {}
            _ => {
                return Err(Error::invalid(format!(
                    "memset of width {width}, value {value:#x}, at {offset} for {len} bytes"
                )))
            }
        }
        if len == 0 {
            return Ok(());
        }
        let op = Op::Memset {
            dst: handle,
            offset,
            len,
            value,
            width,
        };
        self.inner.request_async(op, &[])
    }

    /// Copies `len` bytes at `at` of a host buffer into the buffer at `offset`, in the
    /// host buffer's large requests (the device copies straight from its pages).
    pub fn raw_htod_from_host(
        &self,
        handle: u64,
        offset: u64,
        src: &HostBuffer,
        at: usize,
        len: usize,
    ) -> Result<()> {
        let data = src.region(at, len)?;
        self.inner.htod(handle, offset, data, &src.chunk)
    }

    /// Copies `len` bytes of the buffer at `offset` into a host buffer at `at`.
    pub fn raw_dtoh_into_host(
        &self,
        handle: u64,
        offset: u64,
        dst: &mut HostBuffer,
        at: usize,
        len: usize,
    ) -> Result<()> {
        // SAFETY: &mut dst: nothing else views the buffer during the call.
        unsafe { self.raw_dtoh_into_shared_host(handle, offset, dst, at, len) }
    }

    /// [`Session::raw_dtoh_into_host`] into a host buffer that other threads share (a
    /// driver-API shim hands the buffer's memory to its caller as a raw pointer).
    ///
    /// # Safety
    /// Nothing may read or write the bytes `at..at + len` of `dst` during the call.
    pub unsafe fn raw_dtoh_into_shared_host(
        &self,
        handle: u64,
        offset: u64,
        dst: &HostBuffer,
        at: usize,
        len: usize,
    ) -> Result<()> {
        dst.check_region(at, len)?;
        // SAFETY: inside the live mapping (checked); the caller promises exclusive use of
        // exactly these bytes for the duration of the call.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.mem.as_ptr().add(at), len) };
        self.inner.dtoh(handle, offset, out, &dst.chunk)
    }

    /// Loads a PTX module: its device handle (unload it with [`Session::raw_unload`]).
    pub fn raw_load_ptx(&self, ptx: &str) -> Result<u64> {
        if ptx.is_empty() || ptx.len() > MAX_PTX_BYTES as usize {
            return Err(Error::invalid(format!(
                "PTX of {} bytes (1 to {MAX_PTX_BYTES})",
                ptx.len()
            )));
        }
        if ptx.as_bytes().contains(&0) {
            return Err(Error::invalid("PTX contains a NUL byte"));
        }
        let op = Op::ModuleLoad {
            ptx_len: ptx.len() as u32,
        };
        self.load_payload(op, ptx.as_bytes())
    }

    /// Loads a module from a binary image (cubin or fatbin): its device handle.
    pub fn raw_load_image(&self, image: &[u8]) -> Result<u64> {
        if image.is_empty() || image.len() > MAX_MODULE_IMAGE_BYTES as usize {
            return Err(Error::invalid(format!(
                "module image of {} bytes (1 to {MAX_MODULE_IMAGE_BYTES})",
                image.len()
            )));
        }
        let op = Op::ModuleLoadImage {
            len: image.len() as u32,
        };
        self.load_payload(op, image)
    }

    /// A module load whose payload, when large, is staged in contiguous host memory
    /// first: scattered pages would need more descriptors than a chain holds.
    fn load_payload(&self, op: Op, payload: &[u8]) -> Result<u64> {
        let r = if payload.len() > PAGEABLE_CHUNK_BYTES {
            let mut staged = self.inner.transport.host_memory(payload.len())?;
            staged.as_mut_slice().copy_from_slice(payload);
            self.inner.request(op, &[staged.as_slice()], &mut [])?
        } else {
            self.inner.request(op, &[payload], &mut [])?
        };
        Ok(r.value0)
    }

    /// Unloads a module (its globals go with it).
    pub fn raw_unload(&self, module: u64) -> Result<()> {
        self.inner
            .request(Op::ModuleUnload { module }, &[], &mut [])
            .map(drop)
    }

    /// Launches `kernel` of `module` ([`vgpu_protocol::BUILTIN_MODULE`] for the built-in
    /// catalog) with `params` as the device should pass them (queued).
    pub fn raw_launch(
        &self,
        module: u64,
        kernel: &str,
        cfg: LaunchConfig,
        params: &[Param],
    ) -> Result<()> {
        let request = launch_request(module, kernel, cfg, params.to_vec())?;
        let payload = request.payload();
        self.inner.request_async(request.header().op, &[&payload])
    }

    /// The device's attributes 1..=`count` in `CUdevice_attribute` numbering; those the
    /// device does not know are 0.
    pub fn device_attributes(&self, count: u32) -> Result<Vec<i32>> {
        if count == 0 || count > MAX_DEVICE_ATTRIBUTES {
            return Err(Error::invalid(format!(
                "{count} device attributes (1 to {MAX_DEVICE_ATTRIBUTES})"
            )));
        }
        let mut buf = vec![0u8; 4 * count as usize];
        let r = self
            .inner
            .request(Op::DeviceAttributes { count }, &[], &mut [&mut buf])?;
        if r.written as usize != buf.len() {
            return Err(Error::ShortReply {
                op: "DEVICE_ATTRIBUTES",
                expected: buf.len(),
                written: r.written as usize,
            });
        }
        Ok(buf
            .chunks_exact(4)
            .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    }

    /// What kernel `name` of `module` (or of the built-in catalog) needs: its attributes
    /// and the layout of its parameters.
    pub fn function_info(&self, module: u64, name: &str) -> Result<FunctionInfo> {
        check_symbol("kernel name", name)?;
        let mut buf = vec![0u8; FunctionInfo::MAX_SIZE];
        let mut payload = name.as_bytes().to_vec();
        payload.push(0);
        let op = Op::FunctionInfo {
            module,
            name_len: payload.len() as u16,
        };
        let r = self.inner.request(op, &[&payload], &mut [&mut buf])?;
        let written = (r.written as usize).min(buf.len());
        Ok(FunctionInfo::decode(&buf[..written])?)
    }

    /// The device variable `name` of `module` (`__device__`, `__constant__`).
    pub fn module_global(&self, module: u64, name: &str) -> Result<ModuleGlobal> {
        check_symbol("variable name", name)?;
        let mut size = [0u8; 8];
        let mut payload = name.as_bytes().to_vec();
        payload.push(0);
        let op = Op::ModuleGlobal {
            module,
            name_len: payload.len() as u16,
        };
        let r = self.inner.request(op, &[&payload], &mut [&mut size])?;
        if r.written != 8 {
            return Err(Error::ShortReply {
                op: "MODULE_GLOBAL",
                expected: 8,
                written: r.written as usize,
            });
        }
        Ok(ModuleGlobal {
            handle: r.value0,
            address: r.value1,
            size: u64::from_le_bytes(size),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vgpu_protocol::{Opcode, Status, BUILTIN_MODULE};

    use super::*;
    use crate::fake::{
        attribute, builtin_info, AsyncDriver, Chain, FakeDevice, Recorder, ADDRESS_BASE,
        GLOBAL_NAME, GLOBAL_SIZE,
    };
    use crate::HOST_CHUNK_BYTES;

    const MIB: usize = 1 << 20;

    struct Rig {
        chains: Arc<Mutex<Vec<Chain>>>,
        session: Session,
    }

    /// A session over the fake device through a driver with async submission; host
    /// memory counts as the driver's contiguous memory.
    fn rig() -> Rig {
        let dev = FakeDevice::new();
        let mut rec = Recorder::new(AsyncDriver::new(dev.transport()));
        rec.contiguous_host_memory = true;
        let chains = rec.chains.clone();
        Rig {
            chains,
            session: Session::from_transport(Box::new(rec)),
        }
    }

    impl Rig {
        /// (opcode, queued) of every chain since the last call, in order.
        fn take(&self) -> Vec<(Opcode, bool)> {
            let mut chains = self.chains.lock().unwrap();
            chains.drain(..).map(|c| (c.opcode(), c.queued)).collect()
        }

        fn ops(&self, op: Opcode) -> Vec<vgpu_protocol::Op> {
            let chains = self.chains.lock().unwrap();
            chains
                .iter()
                .filter(|c| c.opcode() == op)
                .map(|c| c.header.op)
                .collect()
        }
    }

    fn status<T: std::fmt::Debug>(r: Result<T>) -> Option<Status> {
        r.unwrap_err().status()
    }

    #[test]
    fn alloc_answers_distinct_aligned_addresses_and_free_reports_errors() {
        let r = rig();
        let (a, addr_a) = r.session.raw_alloc(100).unwrap();
        let (b, addr_b) = r.session.raw_alloc(4096).unwrap();
        assert_ne!(a, b);
        assert_eq!(addr_a, ADDRESS_BASE);
        assert_eq!(addr_b, ADDRESS_BASE + 256);
        assert!(matches!(
            r.session.raw_alloc(0),
            Err(Error::InvalidArgument(_))
        ));
        r.session.raw_free(a).unwrap();
        assert_eq!(status(r.session.raw_free(a)), Some(Status::InvalidHandle));
        assert_eq!(
            status(r.session.raw_alloc(1 << 30)),
            Some(Status::QuotaExceeded)
        );
    }

    #[test]
    fn copies_at_offsets_round_trip_in_chunks_and_small_ones_are_queued() {
        let r = rig();
        let n = 2 * MIB + 100;
        let (h, _) = r.session.raw_alloc(n as u64 + 16).unwrap();
        let src: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        r.take();
        r.session.raw_htod(h, 16, &src).unwrap();
        let htods: Vec<_> = r.ops(Opcode::Htod);
        assert_eq!(
            htods,
            [
                (16, MIB as u64),
                (16 + MIB as u64, MIB as u64),
                (16 + 2 * MIB as u64, 100)
            ]
            .map(|(offset, len)| vgpu_protocol::Op::Htod {
                dst: h,
                offset,
                len
            })
        );
        assert_eq!(
            r.take(),
            [
                (Opcode::Htod, false),
                (Opcode::Htod, false),
                (Opcode::Htod, true)
            ]
        );
        let mut back = vec![0u8; n - 10];
        r.session.raw_dtoh(h, 26, &mut back).unwrap();
        assert_eq!(back, src[10..]);
        // Past the end of the buffer: the device refuses it.
        let mut over = [0u8; 32];
        assert_eq!(
            status(r.session.raw_dtoh(h, n as u64, &mut over)),
            Some(Status::OutOfRange)
        );
    }

    #[test]
    fn dtod_and_memsets_at_offsets_are_queued_and_checked() {
        let r = rig();
        let (a, _) = r.session.raw_alloc(64).unwrap();
        let (b, _) = r.session.raw_alloc(64).unwrap();
        r.session.raw_memset(a, 0, 64, 0, 1).unwrap();
        r.session.raw_memset(a, 8, 16, 0x1122_3344, 4).unwrap();
        r.session.raw_memset(a, 3, 2, 0xee, 1).unwrap();
        r.session.raw_memset(b, 0, 64, 0x77, 1).unwrap();
        r.session.raw_dtod(b, 32, a, 0, 32).unwrap();
        r.session.raw_dtod(b, 0, a, 0, 0).unwrap();
        r.session.raw_memset(a, 0, 0, 1, 1).unwrap();
        for bad in [(2, 8, 1, 4), (0, 6, 1, 4), (0, 8, 256, 1), (0, 8, 1, 2)] {
            let (offset, len, value, width) = bad;
            assert!(
                matches!(
                    r.session.raw_memset(a, offset, len, value, width),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        r.session.sync().unwrap();
        let mut out = [0u8; 64];
        r.session.raw_dtoh(b, 0, &mut out).unwrap();
        let mut expected = [0x77u8; 64];
        expected[32..64].fill(0);
        expected[40..56]
            .chunks_exact_mut(4)
            .for_each(|w| w.copy_from_slice(&0x1122_3344u32.to_le_bytes()));
        expected[35..37].fill(0xee);
        assert_eq!(out, expected);
        let queued: Vec<_> = r.take().into_iter().filter(|&(_, q)| q).collect();
        assert_eq!(queued.len(), 5, "empty copies and memsets send nothing");
    }

    #[test]
    fn host_buffer_regions_copy_in_large_requests_and_overruns_are_refused() {
        let r = rig();
        let n = 3 * MIB;
        let mut host = r.session.host_buffer(n + 4096).unwrap();
        host.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 241) as u8);
        let (h, _) = r.session.raw_alloc(n as u64).unwrap();
        r.take();
        r.session.raw_htod_from_host(h, 0, &host, 4096, n).unwrap();
        assert_eq!(
            r.ops(Opcode::Htod),
            [vgpu_protocol::Op::Htod {
                dst: h,
                offset: 0,
                len: n as u64
            }]
        );
        assert!(n <= HOST_CHUNK_BYTES);
        let mut back = r.session.host_buffer(n).unwrap();
        r.session.raw_dtoh_into_host(h, 0, &mut back, 0, n).unwrap();
        assert_eq!(back.as_slice(), &host.as_slice()[4096..]);
        // SAFETY: nothing else uses `back` during the call.
        unsafe { r.session.raw_dtoh_into_shared_host(h, 10, &back, 0, 10) }.unwrap();
        assert_eq!(&back.as_slice()[..10], &host.as_slice()[4106..4116]);
        assert!(matches!(
            r.session.raw_htod_from_host(h, 0, &host, n, 8192),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            r.session.raw_dtoh_into_host(h, 0, &mut back, usize::MAX, 2),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn modules_load_from_ptx_and_images_and_unload() {
        let r = rig();
        let m = r.session.raw_load_ptx(".version 8.0\n").unwrap();
        assert!(matches!(
            r.session.raw_load_ptx("a\0b"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            r.session.raw_load_image(&[]),
            Err(Error::InvalidArgument(_))
        ));
        // A large image is staged in one contiguous piece.
        let mut image = b"\x7fELF".to_vec();
        image.resize(2 * MIB, 0);
        let cubin = r.session.raw_load_image(&image).unwrap();
        let loads: Vec<_> = {
            let chains = r.chains.lock().unwrap();
            chains
                .iter()
                .filter(|c| c.opcode() == Opcode::ModuleLoadImage)
                .map(|c| c.input.clone())
                .collect()
        };
        assert_eq!(loads, vec![vec![2 * MIB]]);
        assert_eq!(
            status(r.session.raw_load_image(b"not an image")),
            Some(Status::ModuleInvalid)
        );
        r.session.raw_unload(m).unwrap();
        r.session.raw_unload(cubin).unwrap();
        assert_eq!(status(r.session.raw_unload(m)), Some(Status::InvalidHandle));
    }

    #[test]
    fn raw_launches_pass_params_as_given_and_are_queued() {
        let r = rig();
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (a, _) = r.session.raw_alloc(16).unwrap();
        let (b, _) = r.session.raw_alloc(16).unwrap();
        let (c, _) = r.session.raw_alloc(16).unwrap();
        r.session.raw_htod(a, 0, &f(&[1.0, 2.0, 3.0, 4.0])).unwrap();
        r.session.raw_htod(b, 0, &f(&[0.5; 4])).unwrap();
        let params = [
            Param::Buffer(a),
            Param::Buffer(b),
            Param::Buffer(c),
            Param::u32(4),
        ];
        r.take();
        let cfg = LaunchConfig::for_num_elems(4);
        r.session
            .raw_launch(BUILTIN_MODULE, "vector_add_f32", cfg, &params)
            .unwrap();
        assert_eq!(r.take(), [(Opcode::Launch, true)]);
        let mut out = [0u8; 16];
        r.session.raw_dtoh(c, 0, &mut out).unwrap();
        assert_eq!(out.to_vec(), f(&[1.5, 2.5, 3.5, 4.5]));
        r.take();
        for (name, params) in [
            ("bad name", vec![]),
            ("k", vec![Param::Value(vec![])]),
            ("k", vec![Param::u32(1); 65]),
            ("k", vec![Param::Value(vec![0; 4097])]),
        ] {
            assert!(matches!(
                r.session.raw_launch(BUILTIN_MODULE, name, cfg, &params),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(r.take().is_empty());
    }

    #[test]
    fn device_attributes_and_function_info_decode_the_device_reply() {
        let r = rig();
        assert_eq!(
            r.session.device_attributes(5).unwrap(),
            (1..=5).map(attribute).collect::<Vec<_>>()
        );
        assert_eq!(r.session.device_attributes(147).unwrap().len(), 147);
        for bad in [0, MAX_DEVICE_ATTRIBUTES + 1] {
            assert!(matches!(
                r.session.device_attributes(bad),
                Err(Error::InvalidArgument(_))
            ));
        }
        let info = r
            .session
            .function_info(BUILTIN_MODULE, "vector_add_f32")
            .unwrap();
        assert_eq!(info, builtin_info("vector_add_f32").unwrap());
        assert_eq!(
            status(r.session.function_info(BUILTIN_MODULE, "missing")),
            Some(Status::KernelNotFound)
        );
        assert!(matches!(
            r.session.function_info(BUILTIN_MODULE, "no spaces"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_module_global_is_a_buffer_for_copies_that_goes_with_its_module() {
        let r = rig();
        let m = r.session.raw_load_ptx(".version 8.0\n").unwrap();
        let g = r.session.module_global(m, GLOBAL_NAME).unwrap();
        assert_eq!(g.size, GLOBAL_SIZE);
        assert_ne!(g.address, 0);
        assert_eq!(r.session.module_global(m, GLOBAL_NAME).unwrap(), g);
        r.session.raw_htod(g.handle, 4, &[1, 2, 3, 4]).unwrap();
        let mut out = [9u8; 8];
        r.session.raw_dtoh(g.handle, 2, &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        assert_eq!(
            status(r.session.raw_free(g.handle)),
            Some(Status::InvalidHandle)
        );
        assert_eq!(
            status(r.session.module_global(m, "other")),
            Some(Status::KernelNotFound)
        );
        r.session.raw_unload(m).unwrap();
        assert_eq!(
            status(r.session.raw_dtoh(g.handle, 0, &mut out)),
            Some(Status::InvalidHandle)
        );
    }
}
