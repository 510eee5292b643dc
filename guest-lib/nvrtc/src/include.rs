// SPDX-License-Identifier: Apache-2.0
//! The in-memory headers of `nvrtcCreateProgram`, put into the source.
//!
//! The host's compiler gets one source and no files, so the headers a program hands to
//! `nvrtcCreateProgram` travel inside it: each line `#include "name"` or
//! `#include <name>` that names one of them (exactly, as NVRTC matches them) becomes the
//! header's text, whose own includes are replaced the same way. `#line` directives keep
//! the compiler's messages pointing at the header's and the program's own lines and
//! names. Other includes (NVRTC's built-in headers) stay as they are.
//!
//! The replacement is textual, ahead of the preprocessor: a header included again
//! while it is being included (which only include guards could end) is left out, and a
//! header with `#pragma once` is put in once. An include inside a block comment or
//! built by a macro is not seen. Nesting stops at [`MAX_DEPTH`] with an `#error`.

use std::collections::HashSet;

/// Deepest nesting of headers put into a source.
pub const MAX_DEPTH: usize = 200;

/// `source` of the program `file` with the `headers` (include name, text) it includes
/// put in place.
pub fn inline(source: &str, file: &str, headers: &[(String, String)]) -> String {
    let mut out = String::with_capacity(source.len() + 64);
    out.push_str(&line_directive(1, file));
    let mut state = State {
        headers,
        stack: Vec::new(),
        once: HashSet::new(),
    };
    expand(&mut out, source, file, &mut state);
    out
}

struct State<'a> {
    headers: &'a [(String, String)],
    /// The headers being put in, outermost first.
    stack: Vec<&'a str>,
    /// Headers with `#pragma once` already put in.
    once: HashSet<&'a str>,
}

fn expand<'a>(out: &mut String, text: &'a str, file: &str, st: &mut State<'a>) {
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if !st.stack.is_empty() && is_pragma_once(line) {
            // Said by the header being put in: the line itself goes (the compiler would
            // warn about it in the main file), the header is not put in again.
            if let Some(&header) = st.stack.last() {
                st.once.insert(header);
            }
            out.push('\n');
            continue;
        }
        let header = include_name(line)
            .and_then(|name| st.headers.iter().find(|(n, _)| n == name))
            .map(|(n, text)| (n.as_str(), text.as_str()));
        let Some((name, header_text)) = header else {
            out.push_str(line);
            if !line.ends_with('\n') {
                out.push('\n');
            }
            continue;
        };
        if st.once.contains(name) || st.stack.contains(&name) {
            log::debug!("{file}: #include of {name:?} left out (already included)");
            out.push('\n');
            continue;
        }
        if st.stack.len() >= MAX_DEPTH {
            out.push_str(&format!(
                "#error \"headers nested more than {MAX_DEPTH} deep at {}\"\n",
                escape(name)
            ));
            continue;
        }
        st.stack.push(name);
        out.push_str(&line_directive(1, name));
        expand(out, header_text, name, st);
        st.stack.pop();
        out.push_str(&line_directive(i + 2, file));
    }
}

/// `#line N "file"`, with the name escaped for a string literal.
fn line_directive(line: usize, file: &str) -> String {
    format!("#line {line} \"{}\"\n", escape(file))
}

fn escape(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c if c.is_control() => s.push('?'),
            c => s.push(c),
        }
    }
    s
}

/// The part of `line` after `#` and `directive`, if the line is that directive.
fn directive<'l>(line: &'l str, directive: &str) -> Option<&'l str> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix(directive)?;
    // `#includes` is no include.
    match rest.chars().next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => None,
        _ => Some(rest),
    }
}

/// The header an `#include "name"` or `#include <name>` line names.
fn include_name(line: &str) -> Option<&str> {
    let rest = directive(line, "include")?.trim_start();
    let close = match rest.chars().next()? {
        '"' => '"',
        '<' => '>',
        _ => return None,
    };
    let body = &rest[1..];
    let end = body.find(close)?;
    let after = body[end + 1..].trim();
    if !(after.is_empty() || after.starts_with("//") || after.starts_with("/*")) {
        return None;
    }
    Some(&body[..end])
}

