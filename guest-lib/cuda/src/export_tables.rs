// SPDX-License-Identifier: Apache-2.0
//! `cuGetExportTable`: the private tables NVIDIA's CUDA runtime (`libcudart`) asks the
//! driver for by UUID, before and besides the documented driver API.
//!
//! They are undocumented NVIDIA interfaces. What is known of them comes from public
//! reverse engineering, ZLUDA's first of all (it calls them the "dark API"); the layouts
//! and behaviour here follow what that work describes, written anew for this library.
//! `README.md` beside this crate lists each table, each entry and what is still unknown.
//!
//! A table is an array of pointer-sized words handed out by address: most start with
//! their own size in bytes, the rest are the entries' addresses. Every entry here runs
//! inside [`crate::guard`] (no unwinding into the runtime) and logs at debug level what
//! it was called with. An entry whose purpose nobody has worked out answers
//! `CUDA_ERROR_NOT_SUPPORTED` and says so at warn level, rather than a guess.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;

use log::{debug, warn};

use crate::api::{handle, id, invalid, out, out_opt};
use crate::image;
use crate::state::{driver, lock};
use crate::types::*;
use crate::{guard, Fail, Res};

/// One word of a table: its size in bytes, or an entry's address (NULL: none).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Word(*const c_void);

/// A table as the runtime reads it.
#[repr(transparent)]
struct Table<const N: usize>([Word; N]);

// SAFETY: a table is never written after it is made; its words are sizes and the
// addresses of functions, which every thread may read.
unsafe impl<const N: usize> Sync for Table<N> {}

impl<const N: usize> Table<N> {
    /// The first word of a table that states its size.
    const SIZE: Word = Word((N * std::mem::size_of::<usize>()) as *const c_void);

    fn start(&'static self) -> *const c_void {
        self.0.as_ptr().cast()
    }

    /// Entry `i` (as the runtime finds it).
    #[cfg(test)]
    fn entry(&self, i: usize) -> *const c_void {
        self.0[i].0
    }
}

/// A 16-byte `CUuuid`, in memory order.
pub type Uuid = [u8; 16];

/// The tables, by index (the unknown entries name theirs by it).
const CUDART_INTERFACE: usize = 0;
const TOOLS_TLS: usize = 1;
const TOOLS_RUNTIME_CALLBACK_HOOKS: usize = 2;
const CONTEXT_LOCAL_STORAGE: usize = 3;
const CONTEXT_CHECKS: usize = 4;
const INTEGRITY_CHECK: usize = 5;

const TABLE_NAMES: [&str; 6] = [
    "CUDART_INTERFACE",
    "TOOLS_TLS",
    "TOOLS_RUNTIME_CALLBACK_HOOKS",
    "CONTEXT_LOCAL_STORAGE_INTERFACE_V0301",
    "CONTEXT_CHECKS",
    "INTEGRITY_CHECK",
];

/// What `cuGetExportTable` answers for a UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The table at this address, of this many words (the first one its byte size when
    /// `sized`).
    Table {
        name: &'static str,
        address: usize,
        words: usize,
        sized: bool,
    },
    /// A table the runtime is known to ask for that this library declines on purpose,
    /// with the result it gets instead.
    Declined {
        name: &'static str,
        result: CUresult,
        why: &'static str,
    },
    /// A table known by name that this library does not offer:
    /// `CUDA_ERROR_NOT_SUPPORTED`.
    NotOffered { name: &'static str },
    /// Nothing known: `CUDA_ERROR_NOT_SUPPORTED`.
    Unknown,
}

/// The UUIDs known, in `CUuuid` byte order.
pub const CUDART_INTERFACE_UUID: Uuid = uuid(0x6bd5fb6c_5bf4_e74a_8987_d93912fd9df9);
pub const TOOLS_TLS_UUID: Uuid = uuid(0x42d85a81_23f6_cb47_8298_f6e78a3aecdc);
pub const TOOLS_RUNTIME_CALLBACK_HOOKS_UUID: Uuid = uuid(0xa094798c_2e74_2e74_93f2_0800200c0a66);
pub const CONTEXT_LOCAL_STORAGE_UUID: Uuid = uuid(0xc693336e_1121_df11_a8c3_68f355d89593);
pub const CONTEXT_CHECKS_UUID: Uuid = uuid(0x263e8860_7cd2_6143_92f6_bbd5006dfa7e);
pub const INTEGRITY_CHECK_UUID: Uuid = uuid(0xd4082055_bde6_704b_8d34_ba123c66e1f2);
/// The first table CUDA 13's runtime asks for (after `cuInit` and `cuDriverGetVersion`).
pub const CUDA13_FIRST_UUID: Uuid = uuid(0xf8cff951_2146_8b4e_b9e2_fb469e7c0dd9);
/// Known by name from public reverse engineering; not offered here.
const NOT_OFFERED: &[(Uuid, &str)] = &[
    (
        uuid(0x0ca50b8c_1004_929a_89a7_d0df10e77286),
        "CTX_CREATE_BYPASS",
    ),
    (uuid(0x195bcbf4_d67d_024a_acc5_1d29cea631ae), "HEAP_ACCESS"),
    (
        uuid(0xb10541e1_f7c7_c74a_9f64_f223be99f1e2),
        "DEVICE_EXTENDED_RT",
    ),
    (
        uuid(0x21318c60_9714_3248_8ca6_41ff7324c8f2),
        "a table of NVIDIA's math libraries (context identity)",
    ),
    (
        uuid(0xdd9e98a4_f410_4844_99b0_e2aeb7b432b5),
        "HYBRID_CUDART (Windows)",
    ),
];

