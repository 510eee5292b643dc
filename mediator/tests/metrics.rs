// SPDX-License-Identifier: Apache-2.0
//! The mediator's metrics: requests of known kinds and sizes on two tenants show up in
//! the text with the right counts, bytes, memory and latencies; the HTTP endpoint serves
//! them and survives bad requests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::metrics::{self, Format};
use vgpu_mediator::{Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

fn mediator() -> Arc<Mediator> {
    Mediator::new(Arc::new(CpuExecutorFactory::new()))
}

fn tenant(m: &Mediator, name: &str, quota: u64) -> TenantId {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: quota,
        weight: 100,
    })
    .unwrap()
}

fn call(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    m.call(t, Request::new(session, command))
}

fn ok(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    let r = call(m, t, session, command.clone());
    assert_eq!(r.status, Status::Ok, "{command:?}");
    r
}

/// The value of the sample `series` (name and labels as written), if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.split(' ').next()?.parse().unwrap())
    })
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// The sum of every sample whose series starts with `prefix`.
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

const KIB: u64 = 1024;

#[test]
fn requests_of_two_vms_are_counted_by_operation_status_and_bytes() {
    let m = mediator();
    let a = tenant(&m, "vm-a", 64 << 20);
    let b = tenant(&m, "vm-b", 32 << 20);

    // vm-a: 9 requests.
    let s = ok(&m, a, 0, Command::SessionOpen).value0;
    let x = ok(&m, a, s, Command::Alloc { size: 4 * KIB }).value0;
    for len in [1000, 24] {
        ok(
            &m,
            a,
            s,
            Command::Htod {
                dst: x,
                offset: 0,
                data: vec![1; len],
            },
        );
    }
    ok(
        &m,
        a,
        s,
        Command::Launch(Launch {
            module: BUILTIN_MODULE,
            kernel: "fill_u32".into(),
            grid: [1, 1, 1],
            block: [64, 1, 1],
            shared_bytes: 0,
            params: vec![Param::Buffer(x), Param::u32(7), Param::u32(64)],
        }),
    );
    let out = ok(
        &m,
        a,
        s,
        Command::Dtoh {
            src: x,
            offset: 0,
            len: 512,
        },
    );
    assert_eq!(out.data.len(), 512);
    ok(&m, a, s, Command::Sync);
    let over = call(&m, a, s, Command::Alloc { size: 1 << 30 });
    assert_eq!(over.status, Status::QuotaExceeded);
    let bad = call(&m, a, s, Command::Free { handle: 999 });
    assert_eq!(bad.status, Status::InvalidHandle);

    // vm-b: 4 requests.
    let s = ok(&m, b, 0, Command::SessionOpen).value0;
    let y = ok(&m, b, s, Command::Alloc { size: 100 }).value0;
    ok(
        &m,
        b,
        s,
        Command::Dtoh {
            src: y,
            offset: 0,
            len: 100,
        },
    );
    let bad = call(&m, b, 77, Command::Sync);
    assert_eq!(bad.status, Status::InvalidSession);

    let text = m.metrics_text();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");

    let requests = |vm: &str, op: &str, status: &str| {
        value(
            &text,
            &format!(
                "vgpu_requests_total{{vm=\"{vm}\",gpu=\"0\",op=\"{op}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(requests("vm-a", "session_open", "ok"), 1.0);
    assert_eq!(requests("vm-a", "alloc", "ok"), 1.0);
    assert_eq!(requests("vm-a", "htod", "ok"), 2.0);
    assert_eq!(requests("vm-a", "launch", "ok"), 1.0);
    assert_eq!(requests("vm-a", "dtoh", "ok"), 1.0);
    assert_eq!(requests("vm-a", "sync", "ok"), 1.0);
    assert_eq!(requests("vm-a", "alloc", "quota_exceeded"), 1.0);
    assert_eq!(requests("vm-a", "free", "invalid_handle"), 1.0);
    assert_eq!(requests("vm-b", "dtoh", "ok"), 1.0);
    assert_eq!(requests("vm-b", "sync", "invalid_session"), 1.0);
    assert_eq!(
        sample(
            &text,
            "vgpu_requests_total{vm=\"vm-b\",gpu=\"0\",op=\"htod\""
        ),
        None
    );
    assert_eq!(sum(&text, "vgpu_requests_total{vm=\"vm-a\""), 9.0);
    assert_eq!(sum(&text, "vgpu_requests_total{vm=\"vm-b\""), 4.0);

    let copied = |vm: &str, dir: &str| {
        value(
            &text,
            &format!("vgpu_copied_bytes_total{{vm=\"{vm}\",gpu=\"0\",direction=\"{dir}\"}}"),
        )
    };
    assert_eq!(copied("vm-a", "htod"), 1024.0);
    assert_eq!(copied("vm-a", "dtoh"), 512.0);
    assert_eq!(copied("vm-b", "htod"), 0.0);
    assert_eq!(copied("vm-b", "dtoh"), 100.0);
    assert_eq!(
        value(&text, "vgpu_kernel_launches_total{vm=\"vm-a\",gpu=\"0\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "vgpu_kernel_launches_total{vm=\"vm-b\",gpu=\"0\"}"),
        0.0
    );

    // Memory, read from the mediator's own accounting.
    for (vm, t, quota) in [("vm-a", a, 64u64 << 20), ("vm-b", b, 32 << 20)] {
        let usage = m.usage(t).unwrap();
        assert!(usage.mem_used > 0);
        let series = |name: &str| format!("{name}{{vm=\"{vm}\",gpu=\"0\"}}");
        assert_eq!(
            value(&text, &series("vgpu_memory_used_bytes")),
            usage.mem_used as f64
        );
        assert_eq!(
            value(&text, &series("vgpu_memory_quota_bytes")),
            quota as f64
        );
        assert_eq!(
            sum(&text, &format!("vgpu_memory_charged_bytes{{vm=\"{vm}\"")),
            usage.mem_used as f64
        );
        assert_eq!(value(&text, &series("vgpu_sessions")), 1.0);
        assert_eq!(value(&text, &series("vgpu_allocations")), 1.0);
        assert_eq!(value(&text, &series("vgpu_modules")), 0.0);
        assert_eq!(value(&text, &series("vgpu_weight")), 100.0);
        assert_eq!(value(&text, &series("vgpu_worker_restarts_total")), 0.0);
        assert_eq!(value(&text, &series("vgpu_watchdog_timeouts_total")), 0.0);
        assert_eq!(value(&text, &series("vgpu_cancelled_requests_total")), 0.0);
        assert!(value(&text, &series("vgpu_device_time_seconds_total")) >= 0.0);
        assert!(value(&text, &series("vgpu_sched_wait_seconds_total")) >= 0.0);
    }

    // One latency per request; +Inf holds them all.
    for (vm, n) in [("vm-a", 9.0), ("vm-b", 4.0)] {
        assert_eq!(
            sum(
                &text,
                &format!("vgpu_request_duration_seconds_count{{vm=\"{vm}\"")
            ),
            n
        );
        let inf: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("vgpu_request_duration_seconds_bucket{")
                    && l.contains(&format!("vm=\"{vm}\""))
                    && l.contains("le=\"+Inf\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert_eq!(inf, n);
    }
    assert_eq!(
        value(
            &text,
            "vgpu_request_duration_seconds_count{vm=\"vm-a\",gpu=\"0\",op=\"htod\"}"
        ),
        2.0
    );
    // Buckets from 10 us to 10 s.
    let htod_buckets: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("vgpu_request_duration_seconds_bucket{")
                && l.contains("vm=\"vm-a\",gpu=\"0\",op=\"htod\"")
        })
        .collect();
    assert_eq!(htod_buckets.len(), metrics::LATENCY_BUCKETS_NS.len() + 1);
    assert!(
        htod_buckets[0].contains("le=\"0.00001\""),
        "{}",
        htod_buckets[0]
    );
    assert!(
        htod_buckets[18].contains("le=\"10.0\""),
        "{}",
        htod_buckets[18]
    );
    assert!(text.contains("# TYPE vgpu_request_duration_seconds histogram"));
    assert!(text.contains("# TYPE vgpu_requests counter"));
    assert!(text.contains("# UNIT vgpu_memory_used_bytes bytes"));

    assert_eq!(value(&text, "vgpu_tenants"), 2.0);
    assert!(text.contains("vgpu_device_info{device=\"CPU reference executor\",executor=\"cpu\"} 1"));
    assert!(value(&text, "process_cpu_seconds_total") > 0.0);
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);

    // A removed VM's series go with it.
    m.remove_tenant(b);
    let text = m.metrics_text();
    assert!(!text.contains("vm=\"vm-b\""), "{text}");
    assert!(text.contains("vm=\"vm-a\""));
    assert_eq!(value(&text, "vgpu_tenants"), 1.0);

    // The classic text format has the same samples.
    let classic = m.metrics(Format::Prometheus);
    assert!(!classic.contains("# EOF"));
    assert!(classic.contains("# TYPE vgpu_requests_total counter"));
    assert_eq!(
        value(
            &classic,
            "vgpu_requests_total{vm=\"vm-a\",gpu=\"0\",op=\"htod\",status=\"ok\"}"
        ),
        2.0
    );
}

#[test]
fn tenants_of_one_name_get_their_id_and_requests_refused_by_the_budget_are_counted() {
    let m = Mediator::with_limits(
        Arc::new(CpuExecutorFactory::new()),
        vgpu_mediator::Limits {
            max_held_bytes: 1024,
            ..vgpu_mediator::Limits::default()
        },
    );
    let one = tenant(&m, "vm1", 1 << 20);
    let two = tenant(&m, "vm1", 1 << 20);
    let big = call(
        &m,
        one,
        0,
        Command::Htod {
            dst: 1,
            offset: 0,
            data: vec![0; 4096],
        },
    );
    assert_eq!(big.status, Status::LimitExceeded);
    let text = m.metrics_text();
    let (a, b) = (format!("vm1#{}", one.0), format!("vm1#{}", two.0));
    assert_eq!(
        value(
            &text,
            &format!(
                "vgpu_requests_total{{vm=\"{a}\",gpu=\"0\",op=\"htod\",status=\"limit_exceeded\"}}"
            )
        ),
        1.0
    );
    assert!(text.contains(&format!(
        "vgpu_memory_quota_bytes{{vm=\"{b}\",gpu=\"0\"}} 1048576"
    )));
    assert!(!text.contains("vm=\"vm1\""));
}

#[test]
fn series_name_the_gpu_of_each_vm_and_each_gpu_has_its_own() {
    use vgpu_mediator::{ExecutorFactory, Limits, Placement, SchedConfig};
    let factory = || -> Arc<dyn ExecutorFactory> { Arc::new(CpuExecutorFactory::simulated(2)) };
    let m = Mediator::with_gpus(
        vec![(0, factory()), (1, factory())],
        Limits::default(),
        SchedConfig::default(),
    );
    let add = |name: &str, quota: u64, gpu: u32| {
        m.add_tenant_on(
            TenantConfig {
                name: name.into(),
                mem_quota: quota,
                weight: 100,
            },
            Placement::Gpu(gpu),
        )
        .unwrap()
    };
    let a = add("vm-a", 64 << 20, 0);
    let b = add("vm-b", 32 << 20, 0);
    let c = add("vm-c", 16 << 20, 1);
    let s = ok(&m, c, 0, Command::SessionOpen).value0;
    ok(&m, c, s, Command::Alloc { size: 4 * KIB });
    let s = ok(&m, a, 0, Command::SessionOpen).value0;
    ok(&m, a, s, Command::Alloc { size: 8 * KIB });

    let text = m.metrics_text();
    // Every per-VM series carries the VM's GPU.
    assert_eq!(
        value(
            &text,
            "vgpu_requests_total{vm=\"vm-c\",gpu=\"1\",op=\"alloc\",status=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "vgpu_requests_total{vm=\"vm-a\",gpu=\"0\",op=\"alloc\",status=\"ok\"}"
        ),
        1.0
    );
    for (vm, gpu, quota) in [
        ("vm-a", 0, 64u64 << 20),
        ("vm-b", 0, 32 << 20),
        ("vm-c", 1, 16 << 20),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("vgpu_memory_quota_bytes{{vm=\"{vm}\",gpu=\"{gpu}\"}}")
            ),
            quota as f64
        );
    }
    let labelled: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vgpu_") && l.contains("vm=\""))
        .collect();
    assert!(!labelled.is_empty());
    for line in labelled {
        assert!(line.contains(",gpu=\""), "{line}");
        assert_eq!(
            line.contains("vm=\"vm-c\""),
            line.contains("gpu=\"1\""),
            "{line}"
        );
    }

    // Each GPU: its memory, VMs, committed quota and memory held.
    let memory = CpuExecutorFactory::simulated(2).device().total_memory;
    let name = m.device().name.clone();
    let gpu = |metric: &str, index: u32| {
        value(
            &text,
            &format!("{metric}{{gpu=\"{index}\",device=\"{name}\"}}"),
        )
    };
    let used = |t| m.usage(t).unwrap().mem_used;
    for index in [0, 1] {
        assert_eq!(gpu("vgpu_gpu_memory_bytes", index), memory as f64);
    }
    assert_eq!(gpu("vgpu_gpu_vms", 0), 2.0);
    assert_eq!(gpu("vgpu_gpu_vms", 1), 1.0);
    assert_eq!(
        gpu("vgpu_gpu_quota_committed_bytes", 0),
        (96u64 << 20) as f64
    );
    assert_eq!(
        gpu("vgpu_gpu_quota_committed_bytes", 1),
        (16u64 << 20) as f64
    );
    assert_eq!(
        gpu("vgpu_gpu_memory_used_bytes", 0),
        (used(a) + used(b)) as f64
    );
    assert_eq!(gpu("vgpu_gpu_memory_used_bytes", 1), used(c) as f64);
    assert!(used(c) >= 4 * KIB);
    assert!(text.contains("# TYPE vgpu_gpu_vms gauge"));
    assert!(text.contains("# UNIT vgpu_gpu_quota_committed_bytes bytes"));
    // The daemon's figures stay those of the first GPU.
    assert_eq!(value(&text, "vgpu_device_memory_bytes"), memory as f64);
    assert_eq!(value(&text, "vgpu_tenants"), 3.0);

    // A VM that goes away leaves its GPU's figures; the GPU stays.
    m.remove_tenant(c);
    let text = m.metrics_text();
    assert!(!text.contains("vm=\"vm-c\""));
    assert_eq!(
        value(
            &text,
            &format!("vgpu_gpu_vms{{gpu=\"1\",device=\"{name}\"}}")
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            &format!("vgpu_gpu_quota_committed_bytes{{gpu=\"1\",device=\"{name}\"}}")
        ),
        0.0
    );
}

