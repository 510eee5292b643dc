// SPDX-License-Identifier: Apache-2.0
//! Hostile descriptor chains made from bytes: a fuzz input or a random buffer decides
//! every descriptor (address inside, across or outside RAM, length, direction, links,
//! indirect tables) and the bytes the device finds there, which start as a request header
//! often enough for the device's decoding to be reached.
//!
//! Addresses inside RAM fall only in a scratch range at the very end of RAM, so whatever
//! the device writes cannot touch the VM's own rings or request buffers, and a range
//! that runs past the scratch runs past RAM.

use vgpu_protocol::{PROTOCOL_VERSION, REQUEST_HEADER_SIZE, REQUEST_MAGIC};

use super::{
    write_desc, Completion, Error, GuestRam, Link, RawDesc, Result, Vm, DESC_F_INDIRECT,
    DESC_F_NEXT, DESC_F_WRITE,
};

/// Reads the decisions of one chain from bytes; past the end it reads zeros, so every
/// input, even an empty one, makes a chain.
#[derive(Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, pos: 0 }
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Fills `out` with the next bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.u8();
        }
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
}

/// The guest range hostile chains point into, at the end of RAM.
#[derive(Clone, Copy, Debug)]
pub struct Scratch {
    pub addr: u64,
    pub len: u64,
}

impl Scratch {
    /// Takes all RAM not yet handed out, up to its end. Call after everything else of the
    /// VM is allocated.
    pub fn take_rest(ram: &GuestRam) -> Result<Scratch> {
        let len = ram.free();
        if len < 4096 {
            return Err(Error::OutOfGuestRam {
                wanted: 4096,
                free: len,
            });
        }
        let addr = ram.alloc(len, 1)?;
        Ok(Scratch { addr, len })
    }
}

/// One hostile chain as it was submitted.
#[derive(Clone, Debug)]
pub struct HostileChain {
    pub descs: Vec<RawDesc>,
    /// The most bytes a device can honestly report as used: the writable descriptors
    /// inside RAM, each counted once (those of a valid indirect table included).
    pub max_used: u64,
}

/// Most descriptors in a hostile chain (and in an indirect table).
pub const MAX_HOSTILE_DESCS: usize = 8;

/// Builds one hostile chain from `bytes`, writes its contents into `scratch` and
/// returns the descriptors (not yet submitted).
///
/// Half the chains are laid out as a driver would (header, readable payload, writable
/// payload, response header) with lengths that often agree with the header, and then
/// maybe one descriptor spoiled; the other half are descriptors of any shape.
pub fn build(ram: &GuestRam, scratch: Scratch, bytes: &mut Bytes<'_>) -> Result<HostileChain> {
    let mode = bytes.u8();
    let content_len = (scratch.len as usize).min(8192);
    let mut content = vec![0u8; content_len];
    let seeded = bytes.remaining().min(content_len).min(512);
    bytes.fill(&mut content[..seeded]);
    let mut indirect_writable = 0;
    let descs = if mode & 1 == 0 && content_len >= 8192 {
        let descs = driver_like(scratch, &mut content, bytes);
        ram.write(scratch.addr, &content)?;
        spoil(descs, scratch, ram, bytes)
    } else {
        if mode & 6 != 0 {
            plausible_header(&mut content[..REQUEST_HEADER_SIZE], bytes);
        }
        ram.write(scratch.addr, &content)?;
        let (descs, writable) = any_shape(ram, scratch, bytes)?;
        indirect_writable = writable;
        descs
    };
    let max_used = indirect_writable
        + descs
            .iter()
            .filter(|d| {
                d.flags & DESC_F_WRITE != 0
                    && d.flags & DESC_F_INDIRECT == 0
                    && ram.contains(d.addr, u64::from(d.len))
            })
            .map(|d| u64::from(d.len))
            .sum::<u64>();
    Ok(HostileChain { descs, max_used })
}