/// A UUID written as its 16 bytes in order, as a number.
const fn uuid(n: u128) -> Uuid {
    n.to_be_bytes()
}

/// The UUID's bytes as hex, as the log and `README.md` write them.
pub fn hex(u: &Uuid) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

fn table(name: usize, address: *const c_void, words: usize, sized: bool) -> Answer {
    Answer::Table {
        name: TABLE_NAMES[name],
        address: address as usize,
        words,
        sized,
    }
}

/// What `cuGetExportTable` answers for `u`.
pub fn lookup(u: &Uuid) -> Answer {
    match *u {
        CUDART_INTERFACE_UUID => table(CUDART_INTERFACE, CUDART.start(), 13, true),
        TOOLS_TLS_UUID => table(TOOLS_TLS, TLS.start(), 4, true),
        TOOLS_RUNTIME_CALLBACK_HOOKS_UUID => {
            table(TOOLS_RUNTIME_CALLBACK_HOOKS, HOOKS.start(), 7, true)
        }
        CONTEXT_LOCAL_STORAGE_UUID => table(CONTEXT_LOCAL_STORAGE, STORAGE.start(), 4, false),
        CONTEXT_CHECKS_UUID => table(CONTEXT_CHECKS, CHECKS.start(), 4, true),
        INTEGRITY_CHECK_UUID => table(INTEGRITY_CHECK, INTEGRITY.start(), 3, true),
        CUDA13_FIRST_UUID => Answer::Declined {
            name: "CUDA 13 runtime interface",
            result: CUDA_ERROR_NOT_FOUND,
            why: "its layout is only partly known and a runtime that gets it takes another \
                  path; without it the runtime uses the tables below",
        },
        _ => match NOT_OFFERED.iter().find(|(k, _)| k == u) {
            Some(&(_, name)) => Answer::NotOffered { name },
            None => Answer::Unknown,
        },
    }
}

/// `cuGetExportTable(table, uuid)`.
///
/// # Safety
/// `table` must be NULL or writable; `u` NULL or a `CUuuid`.
pub unsafe fn get(table: *mut *const c_void, u: *const Uuid) -> Res<()> {
    // SAFETY: NULL or a CUuuid, by the caller's promise.
    let Some(u) = (unsafe { u.as_ref() }) else {
        warn!("cuGetExportTable without a UUID");
        return Err(invalid());
    };
    if table.is_null() {
        return Err(invalid());
    }
    let (address, result) = match lookup(u) {
        Answer::Table {
            name,
            address,
            words,
            sized,
        } => {
            let size = if sized {
                "its byte size first"
            } else {
                "no size"
            };
            debug!(
                "cuGetExportTable {}: {name} at {address:#x} ({words} words, {size})",
                hex(u)
            );
            (address, Ok(()))
        }
        Answer::Declined { name, result, why } => {
            debug!(
                "cuGetExportTable {}: {name}, declined ({}): {why}",
                hex(u),
                crate::errors::name(result).unwrap_or("?")
            );
            (0, Err(Fail(result)))
        }
        Answer::NotOffered { name } => {
            warn!("cuGetExportTable {}: {name} is not offered", hex(u));
            (0, Err(Fail(CUDA_ERROR_NOT_SUPPORTED)))
        }
        Answer::Unknown => {
            warn!("cuGetExportTable {}: not supported", hex(u));
            (0, Err(Fail(CUDA_ERROR_NOT_SUPPORTED)))
        }
    };
    // SAFETY: checked non-NULL; writable by the caller's promise.
    unsafe { out(table, address as *const c_void) }?;
    result
}

// ---- entries whose purpose is unknown ----

/// Entry `S` of table `T`: nobody has worked out what it does. It answers
/// `CUDA_ERROR_NOT_SUPPORTED` without reading any argument (a function that returns
/// nothing ignores that), logged at warn level the first time.
extern "C" fn unknown_entry<const T: usize, const S: usize>() -> CUresult {
    static SEEN: Mutex<Option<HashSet<(usize, usize)>>> = Mutex::new(None);
    guard("export table entry", || {
        let first = lock(&SEEN).get_or_insert_with(HashSet::new).insert((T, S));
        let name = TABLE_NAMES[T];
        if first {
            warn!("{name}[{S}] called: what this entry does is unknown; CUDA_ERROR_NOT_SUPPORTED");
        } else {
            debug!("{name}[{S}] called again: CUDA_ERROR_NOT_SUPPORTED");
        }
        Err(Fail(CUDA_ERROR_NOT_SUPPORTED))
    })
}

const fn unknown<const T: usize, const S: usize>() -> Word {
    Word(unknown_entry::<T, S> as *const c_void)
}

// ---- CUDART_INTERFACE ----

static CUDART: Table<13> = Table([
    Table::<13>::SIZE,
    Word(get_module_from_cubin as *const c_void),
    Word(get_primary_context as *const c_void),
    unknown::<CUDART_INTERFACE, 3>(),
    unknown::<CUDART_INTERFACE, 4>(),
    unknown::<CUDART_INTERFACE, 5>(),
    Word(get_module_from_cubin_ext1 as *const c_void),
    Word(cudart_fn7 as *const c_void),
    Word(get_module_from_cubin_ext2 as *const c_void),
    unknown::<CUDART_INTERFACE, 9>(),
    unknown::<CUDART_INTERFACE, 10>(),
    unknown::<CUDART_INTERFACE, 11>(),
    Word(load_compilers as *const c_void),
]);

const WRAPPER_MAGIC: u32 = 0x4662_43b1;
const FATBIN_MAGIC: u32 = 0xba55_ed50;
const ELF_MAGIC: u32 = u32::from_le_bytes(*b"\x7fELF");

