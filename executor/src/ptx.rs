// SPDX-License-Identifier: Apache-2.0
//! What PTX text declares: the size of each `.param` of every `.entry`, and the module
//! scope variables that take device memory when the module is loaded.
//!
//! A launch hands the driver one pointer per parameter and the driver reads as many bytes
//! through each as the kernel declares: a guest that passes fewer or smaller parameters
//! than the kernel takes would make it read host memory past the parameter array. CUDA
//! 12.4 drivers and later say the sizes (`cuFuncGetParamInfo`); for older drivers the
//! sizes come from the module's own PTX, and a kernel whose signature cannot be read is
//! not launched at all.

use std::collections::HashMap;

/// Every kernel entry of `ptx` by name, with its parameter sizes when they can be read;
/// `None` when an `.entry` directive itself cannot be read (the module's kernels are then
/// not known for certain).
pub fn entries(ptx: &str) -> Option<HashMap<String, Option<Vec<usize>>>> {
    let text = strip_comments(ptx);
    let mut out: HashMap<String, Option<Vec<usize>>> = HashMap::new();
    let mut rest = text.as_str();
    while let Some(at) = find_directive(rest, ".entry") {
        rest = &rest[at + ".entry".len()..];
        let (name, params, after) = parse_entry(rest)?;
        rest = after;
        match out.get_mut(name) {
            None => {
                out.insert(name.to_string(), params);
            }
            // Two declarations that disagree: trust neither.
            Some(known) if *known != params => *known = None,
            Some(_) => {}
        }
    }
    Some(out)
}

/// Parameter sizes in bytes of every kernel entry of `ptx`, by name. Entries whose
/// parameter list cannot be read are left out, so a launch of them is refused.
pub fn entry_signatures(ptx: &str) -> HashMap<String, Vec<usize>> {
    let text = strip_comments(ptx);
    let mut out = HashMap::new();
    let mut rest = text.as_str();
    while let Some(at) = find_directive(rest, ".entry") {
        rest = &rest[at + ".entry".len()..];
        let Some((name, params, after)) = parse_entry(rest) else {
            continue;
        };
        rest = after;
        match params {
            Some(sizes) => {
                out.insert(name.to_string(), sizes);
            }
            None => {
                // Two declarations of one name, one unreadable: trust neither.
                out.remove(name);
            }
        }
    }
    out
}

/// A variable a module declares in device memory: `.global` (a `__device__` variable) or
/// `.const` (a `__constant__` one), at module scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalVar {
    pub name: String,
    /// Its size from the declaration (element size x vector width x array dimensions);
    /// `None` when the PTX does not say (an array sized by its initializer, an opaque type).
    pub bytes: Option<u64>,
}

