//! Kernel signatures read from PTX text: the size of each `.param` of every `.entry`.
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
    let sizes: Option<Vec<usize>> = params.split(',').map(param_size).collect();
    Some((name, sizes, rest))
}

/// The size of one `.param` declaration, e.g. `.param .u64 .ptr .global .align 8 p`,
/// `.param .align 16 .b8 s[24]`, `.param .f32 x`.
fn param_size(decl: &str) -> Option<usize> {
    let mut words = decl.split_whitespace().peekable();
    if words.next()? != ".param" {
        return None;
    }
    let mut element = None;
    let mut last = None;
    while let Some(word) = words.next() {
        match word {
            ".align" => {
                words.next()?.parse::<u32>().ok()?;
            }
            ".ptr" | ".global" | ".local" | ".shared" | ".const" => {}
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
    element.checked_mul(count).filter(|&n| n <= 32 << 10)
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
    fn arbitrary_text_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 200) as usize;
            let text: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    const ALPHABET: &[u8] = b".entry(param) ,[]u32b8 align/*/\n";
                    ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char
                })
                .collect();
            let _ = entry_signatures(&text);
        }
    }
}