/// What an image pointer given to an entry holds, for the log.
///
/// # Safety
/// `p` must point to at least 4 readable bytes.
unsafe fn describe(p: *const u8) -> (u32, String) {
    // SAFETY: 4 readable bytes by the caller's promise.
    let magic = unsafe { p.cast::<u32>().read_unaligned() };
    let what = match magic {
        WRAPPER_MAGIC => {
            // SAFETY: cudart's `__fatBinC_Wrapper_t`: magic, version (u32 each), then
            // the fatbin's address.
            let (version, data) = unsafe {
                (
                    p.add(4).cast::<u32>().read_unaligned(),
                    p.add(8).cast::<*const u8>().read_unaligned(),
                )
            };
            format!("fatbin wrapper version {version}, fatbin at {data:?}")
        }
        FATBIN_MAGIC => {
            // SAFETY: a fatbin's 16-byte header: u64 size of what follows at 8.
            let size = unsafe { p.add(8).cast::<u64>().read_unaligned() };
            format!("fatbin of {size} bytes after its header")
        }
        ELF_MAGIC => "cubin (ELF)".to_owned(),
        m => format!("unrecognised image (first word {m:#010x})"),
    };
    (magic, what)
}

/// Loads the module `image` holds into the current context (what every
/// `get_module_from_cubin*` entry does).
///
/// # Safety
/// `image` must be NULL or a fatbin wrapper, fatbin or cubin; `module` NULL or writable.
unsafe fn load_module(name: &str, module: *mut CUmodule, image: *const c_void) -> Res<()> {
    if module.is_null() || image.is_null() {
        return Err(invalid());
    }
    // SAFETY: every kind of image accepted starts with at least 4 bytes.
    let (magic, what) = unsafe { describe(image.cast()) };
    debug!("{name}: {what}");
    if ![WRAPPER_MAGIC, FATBIN_MAGIC, ELF_MAGIC].contains(&magic) {
        warn!("{name}: {what}, not a fatbin: CUDA_ERROR_INVALID_IMAGE");
        return Err(Fail(CUDA_ERROR_INVALID_IMAGE));
    }
    // SAFETY: a wrapper, fatbin or cubin (checked), as the runtime hands them.
    let source = unsafe { image::from_pointer(image.cast()) }?;
    match &source {
        image::Source::Image(bytes) => debug!("{name}: {} bytes go to the device", bytes.len()),
        other => debug!("{name}: {other:?}"),
    }
    let d = driver()?;
    let ctx = d.current()?;
    let m = d.load_module(&ctx, &source)?;
    debug!("{name}: module {:#x} in context {:#x}", m.id, ctx.id);
    // SAFETY: checked non-NULL; writable by the runtime's contract.
    unsafe { out(module, handle(m.id)) }
}

/// `CUresult get_module_from_cubin(CUmodule *module, const __fatBinC_Wrapper_t *fatbin)`:
/// `__cudaRegisterFatBinary`'s module, loaded into the current context.
unsafe extern "C" fn get_module_from_cubin(
    module: *mut CUmodule,
    wrapper: *const c_void,
) -> CUresult {
    debug!(
        "CUDART_INTERFACE[1] get_module_from_cubin(module={module:?}, fatbin_wrapper={wrapper:?})"
    );
    // SAFETY: the runtime's contract for this entry.
    guard("CUDART_INTERFACE[1] get_module_from_cubin", || unsafe {
        load_module("CUDART_INTERFACE[1]", module, wrapper)
    })
}

/// `CUresult get_primary_context(CUcontext *ctx, CUdevice dev)`: the device's primary
/// context, made if it is not active yet. NVIDIA's runtime makes the handle it gets
/// here current (`cuCtxSetCurrent`) without retaining it through the public API, so the
/// context must exist once this answers: an inactive one is retained here, once, for the
/// runtime (it lives until the process ends or a reset).
unsafe extern "C" fn get_primary_context(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    debug!("CUDART_INTERFACE[2] get_primary_context(ctx={pctx:?}, dev={dev})");
    guard("CUDART_INTERFACE[2] get_primary_context", || {
        let d = driver()?;
        let slot = d.device(dev)?;
        let active = d.contexts.get(slot.primary_id).is_some();
        if !active {
            d.retain_primary(slot)?;
        }
        debug!(
            "CUDART_INTERFACE[2]: device {dev}'s primary context is {:#x} (was active: {active})",
            slot.primary_id
        );
        // SAFETY: NULL or writable by the runtime's contract.
        unsafe { out(pctx, handle(slot.primary_id)) }
    })
}

/// The two entries below take three more arguments that nobody has worked out (they
/// have to do with `__cudaRegisterHostVar`, the last is a count of something in the
/// other two); only their empty form is understood.
fn check_extra(name: &str, arg3: *mut c_void, arg4: *mut c_void, arg5: c_uint) -> Res<()> {
    if arg3.is_null() && arg4.is_null() && arg5 == 0 {
        return Ok(());
    }
    warn!(
        "{name}: arguments {arg3:?}, {arg4:?}, {arg5} are not understood: CUDA_ERROR_NOT_SUPPORTED"
    );
    Err(Fail(CUDA_ERROR_NOT_SUPPORTED))
}

/// `CUresult get_module_from_cubin_ext1(CUmodule *module, const __fatBinC_Wrapper_t
/// *fatbin, void *arg3, void *arg4, unsigned arg5)`.
unsafe extern "C" fn get_module_from_cubin_ext1(
    module: *mut CUmodule,
    wrapper: *const c_void,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    debug!(
        "CUDART_INTERFACE[6] get_module_from_cubin_ext1(module={module:?}, \
         fatbin_wrapper={wrapper:?}, {arg3:?}, {arg4:?}, {arg5})"
    );
    guard("CUDART_INTERFACE[6] get_module_from_cubin_ext1", || {
        check_extra("CUDART_INTERFACE[6]", arg3, arg4, arg5)?;
        // SAFETY: the runtime's contract for this entry.
        unsafe { load_module("CUDART_INTERFACE[6]", module, wrapper) }
    })
}