/// Sends `request` as is and returns the whole answer.
fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

fn body(answer: &str) -> &str {
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[test]
fn the_endpoint_serves_metrics_and_survives_bad_requests() {
    let m = mediator();
    let t = tenant(&m, "vm0", 1 << 20);
    ok(&m, t, 0, Command::Info);
    let server = metrics::serve("127.0.0.1:0".parse().unwrap(), &m).unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let get = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let answer = http(addr, get);
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK");
    assert!(answer.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    let series = "vgpu_requests_total{vm=\"vm0\",gpu=\"0\",op=\"info\",status=\"ok\"}";
    assert_eq!(value(body(&answer), series), 1.0);
    let length: usize = answer
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body(&answer).len());

    // Prometheus asks for OpenMetrics and gets it.
    let answer = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,\
          text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK");
    assert!(answer
        .contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"));
    assert!(body(&answer).ends_with("# EOF\n"));

    let answer = http(addr, b"GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status_line(&answer), "HTTP/1.1 404 Not Found");
    let answer = http(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status_line(&answer), "HTTP/1.1 405 Method Not Allowed");
    let answer = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK");
    assert_eq!(body(&answer), "");
    for garbage in [
        &b"\x00\x01garbage\xff\r\n\r\n"[..],
        b"hello\n\n",
        b"GET /metrics\r\n\r\n",
    ] {
        let answer = http(addr, garbage);
        assert_eq!(
            status_line(&answer),
            "HTTP/1.1 400 Bad Request",
            "{garbage:?}"
        );
    }
    let huge = vec![b'a'; metrics::MAX_REQUEST_BYTES + 100];
    let mut stream = TcpStream::connect(addr).unwrap();
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nX: ");
    let _ = stream.write_all(&huge);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A client that connects and goes away says nothing.
    drop(TcpStream::connect(addr).unwrap());

    // Still serving, and it counts what happened meanwhile.
    ok(&m, t, 0, Command::Info);
    let answer = http(addr, get);
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK");
    assert_eq!(value(body(&answer), series), 2.0);

    server.stop();
    assert!(TcpStream::connect(addr).is_err(), "stopped: nobody listens");
}

#[test]
fn an_address_in_use_is_a_startup_error() {
    let m = mediator();
    let first = metrics::serve("127.0.0.1:0".parse().unwrap(), &m).unwrap();
    let taken = metrics::serve(first.local_addr(), &m).unwrap_err();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
}
