// SPDX-License-Identifier: Apache-2.0
//! What COMPILE refuses before a guest's CUDA C++ reaches NVRTC: anything that would make
//! the compiler read (or write) a file of the host. NVRTC itself runs in the session's
//! sandboxed worker process, as an unprivileged user, and can only open files there for
//! reading; these rules keep it from opening any file the guest names.
//!
//! - **Options** ([`check_options`]): NVRTC's options that name files or directories:
//!   include paths (`-I`, `--include-path`, `-isystem`, `--system-include`), headers
//!   read before the source (`-include`, `--pre-include`), bundled headers
//!   (`--use-bundled-headers`), precompiled headers (any option with `pch` in its name:
//!   `--pch`, `--create-pch`, `--use-pch`, `--pch-dir`, ...), files the compiler writes
//!   (`--time`, `--fdevice-time-trace`, dependency files `-M*`, `--dependency-output`,
//!   `--generate-dependencies`, `-o`, `--output-file`, `--output-directory`,
//!   `--save-temps`, `--keep`, `--keep-dir`), option files (`--options-file`, `-optf`,
//!   `@file`) and `--libdevice-directory`; in either spelling (`-x` or `--x`, with or
//!   without `=value`). And, whatever its name, any option other than a macro definition
//!   (`-D`, `--define-macro`, `-U`, `--undefine-macro`) with a `/` or `\` in it: a path
//!   in an option NVRTC adds later is refused too.
//! - **Source** ([`check_source`]): an `#include`, `#include_next`, `#import` or `#embed`
//!   (also spelled `%:` or `??=`), and every `__has_include`, `__has_include_next` or
//!   `__has_embed`, must name its file as a literal (`"name"` or `<name>`, not a macro)
//!   that is relative and has no `..`; a `#line` directive or line marker may not name a
//!   file in a directory. The executor names the program inside a path that cannot be a
//!   directory, so a relative name finds no host file beside the source, and with no
//!   include path allowed only NVRTC's built-in headers resolve. The check reads the
//!   source the way the preprocessor does in the respects that matter (line splices,
//!   comments, string and character literals); where it cannot tell, it sees a directive
//!   and checks it, so it errs towards refusing.

/// Option names (without their leading dashes and any `=value`) that read or write
/// files.
const FILE_OPTIONS: &[&str] = &[
    "include-path",
    "isystem",
    "system-include",
    "include",
    "pre-include",
    "use-bundled-headers",
    "time",
    "fdevice-time-trace",
    "dependency-output",
    "generate-dependencies",
    "generate-nonsystem-dependencies",
    "o",
    "output-file",
    "odir",
    "output-directory",
    "save-temps",
    "keep",
    "keep-dir",
    "options-file",
    "optf",
    "libdevice-directory",
];

/// Macro definitions, whose values may hold any text.
const MACRO_OPTIONS: &[&str] = &["D", "define-macro", "U", "undefine-macro"];

