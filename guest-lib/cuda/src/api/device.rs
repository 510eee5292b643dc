// SPDX-License-Identifier: Apache-2.0
//! Initialization, devices and primary contexts.

use std::ffi::{c_char, c_int, c_uint};

use vgpu::DeviceConfig;

use super::{c_str, copy_str, handle, out, out_opt};
use crate::state::{driver, init, lock, ATTRIBUTES};
use crate::types::*;
use crate::{guard, Fail};

/// Capabilities this library does not offer, answered 0 whatever the GPU has: mapped
/// and managed host memory, cooperative and cluster launches, virtual memory management,
/// IPC and interop handles, stream memory operations, multicast.
const NOT_OFFERED: &[u32] = &[
    19, 83, 86, 88, 89, 91, 92, 93, 94, 95, 96, 98, 100, 101, 102, 103, 104, 105, 110, 113, 114,
    116, 117, 119, 120, 122, 123, 124, 125, 128, 129, 132, 135, 138, 141, 142, 143, 144, 145, 146,
];

/// The device's attributes 1..=[`ATTRIBUTES`] (index 0 is attribute 1): the host's,
/// less what this library does not offer, with the guest's PCI location; from a host
/// that answers none, what the config space tells and the limits every CUDA GPU since
/// compute capability 3.0 shares.
pub(crate) fn attributes(
    config: &DeviceConfig,
    pci_bus_id: Option<&str>,
    host: Option<Vec<i32>>,
) -> Vec<i32> {
    let mut a = host.unwrap_or_else(|| {
        let mut a = vec![0; ATTRIBUTES as usize];
        for (attr, value) in [
            (1, 1024),
            (2, 1024),
            (3, 1024),
            (4, 64),
            (5, i32::MAX),
            (6, 65535),
            (7, 65535),
            (8, 48 << 10),
            (9, 64 << 10),
            (10, 32),
            (12, 64 << 10),
            (16, config.multiprocessors as i32),
            (31, 1),
            (39, 2048),
            (41, 1),
            (75, config.cc_major as i32),
            (76, config.cc_minor as i32),
            (78, 1),
            (97, 48 << 10),
        ] {
            a[attr - 1] = value;
        }
        a
    });
    a.resize(ATTRIBUTES as usize, 0);
    for &attr in NOT_OFFERED {
        a[attr as usize - 1] = 0;
    }
    a[40] = 1; // 41: unified addressing
    if let Some((domain, bus, device)) = pci_bus_id.and_then(parse_pci) {
        a[32] = bus; // 33: PCI bus
        a[33] = device; // 34: PCI device
        a[49] = domain; // 50: PCI domain
    }
    a
}

/// (domain, bus, device) of "dddd:bb:dd.f".
fn parse_pci(s: &str) -> Option<(i32, i32, i32)> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, _) = rest.split_once('.')?;
    let hex = |v: &str| i32::from_str_radix(v, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(device)?))
}

/// (domain, bus, device, function) of a PCI bus id as CUDA takes it:
/// "domain:bus:device.function", "domain:bus:device" or "bus:device.function", in hex
/// (the function 0 and the domain 0 when left out).
fn parse_bus_id(s: &str) -> Option<(u32, u32, u32, u32)> {
    let hex = |v: &str| {
        (!v.is_empty() && v.len() <= 8)
            .then(|| u32::from_str_radix(v, 16).ok())
            .flatten()
    };
    let parts: Vec<&str> = s.trim().split(':').collect();
    let (domain, bus, slot) = match parts[..] {
        [domain, bus, slot] => (hex(domain)?, hex(bus)?, slot),
        [bus, slot] if slot.contains('.') => (0, hex(bus)?, slot),
        _ => return None,
    };
    let (device, function) = match slot.split_once('.') {
        Some((device, function)) => (hex(device)?, hex(function)?),
        None => (hex(slot)?, 0),
    };
    Some((domain, bus, device, function))
}

/// The ordinal of the device whose PCI bus id is `wanted`, among the devices' ids
/// (`None`: not on a PCI function the guest can name).
pub(crate) fn device_by_bus_id(ids: &[Option<&str>], wanted: &str) -> Result<usize, Fail> {
    let wanted = parse_bus_id(wanted).ok_or(Fail(CUDA_ERROR_INVALID_VALUE))?;
    ids.iter()
        .position(|id| id.and_then(parse_bus_id) == Some(wanted))
        .ok_or(Fail(CUDA_ERROR_INVALID_DEVICE))
}