/// `fn7(size_t)`: what it is for is unknown; every implementation known does nothing,
/// and the runtime works with that. Described as returning nothing, and by older work
/// as returning a `CUresult`: it answers `CUDA_SUCCESS` (0), right for either.
extern "C" fn cudart_fn7(arg: usize) -> CUresult {
    static SEEN: Mutex<bool> = Mutex::new(false);
    let _ = guard("CUDART_INTERFACE[7]", || {
        let first = !std::mem::replace(&mut *lock(&SEEN), true);
        if first {
            warn!("CUDART_INTERFACE[7]({arg:#x}): what this entry does is unknown; nothing done");
        } else {
            debug!("CUDART_INTERFACE[7]({arg:#x}): nothing done");
        }
        Ok(())
    });
    CUDA_SUCCESS
}

/// `CUresult get_module_from_cubin_ext2(const fatBinaryHeader *fatbin, CUmodule *module,
/// void *arg3, void *arg4, unsigned arg5)`: the fatbin itself, not its wrapper.
unsafe extern "C" fn get_module_from_cubin_ext2(
    fatbin: *const c_void,
    module: *mut CUmodule,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    debug!(
        "CUDART_INTERFACE[8] get_module_from_cubin_ext2(fatbin={fatbin:?}, module={module:?}, \
         {arg3:?}, {arg4:?}, {arg5})"
    );
    guard("CUDART_INTERFACE[8] get_module_from_cubin_ext2", || {
        check_extra("CUDART_INTERFACE[8]", arg3, arg4, arg5)?;
        // SAFETY: the runtime's contract for this entry.
        unsafe { load_module("CUDART_INTERFACE[8]", module, fatbin) }
    })
}

/// `CUresult load_compilers(void)`: NVIDIA's driver loads its PTX compiler and NVVM;
/// here the host compiles, so there is nothing to load.
extern "C" fn load_compilers() -> CUresult {
    debug!("CUDART_INTERFACE[12] load_compilers()");
    guard("CUDART_INTERFACE[12] load_compilers", || Ok(()))
}

// ---- TOOLS_TLS ----

/// Its size only is known; no runtime has been seen to call its entries.
static TLS: Table<4> = Table([
    Table::<4>::SIZE,
    unknown::<TOOLS_TLS, 1>(),
    unknown::<TOOLS_TLS, 2>(),
    unknown::<TOOLS_TLS, 3>(),
]);

// ---- TOOLS_RUNTIME_CALLBACK_HOOKS ----

static HOOKS: Table<7> = Table([
    Table::<7>::SIZE,
    Word(tools_hook1 as *const c_void),
    Word(tools_buffer1 as *const c_void),
    unknown::<TOOLS_RUNTIME_CALLBACK_HOOKS, 3>(),
    Word(tools_hook4 as *const c_void),
    unknown::<TOOLS_RUNTIME_CALLBACK_HOOKS, 5>(),
    Word(tools_buffer2 as *const c_void),
]);

/// Zeroed memory the runtime is given for its tools callbacks' state: nothing is
/// subscribed. Sized in 8-byte words, so it is large enough whether the size answered
/// counts bytes, 4-byte or 8-byte words.
#[repr(C, align(16))]
struct ToolsBuffer<const N: usize>(UnsafeCell<[u64; N]>);

// SAFETY: the library never touches the memory after making it; it is the runtime's,
// which synchronises its own use.
unsafe impl<const N: usize> Sync for ToolsBuffer<N> {}

static TOOLS_BUFFER1: ToolsBuffer<1024> = ToolsBuffer(UnsafeCell::new([0; 1024]));
static TOOLS_BUFFER2: ToolsBuffer<14> = ToolsBuffer(UnsafeCell::new([0; 14]));

/// # Safety
/// `ptr` and `size` NULL or writable.
unsafe fn give_buffer<const N: usize>(
    name: &'static str,
    b: &'static ToolsBuffer<N>,
    ptr: *mut *mut c_void,
    size: *mut usize,
) {
    debug!(
        "{name}(ptr={ptr:?}, size={size:?}): {N} zeroed words at {:?}",
        b.0.get()
    );
    let _ = guard(name, || {
        // SAFETY: each NULL or writable, by the runtime's contract.
        unsafe {
            out_opt(ptr, b.0.get().cast());
            out_opt(size, N);
        }
        Ok(())
    });
}

/// `void get_buffer1(void **ptr, size_t *size)`: memory for the tools callbacks.
unsafe extern "C" fn tools_buffer1(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the runtime's contract.
    unsafe { give_buffer("TOOLS_RUNTIME_CALLBACK_HOOKS[2]", &TOOLS_BUFFER1, ptr, size) }
}

/// `void get_buffer2(void **ptr, size_t *size)`: the same, smaller.
unsafe extern "C" fn tools_buffer2(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the runtime's contract.
    unsafe { give_buffer("TOOLS_RUNTIME_CALLBACK_HOOKS[6]", &TOOLS_BUFFER2, ptr, size) }
}

/// `void hook1(unsigned event, void *data)`: a tools callback; no tool is attached, so
/// nothing is done. It answers 0 in case a caller reads a result.
extern "C" fn tools_hook1(event: c_uint, data: *mut c_void) -> usize {
    let _ = guard("TOOLS_RUNTIME_CALLBACK_HOOKS[1]", || {
        debug!("TOOLS_RUNTIME_CALLBACK_HOOKS[1]({event}, {data:?}): no tool attached");
        Ok(())
    });
    0
}