/// The index of the first option that could make NVRTC read or write a host file.
pub fn check_options(options: &[String]) -> Result<(), usize> {
    match options.iter().position(|o| reads_files(o)) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

fn reads_files(option: &str) -> bool {
    if option.starts_with('@') {
        return true;
    }
    let name = option.trim_start_matches('-');
    let key = name.split('=').next().unwrap_or(name);
    if key.starts_with('I') || key.starts_with('M') || key.contains("pch") {
        return true;
    }
    if FILE_OPTIONS.contains(&key) {
        return true;
    }
    let is_macro = MACRO_OPTIONS.contains(&key)
        || (key.starts_with('D') || key.starts_with('U')) && !option.starts_with("--");
    !is_macro && option.contains(['/', '\\'])
}

/// The 1-based line of the first preprocessing construct of `source` that could open a
/// host file (see the module documentation).
pub fn check_source(source: &str) -> Result<(), u32> {
    for (line, text) in logical_lines(source) {
        if !line_is_safe(&text) {
            return Err(line);
        }
    }
    Ok(())
}

/// The source as the preprocessor's logical lines, each with the number of the physical
/// line it starts on: line splices (`\` or `??/` before a newline) joined, comments
/// replaced by a space, string and character literals replaced by `""` holding their
/// text (a literal ends at the end of its line at the latest, so no line is hidden
/// inside one).
fn logical_lines(source: &str) -> Vec<(u32, String)> {
    let b = source.as_bytes();
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut start = 1u32;
    let mut physical = 1u32;
    let mut i = 0;
    let mut in_block_comment = false;
    // The quote of the literal being read, if one is.
    let mut quote: Option<u8> = None;
    while i < b.len() {
        // Line splices, before anything else.
        if b[i] == b'\\' && next_is_newline(b, i + 1) {
            i = skip_newline(b, i + 1);
            physical += 1;
            continue;
        }
        if b[i..].starts_with(b"??/") && next_is_newline(b, i + 3) {
            i = skip_newline(b, i + 3);
            physical += 1;
            continue;
        }
        let c = b[i];
        if c == b'\n' {
            physical += 1;
            i += 1;
            if in_block_comment {
                continue;
            }
            if let Some(q) = quote.take() {
                current.push(q as char);
            }
            lines.push((start, std::mem::take(&mut current)));
            start = physical;
            continue;
        }
        if in_block_comment {
            if b[i..].starts_with(b"*/") {
                in_block_comment = false;
                current.push(' ');
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        if let Some(q) = quote {
            if c == b'\\' && i + 1 < b.len() && b[i + 1] != b'\n' {
                current.push(c as char);
                current.push(b[i + 1] as char);
                i += 2;
                continue;
            }
            current.push(c as char);
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if b[i..].starts_with(b"//") {
            // To the end of the line (a splice continues it, handled above).
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && next_is_newline(b, i + 1) {
                    i = skip_newline(b, i + 1);
                    physical += 1;
                    continue;
                }
                i += 1;
            }
            current.push(' ');
            continue;
        }
        if b[i..].starts_with(b"/*") {
            in_block_comment = true;
            i += 2;
            continue;
        }
        if c == b'"' || c == b'\'' {
            quote = Some(c);
        }
        current.push(c as char);
        i += 1;
    }
    if !current.is_empty() {
        lines.push((start, current));
    }
    lines
}

fn next_is_newline(b: &[u8], i: usize) -> bool {
    b.get(i) == Some(&b'\n') || (b.get(i) == Some(&b'\r') && b.get(i + 1) == Some(&b'\n'))
}

fn skip_newline(b: &[u8], i: usize) -> usize {
    if b.get(i) == Some(&b'\r') {
        i + 2
    } else {
        i + 1
    }
}

/// Whether a logical line opens no host file.
fn line_is_safe(line: &str) -> bool {
    // Every `__has_include`-like operator, wherever it is.
    for op in ["__has_include_next", "__has_include", "__has_embed"] {
        let mut rest = line;
        while let Some(at) = rest.find(op) {
            let after = rest[at + op.len()..].trim_start();
            // The longer name was checked already.
            if op == "__has_include" && rest[at + op.len()..].starts_with("_next") {
                rest = &rest[at + op.len()..];
                continue;
            }
            let Some(inner) = after.strip_prefix('(') else {
                return false;
            };
            if !literal_is_safe(inner.trim_start()) {
                return false;
            }
            rest = &rest[at + op.len()..];
        }
    }
    let trimmed = line.trim_start();
    let Some(directive) = ["#", "%:", "??="]
        .iter()
        .find_map(|h| trimmed.strip_prefix(h))
    else {
        return true;
    };
    let directive = directive.trim_start();
    let name_len = directive
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(directive.len());
    let (name, operand) = directive.split_at(name_len);
    let operand = operand.trim_start();
    match name {
        "include" | "include_next" | "import" | "embed" => literal_is_safe(operand),
        // `#line N "file"`, and GNU line markers `# N "file"`: no directories.
        n if n == "line" || n.starts_with(|c: char| c.is_ascii_digit()) => {
            match operand.find('"') {
                Some(q) => {
                    let file = &operand[q + 1..];
                    !file[..file.find('"').unwrap_or(file.len())].contains(['/', '\\'])
                }
                None => true,
            }
        }
        _ => true,
    }
}

/// Whether `text` starts with a file-name literal (`"name"` or `<name>`) whose name is
/// relative, without `..` and without `\`.
fn literal_is_safe(text: &str) -> bool {
    let (close, rest) = match text.as_bytes().first() {
        Some(b'"') => ('"', &text[1..]),
        Some(b'<') => ('>', &text[1..]),
        _ => return false,
    };
    let Some(end) = rest.find(close) else {
        return false;
    };
    let name = &rest[..end];
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.split('/').any(|part| part == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_that_name_files_are_refused_by_index() {
        let fine = opts(&[
            "--gpu-architecture=compute_90",
            "-arch=compute_80",
            "-std=c++17",
            "--use_fast_math",
            "-DPATH=\"a/b\"",
            "--define-macro=X=1",
            "-UX",
            "-lineinfo",
            "--fmad=false",
            "-default-device",
            "--device-debug",
            "--split-compile=0",
        ]);
        assert_eq!(check_options(&fine), Ok(()));
        for bad in [
            "-I/usr/include",
            "-I",
            "--include-path=/etc",
            "-include=/etc/passwd",
            "--pre-include=x.h",
            "-isystem=/usr",
            "--pch",
            "-pch",
            "--create-pch=x",
            "--use-pch=x",
            "--pch-dir=/tmp",
            "-pch-dir=/tmp",
            "--pch-verbose=true",
            "--instantiate-templates-in-pch=true",
            "--use-bundled-headers=/opt",
            "--time=/tmp/t.csv",
            "-time=t.csv",
            "--fdevice-time-trace=x.json",
            "-MD",
            "-MF=deps",
            "--dependency-output=d",
            "-o=out.ptx",
            "@options.txt",
            "--options-file=f",
            "--something-new=/etc/shadow",
            "--weird=C:\\x",
        ] {
            let mut list = fine.clone();
            list.insert(3, bad.to_string());
            assert_eq!(check_options(&list), Err(3), "{bad}");
        }
    }

    #[test]
    fn sources_that_include_host_files_are_refused_by_line() {
        let fine = "#include <cuda_fp16.h>\n\
                    #include \"cuda/std/type_traits\"\n\
                    #if __has_include(<cuda_bf16.h>)\n#endif\n\
                    // #include \"/etc/passwd\" in a comment\n\
                    const char *s = \"#include </etc/passwd>\";\n\
                    #line 10 \"guest.cu\"\n\
                    extern \"C\" __global__ void k(int *p) { *p = 1'000; }\n";
        assert_eq!(check_source(fine), Ok(()));
        for (bad, line) in [
            ("#include \"/etc/passwd\"\n", 1),
            ("int a;\n#include </etc/passwd>\n", 2),
            ("\n\n  #  include \"../../etc/passwd\"\n", 3),
            ("#define F \"/etc/passwd\"\n#include F\n", 2),
            ("#include_next </etc/x>\n", 1),
            ("#embed \"/etc/x\"\n", 1),
            ("%:include \"/etc/x\"\n", 1),
            ("??=include \"/etc/x\"\n", 1),
            ("#/* c */include \"/etc/x\"\n", 1),
            ("#inc\\\nlude \"/etc/x\"\n", 1),
            ("#include \\\n\"/etc/x\"\n", 1),
            // A comment is a space: the directive is on the logical line that began at 1.
            ("/* a\nb */ #include \"/etc/x\"\n", 1),
            ("#if __has_include(\"/etc/x\")\n#endif\n", 1),
            ("#if __has_include_next(MACRO)\n#endif\n", 1),
            ("#line 1 \"/etc/guest.cu\"\n", 1),
            ("# 1 \"/etc/guest.cu\"\n", 1),
            ("char c = '\"';\n#include \"/etc/x\"\n", 2),
            // Where the check cannot tell (a digit separator, a raw string), it checks.
            ("int x = 1'0; /*';\n#include \"/etc/x\"\n", 2),
            ("const char *r = R\"(\n#include \"/etc/x\"\n)\";\n", 2),
        ] {
            assert_eq!(check_source(bad), Err(line), "{bad:?}");
        }
    }
}