/// The device's UUID: stable for the same device ordinal and name, made from them
/// (FNV-1a), marked as an RFC 9562 version 8 (custom) UUID. It is not the physical
/// GPU's UUID, which the guest never sees.
pub(crate) fn uuid(ordinal: usize, name: &str) -> [u8; 16] {
    let fnv = |seed: &str| {
        seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&fnv(&format!("vgpu:{ordinal}:{name}")).to_be_bytes());
    u[8..].copy_from_slice(&fnv(&format!("{name}:{ordinal}:vgpu")).to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", || {
        if flags != 0 {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        init()
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // SAFETY: NVIDIA's contract for the out-parameter.
    guard("cuDriverGetVersion", || unsafe {
        out(version, DRIVER_VERSION)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", || {
        let d = driver()?;
        d.device(ordinal)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", || {
        let n = driver()?.devices.len() as c_int;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(count, n) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetName", || {
        let slot = driver()?.device(dev)?;
        // SAFETY: `name` holds `len` bytes by NVIDIA's contract.
        unsafe { copy_str(name, len, &slot.config.name) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem", || {
        let slot = driver()?.device(dev)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(bytes, slot.config.mem_quota as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut usize, dev: CUdevice) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuDeviceTotalMem_v2(bytes, dev) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceGetAttribute", || {
        let d = driver()?;
        let slot = d.device(dev)?;
        if pi.is_null() || attrib < 1 || attrib > ATTRIBUTES as c_int {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        let a = d.attributes(slot)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pi, a[attrib as usize - 1]) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid_out: *mut [u8; 16], dev: CUdevice) -> CUresult {
    guard("cuDeviceGetUuid", || {
        let slot = driver()?.device(dev)?;
        // SAFETY: NVIDIA's contract: a CUuuid (16 bytes) to write.
        unsafe { out(uuid_out, uuid(slot.ordinal, &slot.config.name)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid_out: *mut [u8; 16], dev: CUdevice) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuDeviceGetUuid_v2(uuid_out, dev) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetPCIBusId(
    bus_id: *mut c_char,
    len: c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceGetPCIBusId", || {
        let slot = driver()?.device(dev)?;
        let Some(id) = slot.pci_bus_id.as_deref() else {
            return Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
        };
        // SAFETY: `bus_id` holds `len` bytes by NVIDIA's contract.
        unsafe { copy_str(bus_id, len, id) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetByPCIBusId(
    dev: *mut CUdevice,
    bus_id: *const c_char,
) -> CUresult {
    guard("cuDeviceGetByPCIBusId", || {
        let d = driver()?;
        if dev.is_null() {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: a NUL-terminated string by NVIDIA's contract.
        let wanted = unsafe { c_str(bus_id) }?;
        let ids: Vec<Option<&str>> = d.devices.iter().map(|s| s.pci_bus_id.as_deref()).collect();
        let ordinal = device_by_bus_id(&ids, wanted)?;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(dev, ordinal as CUdevice) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceComputeCapability", || {
        let slot = driver()?.device(dev)?;
        if major.is_null() || minor.is_null() {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: NVIDIA's contract for the out-parameters.
        unsafe {
            out(major, slot.config.cc_major as c_int)?;
            out(minor, slot.config.cc_minor as c_int)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(
    can: *mut c_int,
    dev: CUdevice,
    peer: CUdevice,
) -> CUresult {
    guard("cuDeviceCanAccessPeer", || {
        let d = driver()?;
        d.device(dev)?;
        d.device(peer)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(can, 0) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", || {
        let d = driver()?;
        let slot = d.device(dev)?;
        if pctx.is_null() {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        let id = d.retain_primary(slot)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pctx, handle(id)) }
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease", || {
        let d = driver()?;
        d.release_primary(d.device(dev)?)
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    cuDevicePrimaryCtxRelease_v2(dev)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxReset", || {
        let d = driver()?;
        d.reset_primary(d.device(dev)?);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    cuDevicePrimaryCtxReset_v2(dev)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    guard("cuDevicePrimaryCtxSetFlags", || {
        let d = driver()?;
        let slot = d.device(dev)?;
        lock(&slot.primary).flags = flags;
        if let Some(ctx) = d.contexts.get(slot.primary_id) {
            ctx.flags.store(flags, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxSetFlags(dev: CUdevice, flags: c_uint) -> CUresult {
    cuDevicePrimaryCtxSetFlags_v2(dev, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    guard("cuDevicePrimaryCtxGetState", || {
        let d = driver()?;
        let slot = d.device(dev)?;
        if flags.is_null() || active.is_null() {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        let f = lock(&slot.primary).flags;
        let on = d.contexts.get(slot.primary_id).is_some();
        // SAFETY: NVIDIA's contract for the out-parameters.
        unsafe {
            out(flags, f)?;
            out_opt(active, on as c_int);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu::ExecutorKind;

    fn config() -> DeviceConfig {
        DeviceConfig {
            version: 1,
            num_queues: 1,
            max_request_bytes: 1 << 28,
            executor: ExecutorKind::Cuda,
            cc_major: 9,
            cc_minor: 0,
            mem_quota: 8 << 30,
            device_memory: 141 << 30,
            multiprocessors: 132,
            max_sessions: 64,
            name: "NVIDIA H200".into(),
            gpu: 0,
        }
    }

    #[test]
    fn the_hosts_attributes_lose_what_the_library_does_not_offer() {
        let host: Vec<i32> = (1..=ATTRIBUTES as i32).collect();
        let a = attributes(&config(), Some("0000:00:05.0"), Some(host));
        assert_eq!(a.len(), ATTRIBUTES as usize);
        assert_eq!(a[0], 1, "max threads per block as the host says");
        assert_eq!(a[15], 16, "multiprocessors as the host says");
        for attr in NOT_OFFERED {
            assert_eq!(a[*attr as usize - 1], 0, "attribute {attr}");
        }
        assert_eq!((a[32], a[33], a[49]), (0, 5, 0), "the guest's PCI location");
        assert_eq!(a[40], 1);
    }

    #[test]
    fn without_host_attributes_the_config_space_and_common_limits_answer() {
        let a = attributes(&config(), None, None);
        assert_eq!(a[0], 1024);
        assert_eq!(a[9], 32);
        assert_eq!(a[15], 132);
        assert_eq!((a[74], a[75]), (9, 0));
        assert_eq!(a[18], 0, "no mapped host memory");
    }

    #[test]
    fn the_uuid_is_stable_per_ordinal_and_name_and_marked_version_8() {
        let a = uuid(0, "NVIDIA H200");
        assert_eq!(a, uuid(0, "NVIDIA H200"));
        assert_ne!(a, uuid(1, "NVIDIA H200"));
        assert_ne!(a, uuid(0, "CPU reference executor"));
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 0b10);
        assert_eq!(parse_pci("0000:af:1f.7"), Some((0, 0xaf, 0x1f)));
        assert_eq!(parse_pci("virtio0"), None);
    }

    #[test]
    fn a_pci_bus_id_in_any_of_cudas_forms_finds_its_device() {
        let ids = [Some("0000:00:02.0"), None, Some("0000:00:0a.0")];
        for form in [
            "0000:00:0a.0",
            "0000:00:0A.0",
            "00:0a.0",
            "0:0:a",
            "0000:00:0a",
        ] {
            assert_eq!(
                device_by_bus_id(&ids, form).map_err(|f| f.0),
                Ok(2),
                "{form}"
            );
        }
        assert_eq!(device_by_bus_id(&ids, "00:02.0").map_err(|f| f.0), Ok(0));
        assert_eq!(
            device_by_bus_id(&ids, "0000:00:03.0").map_err(|f| f.0),
            Err(CUDA_ERROR_INVALID_DEVICE)
        );
        for bad in ["", "00:02", "0000:00:zz.0", "a:b:c:d", "virtio0"] {
            assert_eq!(
                device_by_bus_id(&ids, bad).map_err(|f| f.0),
                Err(CUDA_ERROR_INVALID_VALUE),
                "{bad:?}"
            );
        }
    }
}