fn is_pragma_once(line: &str) -> bool {
    directive(line, "pragma").is_some_and(|rest| {
        let mut words = rest.split_whitespace();
        words.next() == Some("once") && words.next().is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn include_lines_are_recognised_in_their_spellings() {
        assert_eq!(include_name("#include \"a.h\"\n"), Some("a.h"));
        assert_eq!(
            include_name("  #  include <dir/b.h>  // why\r\n"),
            Some("dir/b.h")
        );
        assert_eq!(include_name("#include\t\"c.h\" /* c */"), Some("c.h"));
        assert_eq!(include_name("#include MACRO"), None);
        assert_eq!(include_name("#include \"a.h\" junk"), None);
        assert_eq!(include_name("#includes \"a.h\""), None);
        assert_eq!(include_name("// #include \"a.h\""), None);
        assert_eq!(include_name("#include \"unterminated"), None);
        assert!(is_pragma_once("  # pragma  once \n"));
        assert!(!is_pragma_once("#pragma once more"));
        assert!(!is_pragma_once("#pragma unroll"));
    }

    #[test]
    fn headers_are_put_in_with_line_directives_and_nested() {
        let hs = headers(&[("a.h", "#include <b.h>\nint a;"), ("b.h", "#define B 2\n")]);
        let src = "#include \"a.h\"\n#include <cuda_fp16.h>\nint main_line;\n";
        assert_eq!(
            inline(src, "prog.cu", &hs),
            "#line 1 \"prog.cu\"\n\
             #line 1 \"a.h\"\n\
             #line 1 \"b.h\"\n\
             #define B 2\n\
             #line 2 \"a.h\"\n\
             int a;\n\
             #line 2 \"prog.cu\"\n\
             #include <cuda_fp16.h>\n\
             int main_line;\n"
        );
    }

    #[test]
    fn a_source_without_includes_only_gets_its_name() {
        let src = "__global__ void k() {}";
        assert_eq!(
            inline(src, "k.cu", &[]),
            "#line 1 \"k.cu\"\n__global__ void k() {}\n"
        );
        assert_eq!(inline("", "x", &[]), "#line 1 \"x\"\n");
        // A name that a string literal must escape.
        assert_eq!(
            inline("int x;\n", "a\"b\\c\n", &[]),
            "#line 1 \"a\\\"b\\\\c?\"\nint x;\n"
        );
    }

    #[test]
    fn pragma_once_headers_go_in_once_and_recursion_stops() {
        let hs = headers(&[
            ("once.h", "#pragma once\nint o;\n"),
            (
                "self.h",
                "#ifndef SELF\n#define SELF\n#include \"self.h\"\n#endif\n",
            ),
        ]);
        let src = "#include \"once.h\"\n#include \"once.h\"\n#include \"self.h\"\n";
        let out = inline(src, "p.cu", &hs);
        assert_eq!(out.matches("int o;").count(), 1);
        assert!(!out.contains("#pragma once"));
        assert_eq!(out.matches("#define SELF").count(), 1);
        assert!(!out.contains("#include"));
        // The main file's own pragma stays.
        assert!(inline("#pragma once\n", "p.cu", &hs).contains("#pragma once"));
    }

    #[test]
    fn guarded_headers_included_twice_go_in_twice_as_the_preprocessor_would_see_them() {
        let hs = headers(&[("g.h", "#ifndef G\n#define G\nint g;\n#endif\n")]);
        let out = inline("#include \"g.h\"\n#include \"g.h\"\n", "p.cu", &hs);
        assert_eq!(out.matches("int g;").count(), 2);
        assert!(out.ends_with("#line 3 \"p.cu\"\n"));
    }

    #[test]
    fn nesting_stops_with_an_error_past_the_limit() {
        let hs: Vec<(String, String)> = (0..=MAX_DEPTH)
            .map(|i| (format!("h{i}.h"), format!("#include \"h{}.h\"\n", i + 1)))
            .collect();
        let out = inline("#include \"h0.h\"\n", "p.cu", &hs);
        assert!(out.contains("#error \"headers nested more than 200 deep at h200.h\""));
    }
}