/// Header at the start of scratch, readable payload right after it, writable payload at
/// 4 KiB and the response header right after that; each part one or two descriptors.
fn driver_like(scratch: Scratch, content: &mut [u8], bytes: &mut Bytes<'_>) -> Vec<RawDesc> {
    let op = plausible_header(&mut content[..REQUEST_HEADER_SIZE], bytes);
    let payload = match bytes.u8() % 4 {
        0 | 1 => 0,
        2 => u32::from(bytes.u8()),
        _ => u32::from(bytes.u16()) % 3072,
    };
    let writable = match bytes.u8() % 5 {
        0 | 1 => 0,
        2 => vgpu_protocol::INFO_SIZE as u32,
        3 => vgpu_protocol::MAX_SELFTEST_MESSAGE as u32,
        _ => u32::from(bytes.u16()) % 3072,
    };
    // Make the header agree with the lengths, most of the time.
    if bytes.u8() % 4 != 0 {
        let arg = |i: usize| 32 + 8 * i;
        match op {
            6 => content[arg(2)..arg(2) + 8].copy_from_slice(&u64::from(payload).to_le_bytes()),
            7 => content[arg(2)..arg(2) + 8].copy_from_slice(&u64::from(writable).to_le_bytes()),
            10 => content[32..36].copy_from_slice(&payload.to_le_bytes()),
            _ => {}
        }
    }
    let header = REQUEST_HEADER_SIZE as u32;
    let wr_at = scratch.addr + 4096;
    let mut descs = Vec::new();
    let mut push = |addr: u64, len: u32, flags: u16| {
        descs.push(RawDesc {
            addr,
            len,
            flags,
            link: Link::End,
        })
    };
    if bytes.u8() & 1 == 0 {
        push(scratch.addr, header + payload, 0);
    } else {
        push(scratch.addr, header, 0);
        if payload > 0 {
            push(scratch.addr + u64::from(header), payload, 0);
        }
    }
    if bytes.u8() & 1 == 0 {
        push(wr_at, writable + 32, DESC_F_WRITE);
    } else {
        if writable > 0 {
            push(wr_at, writable, DESC_F_WRITE);
        }
        push(wr_at + u64::from(writable), 32, DESC_F_WRITE);
    }
    let n = descs.len();
    for (i, d) in descs.iter_mut().enumerate() {
        if i + 1 < n {
            d.link = Link::To(i + 1);
        }
    }
    descs
}

/// Spoils one descriptor of a driver-like chain a quarter of the time.
fn spoil(
    mut descs: Vec<RawDesc>,
    scratch: Scratch,
    ram: &GuestRam,
    bytes: &mut Bytes<'_>,
) -> Vec<RawDesc> {
    if bytes.u8() % 4 != 0 {
        return descs;
    }
    let n = descs.len();
    let i = bytes.u8() as usize % n;
    match bytes.u8() % 6 {
        0 => {
            let (addr, len, _) = address(scratch, ram, bytes);
            descs[i].addr = addr;
            descs[i].len = len;
        }
        1 => descs[i].len = u32::from(bytes.u16()),
        2 => descs[i].flags ^= DESC_F_WRITE,
        3 => descs[i].link = Link::To(bytes.u8() as usize % n),
        4 => descs[i].link = Link::Raw(bytes.u16()),
        _ => descs.swap(i, (i + 1) % n),
    }
    descs
}

/// One to eight descriptors of any address, length, direction and link, sometimes an
/// indirect table. Returns them and the writable bytes inside RAM of the tables.
fn any_shape(
    ram: &GuestRam,
    scratch: Scratch,
    bytes: &mut Bytes<'_>,
) -> Result<(Vec<RawDesc>, u64)> {
    let n = 1 + bytes.u8() as usize % MAX_HOSTILE_DESCS;
    let mut descs = Vec::with_capacity(n);
    let mut indirect_writable = 0u64;
    for i in 0..n {
        let (addr, len, _) = address(scratch, ram, bytes);
        let f = bytes.u8();
        let mut flags = 0;
        if f & 1 != 0 || (i + 1 == n && f & 2 != 0) {
            flags |= DESC_F_WRITE;
        }
        let link = match (bytes.u8() % 16, i + 1 == n) {
            (0, _) => Link::To(bytes.u8() as usize % n),
            (1, _) => Link::Raw(bytes.u16()),
            (_, true) => Link::End,
            (_, false) => Link::To(i + 1),
        };
        if f & 0xf0 == 0xf0 {
            let (table, table_len, writable) = indirect_table(ram, scratch, bytes)?;
            indirect_writable += writable;
            descs.push(RawDesc {
                addr: table,
                len: table_len,
                flags: flags | DESC_F_INDIRECT,
                link,
            });
        } else {
            descs.push(RawDesc {
                addr,
                len,
                flags,
                link,
            });
        }
    }
    Ok((descs, indirect_writable))
}