/// `void hook4(void *a, void *b)`: as [`tools_hook1`].
extern "C" fn tools_hook4(a: *mut c_void, b: *mut c_void) -> usize {
    let _ = guard("TOOLS_RUNTIME_CALLBACK_HOOKS[4]", || {
        debug!("TOOLS_RUNTIME_CALLBACK_HOOKS[4]({a:?}, {b:?}): no tool attached");
        Ok(())
    });
    0
}

// ---- CONTEXT_LOCAL_STORAGE_INTERFACE_V0301 ----

/// No size word: the runtime finds the entries from the start.
static STORAGE: Table<4> = Table([
    Word(storage_put as *const c_void),
    Word(storage_delete as *const c_void),
    Word(storage_get as *const c_void),
    unknown::<CONTEXT_LOCAL_STORAGE, 3>(),
]);

/// The first word of the context-local storage table.
#[cfg(test)]
pub(crate) fn storage_put_address() -> usize {
    storage_put as *const c_void as usize
}

/// `void destructor(CUcontext ctx, void *key, void *value)`, called when the context goes.
type StorageDestructor = Option<unsafe extern "C" fn(CUcontext, *mut c_void, *mut c_void)>;

struct Stored {
    value: usize,
    destructor: StorageDestructor,
}

/// (context, key) -> value: what the runtime keeps per context (its per-context state,
/// under its own key).
static STORED: Mutex<BTreeMap<(u64, usize), Stored>> = Mutex::new(BTreeMap::new());

/// The context a storage entry names: NULL is the current one. A device's primary
/// context counts even while inactive: its handle is the one the runtime got from
/// CUDART_INTERFACE[2], and the same once retained.
fn storage_context(ctx: CUcontext) -> Res<u64> {
    let d = driver()?;
    if ctx.is_null() {
        return Ok(d.current()?.id);
    }
    let i = id(ctx);
    if d.contexts.get(i).is_some() || d.devices.iter().any(|s| s.primary_id == i) {
        return Ok(i);
    }
    Err(Fail(CUDA_ERROR_INVALID_CONTEXT))
}

/// `CUresult put(CUcontext ctx, void *key, void *value, destructor)`.
unsafe extern "C" fn storage_put(
    ctx: CUcontext,
    key: *mut c_void,
    value: *mut c_void,
    destructor: StorageDestructor,
) -> CUresult {
    debug!(
        "CONTEXT_LOCAL_STORAGE[0] put(ctx={ctx:?}, key={key:?}, value={value:?}, \
         destructor={:?})",
        destructor.map(|f| f as *const c_void)
    );
    guard("CONTEXT_LOCAL_STORAGE[0] put", || {
        let c = storage_context(ctx)?;
        let old = lock(&STORED).insert(
            (c, key as usize),
            Stored {
                value: value as usize,
                destructor,
            },
        );
        if let Some(old) = old {
            debug!(
                "CONTEXT_LOCAL_STORAGE[0]: context {c:#x} key {key:?} replaced {:#x}",
                old.value
            );
        }
        Ok(())
    })
}

/// `CUresult delete(CUcontext ctx, void *key)`: forgets the value (its destructor is
/// not called: the runtime frees what it deletes); an absent key is no error.
unsafe extern "C" fn storage_delete(ctx: CUcontext, key: *mut c_void) -> CUresult {
    debug!("CONTEXT_LOCAL_STORAGE[1] delete(ctx={ctx:?}, key={key:?})");
    guard("CONTEXT_LOCAL_STORAGE[1] delete", || {
        let c = storage_context(ctx)?;
        if lock(&STORED).remove(&(c, key as usize)).is_none() {
            debug!("CONTEXT_LOCAL_STORAGE[1]: context {c:#x} has no key {key:?}");
        }
        Ok(())
    })
}

/// `CUresult get(void **value, CUcontext ctx, void *key)`: an absent key is
/// `CUDA_ERROR_INVALID_HANDLE` (the runtime then makes its state for the context).
unsafe extern "C" fn storage_get(
    value: *mut *mut c_void,
    ctx: CUcontext,
    key: *mut c_void,
) -> CUresult {
    debug!("CONTEXT_LOCAL_STORAGE[2] get(value={value:?}, ctx={ctx:?}, key={key:?})");
    guard("CONTEXT_LOCAL_STORAGE[2] get", || {
        if value.is_null() {
            return Err(invalid());
        }
        let c = storage_context(ctx)?;
        let found = lock(&STORED).get(&(c, key as usize)).map(|s| s.value);
        let Some(v) = found else {
            debug!("CONTEXT_LOCAL_STORAGE[2]: context {c:#x} has no key {key:?}");
            return Err(Fail(CUDA_ERROR_INVALID_HANDLE));
        };
        // SAFETY: checked non-NULL; writable by the runtime's contract.
        unsafe { out(value, v as *mut c_void) }
    })
}

/// Destructors of a destroyed context's values, to run once the call that destroyed
/// it has let go of the library's locks.
type Pending = Vec<(
    unsafe extern "C" fn(CUcontext, *mut c_void, *mut c_void),
    u64,
    usize,
    usize,
)>;