/// Every `.global` and `.const` variable `ptx` declares with storage (not `.extern`), in
/// order. Declarations inside parameter lists (`.param .u64 .ptr .global p`) and
/// instructions (`ld.global`) are not declarations and are skipped; parameterized names
/// (`v<100>`) are left out.
pub fn globals(ptx: &str) -> Vec<GlobalVar> {
    let text = strip_comments(ptx);
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut parens = 0usize;
    // Where the current statement began: after the last `;`, `{` or `}`.
    let mut statement = 0usize;
    let mut i = 0usize;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => parens += 1,
            b')' => parens = parens.saturating_sub(1),
            b';' | b'{' | b'}' if parens == 0 => statement = i + 1,
            b'.' if parens == 0 => {
                let word = &text[i..];
                let directive = [".global", ".const"].into_iter().find(|d| {
                    word.starts_with(d)
                        && (i == 0 || !is_ident(bytes[i - 1]))
                        && bytes.get(i + d.len()).map_or(true, |&b| !is_ident(b))
                });
                if let Some(d) = directive {
                    let end = text[i..].find(';').map_or(text.len(), |e| i + e);
                    let prefix = &text[statement..i];
                    if !prefix.split_whitespace().any(|w| w == ".extern") {
                        declaration(&text[i + d.len()..end], &mut out);
                    }
                    statement = end + 1;
                    i = end + 1;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The bytes of device memory `ptx`'s module-scope variables declare, where their
/// declarations say (see [`globals`]); saturates instead of overflowing.
pub fn declared_global_bytes(ptx: &str) -> u64 {
    globals(ptx)
        .iter()
        .filter_map(|g| g.bytes)
        .fold(0u64, u64::saturating_add)
}

/// The variables of one declaration after its `.global` / `.const`, up to its `;`:
/// `.align 4 .b8 big[4194304]`, `.v4 .f32 a, b[2] = {...}`.
fn declaration(decl: &str, out: &mut Vec<GlobalVar>) {
    let mut element: Option<u64> = None;
    let mut width = 1u64;
    let mut opaque = false;
    for (n, item) in split_top_level(decl).into_iter().enumerate() {
        let item = item.split('=').next().unwrap_or("").trim();
        let mut words = item.split_whitespace().peekable();
        let mut name = None;
        while let Some(word) = words.next() {
            if n == 0 && word.starts_with('.') {
                match word {
                    ".align" => {
                        words.next();
                    }
                    ".v2" => width = 2,
                    ".v4" => width = 4,
                    ".v8" => width = 8,
                    w => match type_size(w) {
                        Some(size) => element = Some(size as u64),
                        None if w.starts_with(".attribute") => {}
                        None if matches!(w, ".visible" | ".weak" | ".common") => {}
                        None => opaque = true,
                    },
                }
            } else {
                name = Some(word);
                break;
            }
        }
        let Some(name) = name else { continue };
        let base_end = name.find(['[', '<']).unwrap_or(name.len());
        if name[base_end..].starts_with('<') || base_end == 0 {
            continue;
        }
        let base = &name[..base_end];
        if !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$'))
        {
            continue;
        }
        let bytes = if opaque {
            None
        } else {
            element.and_then(|e| {
                dimensions(&name[base_end..])
                    .and_then(|count| e.checked_mul(width)?.checked_mul(count))
            })
        };
        out.push(GlobalVar {
            name: base.to_string(),
            bytes,
        });
    }
}

/// The number of elements `[a][b]...` declares: 1 for none, `None` for an empty or
/// unreadable dimension.
fn dimensions(dims: &str) -> Option<u64> {
    let mut count = 1u64;
    let mut rest = dims.trim();
    while let Some(inner) = rest.strip_prefix('[') {
        let close = inner.find(']')?;
        let n = parse_number(inner[..close].trim())?;
        count = count.checked_mul(n)?;
        rest = inner[close + 1..].trim_start();
    }
    rest.is_empty().then_some(count)
}

/// A PTX integer literal: decimal or `0x` hexadecimal, optionally with a `U` suffix.
fn parse_number(text: &str) -> Option<u64> {
    let text = text.strip_suffix(['U', 'u']).unwrap_or(text);
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// `text` split at the commas outside `{}` and `[]`.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// The next `.entry` that stands as a directive (not part of a longer word).
fn find_directive(text: &str, directive: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(directive) {
        let at = from + i;
        let end = at + directive.len();
        let before_ok = at == 0 || !is_ident(text.as_bytes()[at - 1]);
        let after_ok = text.as_bytes().get(end).map_or(true, |&b| !is_ident(b));
        if before_ok && after_ok {
            return Some(at);
        }
        from = end;
    }
    None
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.' | b'%')
}

/// `NAME ( params )` after `.entry`: the name, the sizes (None when a parameter cannot
/// be read) and the text after the list.
fn parse_entry(text: &str) -> Option<(&str, Option<Vec<usize>>, &str)> {
    let (name, shapes, rest) = parse_entry_shapes(text)?;
    let sizes = shapes.map(|v| v.into_iter().map(|(size, _)| size).collect());
    Some((name, sizes, rest))
}

/// (offset, size) in the parameter space of each `.param` of every kernel entry of
/// `ptx`, by name: each parameter at the next multiple of its alignment (its `.align`,
/// else its element's size). Entries whose parameter list cannot be read are left out.
pub fn entry_layouts(ptx: &str) -> HashMap<String, Vec<(usize, usize)>> {
    let text = strip_comments(ptx);
    let mut out = HashMap::new();
    let mut rest = text.as_str();
    while let Some(at) = find_directive(rest, ".entry") {
        rest = &rest[at + ".entry".len()..];
        let Some((name, shapes, after)) = parse_entry_shapes(rest) else {
            continue;
        };
        rest = after;
        match shapes {
            Some(shapes) => {
                let mut end = 0usize;
                let layout = shapes
                    .into_iter()
                    .map(|(size, align)| {
                        let at = end.next_multiple_of(align.max(1));
                        end = at + size;
                        (at, size)
                    })
                    .collect();
                out.insert(name.to_string(), layout);
            }
            None => {
                out.remove(name);
            }
        }
    }
    out
}

/// [`parse_entry`] with each parameter's (size, alignment).
#[allow(clippy::type_complexity)]
fn parse_entry_shapes(text: &str) -> Option<(&str, Option<Vec<(usize, usize)>>, &str)> {
    let text = text.trim_start();
    let name_end = text
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$')))
        .unwrap_or(text.len());
    let name = &text[..name_end];
    if name.is_empty() {
        return None;
    }
    let after_name = text[name_end..].trim_start();
    let Some(list) = after_name.strip_prefix('(') else {
        // `.entry k` with no parameter list, then the body: no parameters.
        return after_name
            .starts_with(['{', '.'])
            .then_some((name, Some(Vec::new()), after_name));
    };
    let close = list.find(')')?;
    let params = list[..close].trim();
    let rest = &list[close + 1..];
    if params.is_empty() {
        return Some((name, Some(Vec::new()), rest));
    }
    let shapes: Option<Vec<(usize, usize)>> = params.split(',').map(param_shape).collect();
    Some((name, shapes, rest))
}

/// The size and alignment of one `.param` declaration, e.g.
/// `.param .u64 .ptr .global .align 8 p`, `.param .align 16 .b8 s[24]`, `.param .f32 x`.
fn param_shape(decl: &str) -> Option<(usize, usize)> {
    let mut words = decl.split_whitespace().peekable();
    if words.next()? != ".param" {
        return None;
    }
    let mut element = None;
    let mut last = None;
    let mut align = None;
    let mut pointer = false;
    while let Some(word) = words.next() {
        match word {
            ".align" => {
                let n = words.next()?.parse::<u32>().ok()?;
                // After `.ptr` it is the alignment of what the pointer points to.
                if !pointer {
                    align = Some(n as usize);
                }
            }
            ".ptr" => pointer = true,
            ".global" | ".local" | ".shared" | ".const" => {}
            w if w.starts_with('.') => {
                if element.is_some() {
                    return None;
                }
                element = Some(type_size(w)?);
            }
            w => last = Some(w),
        }
    }
    let element = element?;
    let name = last?;
    let count = match name.find('[') {
        None => 1,
        Some(open) => {
            let inner = name[open + 1..].strip_suffix(']')?;
            let n: usize = inner.trim().parse().ok()?;
            if n == 0 {
                return None;
            }
            n
        }
    };
    let size = element.checked_mul(count).filter(|&n| n <= 32 << 10)?;
    Some((size, align.unwrap_or(element)))
}

fn type_size(t: &str) -> Option<usize> {
    Some(match t {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

/// PTX text without `//` and `/* */` comments (string literals do not occur in
/// signatures).
fn strip_comments(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len());
    let mut rest = ptx;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (Some(l), b) if b.map_or(true, |b| l < b) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |n| &rest[l + n..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                out.push(' ');
                rest = rest[b + 2..]
                    .find("*/")
                    .map_or("", |e| &rest[b + 2 + e + 2..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_know_every_kernel_and_which_signatures_are_readable() {
        let ptx = ".visible .entry a(.param .u64 p, .param .u32 n) { ret; }\n\
                   .visible .entry b(.param .b8 weird[0x10]) { ret; }\n\
                   .visible .entry c { ret; }";
        let e = entries(ptx).unwrap();
        assert_eq!(e["a"], Some(vec![8, 4]));
        assert_eq!(e["c"], Some(vec![]));
        assert!(e.contains_key("b"));
        assert!(!e.contains_key("d"));
        // An entry whose name cannot be read: the module's kernels are not known.
        assert_eq!(entries(".entry (.param .u32 x) { ret; }"), None);
    }

    const AXPY: &str = r#"
.version 8.0
.target sm_90
.address_size 64

// axpy(float a, const float *x, float *y, unsigned n)
.visible .entry axpy(
	.param .f32 axpy_param_0,
	.param .u64 .ptr .global .align 4 axpy_param_1, /* x */
	.param .u64 axpy_param_2,
	.param .u32 axpy_param_3
)
{
	ret;
}

.visible .entry by_value(
	.param .align 16 .b8 by_value_param_0[24],
	.param .u8 by_value_param_1
)
{ ret; }

.entry nothing()
{ ret; }
"#;

    #[test]
    fn entry_parameters_are_sized_from_the_ptx() {
        let s = entry_signatures(AXPY);
        assert_eq!(s["axpy"], vec![4, 8, 8, 4]);
        assert_eq!(s["by_value"], vec![24, 1]);
        assert_eq!(s["nothing"], Vec::<usize>::new());
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn entry_layouts_place_each_parameter_at_its_alignment() {
        let ptx = ".visible .entry mixed(.param .u8 c, .param .u64 .ptr .global .align 8 p, \
                   .param .u16 h, .param .align 16 .b8 s[24], .param .f32 x) { ret; }\n\
                   .entry bad(.param .weird w) { ret; }";
        let l = entry_layouts(ptx);
        assert_eq!(l["mixed"], vec![(0, 1), (8, 8), (16, 2), (32, 24), (56, 4)]);
        assert!(!l.contains_key("bad"));
        assert_eq!(
            entry_layouts(AXPY)["axpy"],
            vec![(0, 4), (8, 8), (16, 8), (24, 4)]
        );
    }

    #[test]
    fn unreadable_signatures_are_left_out_so_their_launches_are_refused() {
        for ptx in [
            ".entry k(.param .weird p) {}",
            ".entry k(.param .u32) {}",
            ".entry k(.param .u32 a[0]) {}",
            ".entry k(.param .u32 a[x]) {}",
            ".entry k(.param .u32 .u64 a) {}",
            ".entry k(.param .u32 a",
            ".entry (.param .u32 a) {}",
            ".entry k(.param .b8 a[100000]) {}",
            ".entry k(.param .u32 a) {} .entry k(.param .bogus b) {}",
        ] {
            assert!(!entry_signatures(ptx).contains_key("k"), "{ptx}");
        }
    }

    #[test]
    fn comments_and_look_alike_words_do_not_count() {
        let ptx = "// .entry fake(.param .u32 a)\n/* .entry also(.param .u32 b) */\n\
                   .func notentry(.param .u32 c) {}\n.entry real(.param .u64 d) {}";
        let s = entry_signatures(ptx);
        assert_eq!(s.keys().collect::<Vec<_>>(), vec!["real"]);
        assert_eq!(s["real"], vec![8]);
    }

    #[test]
    fn module_scope_variables_are_found_with_their_sizes() {
        let ptx = r#"
.version 8.0
.target sm_90
.address_size 64

.global .align 4 .b8 big[4194304];
.visible .global .align 8 .u64 counter;
.const .align 4 .f32 coeffs[16] = {1.0, 2.0};
.global .v4 .f32 quads[2][3];
.global .u32 a, b[0x10], c = 7;
.extern .global .align 4 .b8 elsewhere[1024];
.global .b8 sized_by_init[] = {1, 2, 3};
.global .texref tex;
.global .u32 many<4>;
// .global .b8 commented[99];

.visible .entry k(
	.param .u64 .ptr .global .align 4 k_param_0,
	.param .u64 .ptr .const k_param_1
)
{
	.reg .b64 %rd<3>;
	ld.param.u64 %rd1, [k_param_0];
	ld.global.u64 %rd2, [%rd1];
	ld.const.u64 %rd2, [coeffs];
	st.global.u64 [%rd1], %rd2;
	ret;
}
"#;
        let found: Vec<(String, Option<u64>)> = globals(ptx)
            .into_iter()
            .map(|g| (g.name, g.bytes))
            .collect();
        let want: Vec<(String, Option<u64>)> = [
            ("big", Some(4 << 20)),
            ("counter", Some(8)),
            ("coeffs", Some(64)),
            ("quads", Some(96)),
            ("a", Some(4)),
            ("b", Some(64)),
            ("c", Some(4)),
            ("sized_by_init", None),
            ("tex", None),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .collect();
        assert_eq!(found, want);
        assert_eq!(
            declared_global_bytes(ptx),
            (4 << 20) + 8 + 64 + 96 + 4 + 64 + 4
        );
    }

    #[test]
    fn huge_declarations_saturate_instead_of_overflowing() {
        let ptx = ".global .b64 x[0xffffffffffffffff];\n\
                   .global .b8 y[4][0xffffffffffffffff];\n\
                   .global .b8 z[4096];\n\
                   .global .b8 w[1099511627776];\n\
                   .global .b8 v[1099511627776];";
        let g = globals(ptx);
        assert_eq!(g[0].bytes, None);
        assert_eq!(g[1].bytes, None);
        assert_eq!(declared_global_bytes(ptx), 4096 + (2u64 << 40));
        let many = ".global .b8 x[9223372036854775807];\n".repeat(3);
        assert_eq!(declared_global_bytes(&many), u64::MAX);
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 200) as usize;
            let text: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    const ALPHABET: &[u8] = b".entry(param) ,[]u32b8 align/*/\n.global{};=<>";
                    ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char
                })
                .collect();
            let _ = entry_signatures(&text);
            let _ = globals(&text);
        }
    }
}