/// Builds, submits and waits for one hostile chain. Returns it with its completion.
pub fn submit(
    vm: &mut Vm,
    scratch: Scratch,
    bytes: &mut Bytes<'_>,
    token: u64,
) -> Result<(HostileChain, Completion)> {
    let chain = build(vm.ram(), scratch, bytes)?;
    let head = vm.submit_raw(&chain.descs, token)?;
    let done = vm.wait_for(head)?;
    Ok((chain, done))
}

/// Writes a header with the right magic and version and a random operation; returns the
/// opcode. Sessions and ids are small numbers in this device, so they often are here.
fn plausible_header(h: &mut [u8], bytes: &mut Bytes<'_>) -> u16 {
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let op = u16::from(bytes.u8() % 17);
    h[6..8].copy_from_slice(&op.to_le_bytes());
    let flags = if bytes.u8() == 0xff { bytes.u32() } else { 0 };
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    if bytes.u8() & 1 == 0 {
        h[16..24].copy_from_slice(&u64::from(bytes.u8() % 8).to_le_bytes());
    }
    // Small argument values are the interesting ones: lengths that fit the chain, ids.
    for i in 0..6 {
        let v = match bytes.u8() % 4 {
            0 => 0,
            1 => u64::from(bytes.u8()),
            2 => u64::from(bytes.u16()),
            _ => bytes.u64(),
        };
        h[32 + 8 * i..40 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    op
}

/// An address and length: inside scratch, across its (= RAM's) end, or outside RAM.
fn address(scratch: Scratch, ram: &GuestRam, bytes: &mut Bytes<'_>) -> (u64, u32, bool) {
    let kind = bytes.u8();
    let len = match bytes.u8() % 8 {
        0 => 0,
        1 => 32,
        2 => REQUEST_HEADER_SIZE as u32,
        3 => u32::from(bytes.u8()),
        4 => u32::from(bytes.u16()),
        5 => u32::MAX,
        _ => u32::from(bytes.u16()) % 2048,
    };
    let within = |off: u64| scratch.addr + off % scratch.len;
    match kind % 10 {
        // Past the end of RAM, below its base, at the top of the address space.
        0 => (ram.end() + u64::from(bytes.u16()), len, false),
        1 => (
            ram.base().saturating_sub(1 + u64::from(bytes.u16())),
            len,
            false,
        ),
        2 => (u64::MAX - u64::from(bytes.u8()), len, false),
        // Straddling the end of RAM.
        3 => {
            let addr = ram.end() - 1 - u64::from(bytes.u8()) % 64;
            let len = len.max(65);
            (addr, len, false)
        }
        _ => {
            let addr = within(u64::from(bytes.u16()));
            let inside = addr
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= ram.end());
            (addr, len, inside)
        }
    }
}

/// Writes an indirect table into scratch; returns its address, its length as the
/// descriptor states it, and the writable bytes inside RAM it lists.
fn indirect_table(
    ram: &GuestRam,
    scratch: Scratch,
    bytes: &mut Bytes<'_>,
) -> Result<(u64, u32, u64)> {
    let n = 1 + bytes.u8() as usize % MAX_HOSTILE_DESCS;
    let table = scratch.addr + (scratch.len / 2).min(2048) / 16 * 16;
    let mut writable = 0u64;
    for i in 0..n {
        let (addr, len, inside) = address(scratch, ram, bytes);
        let f = bytes.u8();
        let mut flags = u16::from(f & 2 != 0) * DESC_F_WRITE;
        let next = if i + 1 < n {
            flags |= DESC_F_NEXT;
            if f & 0x80 != 0 {
                bytes.u16()
            } else {
                i as u16 + 1
            }
        } else {
            0
        };
        if f & 0x40 != 0 {
            flags |= DESC_F_INDIRECT;
        }
        if flags & DESC_F_WRITE != 0 && inside {
            writable += u64::from(len);
        }
        write_desc(ram, table + 16 * i as u64, addr, len, flags, next)?;
    }
    let len = match bytes.u8() % 8 {
        0 => bytes.u32(),
        1 => 16 * n as u32 + 8,
        _ => 16 * n as u32,
    };
    Ok((table, len, writable))
}