thread_local! {
    static PENDING: RefCell<Pending> = const { RefCell::new(Vec::new()) };
    /// How many exports this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A context is gone (destroyed, or a primary context released for the last time or
/// reset): its values are forgotten and their destructors run when the outermost
/// export of this thread returns.
pub(crate) fn context_destroyed(ctx: u64) {
    let gone: Vec<((u64, usize), Stored)> = {
        let mut stored = lock(&STORED);
        let keys: Vec<(u64, usize)> = stored
            .range((ctx, 0)..=(ctx, usize::MAX))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| stored.remove(&k).map(|s| (k, s)))
            .collect()
    };
    for ((_, key), s) in gone {
        debug!(
            "context {ctx:#x} destroyed: its stored value {:#x} (key {key:#x}) goes",
            s.value
        );
        if let Some(f) = s.destructor {
            let _ = PENDING.try_with(|p| p.borrow_mut().push((f, ctx, key, s.value)));
        }
    }
}

/// Runs `f` as an export's body; once the thread's outermost export is done, runs the
/// destructors of the values of contexts it destroyed (no lock of the library is held
/// then, so they may call the driver).
pub(crate) fn export_body<R>(f: impl FnOnce() -> R) -> R {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let _ = DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    let _ = DEPTH.try_with(|d| d.set(d.get() + 1));
    let r = {
        let _leave = Leave;
        f()
    };
    if DEPTH.try_with(Cell::get) == Ok(0) {
        run_destructors();
    }
    r
}

fn run_destructors() {
    loop {
        let Ok(batch) = PENDING.try_with(|p| std::mem::take(&mut *p.borrow_mut())) else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        for (f, ctx, key, value) in batch {
            debug!(
                "context {ctx:#x}: the runtime's destructor {f:?}(key {key:#x}, value {value:#x})"
            );
            // SAFETY: the destructor the runtime gave with the value, called as it
            // expects: the context, the key and the value.
            unsafe { f(handle(ctx), key as *mut c_void, value as *mut c_void) };
        }
    }
}

// ---- CONTEXT_CHECKS ----

static CHECKS: Table<4> = Table([
    Table::<4>::SIZE,
    unknown::<CONTEXT_CHECKS, 1>(),
    Word(context_check as *const c_void),
    Word(check_flags as *const c_void),
]);

/// `CUresult context_check(CUcontext ctx, unsigned *result, const void **detail)`:
/// checks bits of the context that are never seen set; `*result` is 0 (nothing to
/// report), `detail` is left alone.
unsafe extern "C" fn context_check(
    ctx: CUcontext,
    result: *mut u32,
    detail: *mut *const c_void,
) -> CUresult {
    debug!("CONTEXT_CHECKS[2](ctx={ctx:?}, result={result:?}, detail={detail:?}): 0");
    guard("CONTEXT_CHECKS[2]", || {
        // SAFETY: NULL or writable, by the runtime's contract.
        unsafe { out_opt(result, 0) };
        Ok(())
    })
}

/// `unsigned check_flags(void)`: 0, as NVIDIA's driver is seen to answer.
extern "C" fn check_flags() -> u32 {
    let _ = guard("CONTEXT_CHECKS[3]", || {
        debug!("CONTEXT_CHECKS[3](): 0");
        Ok(())
    });
    0
}

// ---- INTEGRITY_CHECK ----

static INTEGRITY: Table<3> = Table([
    Table::<3>::SIZE,
    Word(integrity_check as *const c_void),
    unknown::<INTEGRITY_CHECK, 2>(),
]);

/// `CUresult integrity_check(unsigned version, uint64_t unix_seconds, uint64_t
/// result[2])`: the runtime checks the driver it talks to by asking it for a keyed hash
/// of what both sides know, and computing the same. See [`integrity`].
unsafe extern "C" fn integrity_check(
    version: c_uint,
    unix_seconds: u64,
    result: *mut [u64; 2],
) -> CUresult {
    debug!("INTEGRITY_CHECK[1](version={version}, unix_seconds={unix_seconds}, result={result:?})");
    guard("INTEGRITY_CHECK[1]", || {
        if result.is_null() {
            return Err(invalid());
        }
        let d = driver()?;
        let mut devices = Vec::with_capacity(d.devices.len());
        for slot in &d.devices {
            let a = d.attributes(slot)?;
            // CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID (50), _BUS_ID (33), _DEVICE_ID (34).
            devices.push(integrity::Device {
                uuid: crate::api::device::uuid(slot.ordinal, &slot.config.name),
                pci_domain: a[49],
                pci_bus: a[32],
                pci_device: a[33],
            });
        }
        let inputs = integrity::Inputs {
            driver_version: DRIVER_VERSION as u32,
            version,
            process: std::process::id(),
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() } as u32,
            cudart_table: CUDART.start() as usize,
            integrity_table: INTEGRITY.start() as usize,
            function: INTEGRITY.0[1].0 as usize,
            unix_seconds,
        };
        let hash = integrity::answer(&inputs, &devices);
        debug!(
            "INTEGRITY_CHECK[1]: driver {}, process {}, thread {:#x}, {} device(s): \
             [{:#018x}, {:#018x}]",
            inputs.driver_version,
            inputs.process,
            inputs.thread,
            devices.len(),
            hash[0],
            hash[1]
        );
        // SAFETY: checked non-NULL; 16 writable bytes by the runtime's contract.
        unsafe { out(result, hash) }
    })
}

/// The runtime's integrity check: HMAC (RFC 2104) over MD2 (RFC 1319, 16-byte blocks)
/// with a fixed key, of the driver's and the runtime's versions, the calling process
/// and thread, where the CUDART_INTERFACE and INTEGRITY_CHECK tables and the check
/// itself are, the runtime's time stamp, and each device's UUID and PCI location. For
/// versions ending in 0 and 1 the answers are constants.
pub(crate) mod integrity {
    /// The HMAC key.
    const KEY: [u8; 16] = [
        0x14, 0x6a, 0xdd, 0xae, 0x53, 0xa9, 0xa7, 0x52, 0xaa, 0x08, 0x41, 0x36, 0x0b, 0xf5, 0x5a,
        0x9f,
    ];
    const ANSWER_0: [u64; 2] = [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8];
    const ANSWER_1: [u64; 2] = [0x1841_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8];

