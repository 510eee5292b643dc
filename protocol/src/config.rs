// SPDX-License-Identifier: Apache-2.0
//! The device's virtio config space and the INFO reply that extends it.

use crate::request::DecodeError;
use crate::wire::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};

/// First four bytes of the config space: "VGPU".
pub const CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"VGPU");
/// Size of the config space the device exposes (QEMU's `config_size`).
pub const CONFIG_SIZE: usize = 128;
/// Size of the INFO reply: the config space followed by the VM's usage.
pub const INFO_SIZE: usize = 192;
const NAME_OFFSET: usize = 48;
const NAME_LEN: usize = 64;
/// The host GPU's index (after the name; zero from hosts that predate it).
const GPU_OFFSET: usize = NAME_OFFSET + NAME_LEN;

/// Which executor runs the VM's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ExecutorKind {
    Cpu = 1,
    Cuda = 2,
}

impl ExecutorKind {
    pub fn from_u32(v: u32) -> Option<ExecutorKind> {
        match v {
            1 => Some(ExecutorKind::Cpu),
            2 => Some(ExecutorKind::Cuda),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExecutorKind::Cpu => "cpu",
            ExecutorKind::Cuda => "cuda",
        }
    }
}

/// The config space a guest reads from the device (little-endian, [`CONFIG_SIZE`] bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub version: u32,
    pub num_queues: u32,
    /// Largest chain, in bytes, the device accepts.
    pub max_request_bytes: u32,
    pub executor: ExecutorKind,
    pub cc_major: u16,
    pub cc_minor: u16,
    /// This VM's device-memory quota in bytes.
    pub mem_quota: u64,
    /// Device memory of the physical device in bytes.
    pub device_memory: u64,
    pub multiprocessors: u32,
    pub max_sessions: u32,
    /// Device name, at most 63 bytes on the wire.
    pub name: String,
    /// Which of the host's GPUs this device is placed on: its index as the host names it
    /// (the mediator's `--gpus` numbering, CUDA's device ordinal). 0 on a one-GPU host and
    /// from hosts that predate the field.
    pub gpu: u32,
}

impl DeviceConfig {
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        put_u32(&mut b, 0, CONFIG_MAGIC);
        put_u32(&mut b, 4, self.version);
        put_u32(&mut b, 8, self.num_queues);
        put_u32(&mut b, 12, self.max_request_bytes);
        put_u32(&mut b, 16, self.executor as u32);
        put_u16(&mut b, 20, self.cc_major);
        put_u16(&mut b, 22, self.cc_minor);
        put_u64(&mut b, 24, self.mem_quota);
        put_u64(&mut b, 32, self.device_memory);
        put_u32(&mut b, 40, self.multiprocessors);
        put_u32(&mut b, 44, self.max_sessions);
        let name = truncate_utf8(&self.name, NAME_LEN - 1);
        b[NAME_OFFSET..NAME_OFFSET + name.len()].copy_from_slice(name.as_bytes());
        put_u32(&mut b, GPU_OFFSET, self.gpu);
        b
    }

    pub fn decode(b: &[u8]) -> Result<DeviceConfig, DecodeError> {
        if b.len() < CONFIG_SIZE {
            return Err(DecodeError::Truncated {
                needed: CONFIG_SIZE,
                got: b.len(),
            });
        }
        let magic = u32_at(b, 0);
        if magic != CONFIG_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let raw_exec = u32_at(b, 16);
        let name_field = &b[NAME_OFFSET..NAME_OFFSET + NAME_LEN];
        let end = name_field
            .iter()
            .position(|&c| c == 0)
            .ok_or(DecodeError::StringNotTerminated)?;
        let name = std::str::from_utf8(&name_field[..end])
            .map_err(|_| DecodeError::InvalidString)?
            .to_owned();
        Ok(DeviceConfig {
            version: u32_at(b, 4),
            num_queues: u32_at(b, 8),
            max_request_bytes: u32_at(b, 12),
            executor: ExecutorKind::from_u32(raw_exec)
                .ok_or(DecodeError::InvalidArgument("executor kind"))?,
            cc_major: u16_at(b, 20),
            cc_minor: u16_at(b, 22),
            mem_quota: u64_at(b, 24),
            device_memory: u64_at(b, 32),
            multiprocessors: u32_at(b, 40),
            max_sessions: u32_at(b, 44),
            name,
            gpu: u32_at(b, GPU_OFFSET),
        })
    }
}

/// What INFO returns: the config space plus this VM's current usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoReply {
    pub config: DeviceConfig,
    /// Device memory this VM has allocated, in bytes.
    pub mem_used: u64,
    pub sessions: u32,
    pub allocations: u32,
    pub modules: u32,
    /// The VM's scheduling weight.
    pub weight: u32,
}

impl InfoReply {
    pub fn encode(&self) -> [u8; INFO_SIZE] {
        let mut b = [0u8; INFO_SIZE];
        b[..CONFIG_SIZE].copy_from_slice(&self.config.encode());
        put_u64(&mut b, 128, self.mem_used);
        put_u32(&mut b, 136, self.sessions);
        put_u32(&mut b, 140, self.allocations);
        put_u32(&mut b, 144, self.modules);
        put_u32(&mut b, 148, self.weight);
        b
    }

    pub fn decode(b: &[u8]) -> Result<InfoReply, DecodeError> {
        if b.len() < INFO_SIZE {
            return Err(DecodeError::Truncated {
                needed: INFO_SIZE,
                got: b.len(),
            });
        }
        Ok(InfoReply {
            config: DeviceConfig::decode(&b[..CONFIG_SIZE])?,
            mem_used: u64_at(b, 128),
            sessions: u32_at(b, 136),
            allocations: u32_at(b, 140),
            modules: u32_at(b, 144),
            weight: u32_at(b, 148),
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceConfig {
        DeviceConfig {
            version: 1,
            num_queues: 1,
            max_request_bytes: 1 << 28,
            executor: ExecutorKind::Cuda,
            cc_major: 9,
            cc_minor: 0,
            mem_quota: 8 << 30,
            device_memory: 80 << 30,
            multiprocessors: 132,
            max_sessions: 64,
            name: "NVIDIA H100 80GB HBM3 (mediated)".into(),
            gpu: 3,
        }
    }

    #[test]
    fn config_round_trips_and_names_its_magic() {
        let c = sample();
        let b = c.encode();
        assert_eq!(&b[..4], b"VGPU");
        assert_eq!(DeviceConfig::decode(&b), Ok(c));
    }

    #[test]
    fn long_names_are_cut_at_a_char_boundary_and_stay_terminated() {
        let c = DeviceConfig {
            name: "é".repeat(40),
            ..sample()
        };
        let d = DeviceConfig::decode(&c.encode()).unwrap();
        assert_eq!(d.name, "é".repeat(31));
    }

    #[test]
    fn info_round_trips() {
        let i = InfoReply {
            config: sample(),
            mem_used: 4096,
            sessions: 2,
            allocations: 3,
            modules: 1,
            weight: 100,
        };
        assert_eq!(InfoReply::decode(&i.encode()), Ok(i));
    }

    #[test]
    fn bad_magic_and_truncation_are_rejected() {
        let mut b = sample().encode();
        assert_eq!(
            DeviceConfig::decode(&b[..100]),
            Err(DecodeError::Truncated {
                needed: 128,
                got: 100
            })
        );
        b[0] = b'X';
        assert!(matches!(
            DeviceConfig::decode(&b),
            Err(DecodeError::BadMagic(_))
        ));
    }
}