    /// What the hash covers, laid out as the runtime lays it out (48 bytes).
    pub struct Inputs {
        pub driver_version: u32,
        pub version: u32,
        pub process: u32,
        pub thread: u32,
        pub cudart_table: usize,
        pub integrity_table: usize,
        pub function: usize,
        pub unix_seconds: u64,
    }

    /// A device as the hash covers it (28 bytes).
    pub struct Device {
        pub uuid: [u8; 16],
        pub pci_domain: i32,
        pub pci_bus: i32,
        pub pci_device: i32,
    }

    pub fn answer(i: &Inputs, devices: &[Device]) -> [u64; 2] {
        match i.version % 10 {
            0 => return ANSWER_0,
            1 => return ANSWER_1,
            _ => {}
        }
        let mut msg = Vec::with_capacity(48 + 28 * devices.len());
        for w in [i.driver_version, i.version, i.process, i.thread] {
            msg.extend_from_slice(&w.to_ne_bytes());
        }
        for p in [i.cudart_table, i.integrity_table, i.function] {
            msg.extend_from_slice(&(p as u64).to_ne_bytes());
        }
        msg.extend_from_slice(&i.unix_seconds.to_ne_bytes());
        for d in devices {
            msg.extend_from_slice(&d.uuid);
            for v in [d.pci_domain, d.pci_bus, d.pci_device] {
                msg.extend_from_slice(&v.to_ne_bytes());
            }
        }
        let mac = hmac_md2(&KEY, &msg);
        let (a, b) = mac.split_at(8);
        [
            u64::from_ne_bytes(a.try_into().expect("8 bytes")),
            u64::from_ne_bytes(b.try_into().expect("8 bytes")),
        ]
    }

    /// HMAC-MD2 with a key of one block.
    pub fn hmac_md2(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
        let pad = |x: u8| key.map(|k| k ^ x);
        let mut inner = Md2::new();
        inner.update(&pad(0x36));
        inner.update(msg);
        let inner = inner.finish();
        let mut outer = Md2::new();
        outer.update(&pad(0x5c));
        outer.update(&inner);
        outer.finish()
    }

    /// RFC 1319's permutation of 0..=255 made from the digits of pi.
    const S: [u8; 256] = [
        41, 46, 67, 201, 162, 216, 124, 1, 61, 54, 84, 161, 236, 240, 6, 19, 98, 167, 5, 243, 192,
        199, 115, 140, 152, 147, 43, 217, 188, 76, 130, 202, 30, 155, 87, 60, 253, 212, 224, 22,
        103, 66, 111, 24, 138, 23, 229, 18, 190, 78, 196, 214, 218, 158, 222, 73, 160, 251, 245,
        142, 187, 47, 238, 122, 169, 104, 121, 145, 21, 178, 7, 63, 148, 194, 16, 137, 11, 34, 95,
        33, 128, 127, 93, 154, 90, 144, 50, 39, 53, 62, 204, 231, 191, 247, 151, 3, 255, 25, 48,
        179, 72, 165, 181, 209, 215, 94, 146, 42, 172, 86, 170, 198, 79, 184, 56, 210, 150, 164,
        125, 182, 118, 252, 107, 226, 156, 116, 4, 241, 69, 157, 112, 89, 100, 113, 135, 32, 134,
        91, 207, 101, 230, 45, 168, 2, 27, 96, 37, 173, 174, 176, 185, 246, 28, 70, 97, 105, 52,
        64, 126, 15, 85, 71, 163, 35, 221, 81, 175, 58, 195, 92, 249, 206, 186, 197, 234, 38, 44,
        83, 13, 110, 133, 40, 132, 9, 211, 223, 205, 244, 65, 129, 77, 82, 106, 220, 55, 200, 108,
        193, 171, 250, 36, 225, 123, 8, 12, 189, 177, 74, 120, 136, 149, 139, 227, 99, 232, 109,
        233, 203, 213, 254, 59, 0, 29, 57, 242, 239, 183, 14, 102, 88, 208, 228, 166, 119, 114,
        248, 235, 117, 75, 10, 49, 68, 80, 180, 143, 237, 31, 26, 219, 153, 141, 51, 159, 17, 131,
        20,
    ];

    /// MD2 (RFC 1319, with its erratum: the checksum byte is XORed in).
    pub struct Md2 {
        x: [u8; 48],
        checksum: [u8; 16],
        last: u8,
        block: [u8; 16],
        filled: usize,
    }

    impl Md2 {
        pub fn new() -> Md2 {
            Md2 {
                x: [0; 48],
                checksum: [0; 16],
                last: 0,
                block: [0; 16],
                filled: 0,
            }
        }

        pub fn update(&mut self, data: &[u8]) {
            for &b in data {
                self.block[self.filled] = b;
                self.filled += 1;
                if self.filled == 16 {
                    let block = self.block;
                    self.compress(&block, true);
                    self.filled = 0;
                }
            }
        }

        fn compress(&mut self, m: &[u8; 16], sum: bool) {
            if sum {
                for (c, &b) in self.checksum.iter_mut().zip(m) {
                    *c ^= S[(b ^ self.last) as usize];
                    self.last = *c;
                }
            }
            for (j, &b) in m.iter().enumerate() {
                self.x[16 + j] = b;
                self.x[32 + j] = b ^ self.x[j];
            }
            let mut t = 0u8;
            for round in 0..18u8 {
                for x in self.x.iter_mut() {
                    *x ^= S[t as usize];
                    t = *x;
                }
                t = t.wrapping_add(round);
            }
        }

        pub fn finish(mut self) -> [u8; 16] {
            let pad = (16 - self.filled) as u8;
            self.update(&vec![pad; pad as usize]);
            let checksum = self.checksum;
            self.compress(&checksum, false);
            let mut digest = [0; 16];
            digest.copy_from_slice(&self.x[..16]);
            digest
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_uuids_are_those_the_runtime_asks_for() {
        assert_eq!(hex(&CUDA13_FIRST_UUID), "f8cff95121468b4eb9e2fb469e7c0dd9");
        assert_eq!(
            hex(&CUDART_INTERFACE_UUID),
            "6bd5fb6c5bf4e74a8987d93912fd9df9"
        );
        assert_eq!(hex(&TOOLS_TLS_UUID), "42d85a8123f6cb478298f6e78a3aecdc");
        assert_eq!(
            hex(&TOOLS_RUNTIME_CALLBACK_HOOKS_UUID),
            "a094798c2e742e7493f20800200c0a66"
        );
        assert_eq!(
            hex(&CONTEXT_LOCAL_STORAGE_UUID),
            "c693336e1121df11a8c368f355d89593"
        );
        assert_eq!(
            hex(&CONTEXT_CHECKS_UUID),
            "263e88607cd2614392f6bbd5006dfa7e"
        );
        assert_eq!(
            hex(&INTEGRITY_CHECK_UUID),
            "d4082055bde6704b8d34ba123c66e1f2"
        );
    }

    #[test]
    fn each_table_states_its_size_and_has_no_empty_entry() {
        let sized: [(Uuid, usize); 5] = [
            (CUDART_INTERFACE_UUID, 13),
            (TOOLS_TLS_UUID, 4),
            (TOOLS_RUNTIME_CALLBACK_HOOKS_UUID, 7),
            (CONTEXT_CHECKS_UUID, 4),
            (INTEGRITY_CHECK_UUID, 3),
        ];
        for (u, n) in sized {
            let Answer::Table {
                address,
                words,
                sized: true,
                ..
            } = lookup(&u)
            else {
                panic!("{}: not a sized table", hex(&u));
            };
            assert_eq!(words, n);
            // SAFETY: a table of `n` words lies there.
            let table = unsafe { std::slice::from_raw_parts(address as *const usize, n) };
            assert_eq!(table[0], n * 8, "{}", hex(&u));
            assert!(table[1..].iter().all(|&w| w != 0), "{}", hex(&u));
        }
        let Answer::Table {
            words: 4,
            sized: false,
            address,
            ..
        } = lookup(&CONTEXT_LOCAL_STORAGE_UUID)
        else {
            panic!("context-local storage");
        };
        assert_eq!(address, STORAGE.start() as usize);
        assert!((0..4).all(|i| !STORAGE.entry(i).is_null()));
        assert_eq!(CUDART.entry(1), get_module_from_cubin as *const c_void);
        assert_eq!(CUDART.entry(2), get_primary_context as *const c_void);
        assert_eq!(CUDART.entry(12), load_compilers as *const c_void);
        assert_eq!(INTEGRITY.entry(1), integrity_check as *const c_void);
    }

    #[test]
    fn the_integrity_hash_is_hmac_md2_of_the_inputs_and_two_versions_are_constants() {
        let mut i = integrity::Inputs {
            driver_version: 13000,
            version: 13002,
            process: 4242,
            thread: 0xf79c_1000,
            cudart_table: 0x7f00_0000_1000,
            integrity_table: 0x7f00_0000_2000,
            function: 0x7f00_0000_3000,
            unix_seconds: 0x6a9c_79c9,
        };
        let devices = [integrity::Device {
            uuid: *b"0123456789abcdef",
            pci_domain: 0,
            pci_bus: 5,
            pci_device: 0,
        }];
        assert_eq!(
            integrity::answer(&i, &devices),
            [0x4e82_343a_9dde_7f18, 0xe2b9_09de_d5a5_4c6e]
        );
        i.version = 12090;
        assert_eq!(
            integrity::answer(&i, &devices),
            [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]
        );
        i.version = 13011;
        assert_eq!(
            integrity::answer(&i, &devices),
            [0x1841_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]
        );
        // RFC 2104's construction over a block-sized key.
        let key = [0x0b; 16];
        let mut inner = integrity::Md2::new();
        inner.update(&[0x0b ^ 0x36; 16]);
        inner.update(b"Hi There");
        let mut outer = integrity::Md2::new();
        outer.update(&[0x0b ^ 0x5c; 16]);
        outer.update(&inner.finish());
        assert_eq!(integrity::hmac_md2(&key, b"Hi There"), outer.finish());
    }

    #[test]
    fn md2_answers_rfc_1319s_test_suite() {
        let md2 = |s: &str| {
            let mut h = integrity::Md2::new();
            h.update(s.as_bytes());
            hex(&h.finish())
        };
        assert_eq!(md2(""), "8350e5a3e24c153df2275c9f80692773");
        assert_eq!(md2("a"), "32ec01ec4a6dac72c0ab96fb34c0b5d1");
        assert_eq!(md2("abc"), "da853b0d3f88d99b30283a69e6ded6bb");
        assert_eq!(md2("message digest"), "ab4f496bfb2a530b219ff33031fe06b0");
        assert_eq!(
            md2("abcdefghijklmnopqrstuvwxyz"),
            "4e8ddff3650292ab5a4108c3aa47940b"
        );
        assert_eq!(
            md2("12345678901234567890123456789012345678901234567890123456789012345678901234567890"),
            "d5976f79d83d3a0dc9806c3c66f3efd8"
        );
    }
}
