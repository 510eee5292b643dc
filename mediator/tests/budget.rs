// SPDX-License-Identifier: Apache-2.0
//! A VM's byte budget: what its requests hold in the mediator (payload in, answers out)
//! is bounded whether they are queued, running or abandoned, and cancelling drops what
//! is queued at once.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::{
    request_cost, CompletionSink, HoldError, Limits, Mediator, TenantConfig, TenantId,
    REQUEST_OVERHEAD,
};
use vgpu_protocol::{Command, Request, Response, Status};

const BUDGET: u64 = 8 << 20;
const COPY: usize = 1 << 20;

/// Collects answers.
struct Answers(Mutex<mpsc::Sender<(u64, Response)>>);

impl CompletionSink for Answers {
    fn complete(&self, token: u64, response: Response) {
        let _ = self.0.lock().unwrap().send((token, response));
    }
}

/// Keeps the worker that answers through it busy until the gate opens: a stand-in for
/// a long kernel, without timing.
struct Gate {
    entered: Mutex<mpsc::Sender<()>>,
    open: Mutex<mpsc::Receiver<()>>,
}

impl CompletionSink for Gate {
    fn complete(&self, _token: u64, _response: Response) {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.open.lock().unwrap().recv();
    }
}

fn setup() -> (Arc<Mediator>, TenantId, u64, u64) {
    let limits = Limits {
        max_held_bytes: BUDGET,
        ..Limits::default()
    };
    let m = Mediator::with_limits(Arc::new(CpuExecutorFactory::new()), limits);
    let t = m
        .add_tenant(TenantConfig {
            name: "vm-budget".into(),
            mem_quota: 64 << 20,
            weight: 100,
        })
        .unwrap();
    let s = m.call(t, Request::new(0, Command::SessionOpen)).value0;
    let b = m
        .call(t, Request::new(s, Command::Alloc { size: COPY as u64 }))
        .value0;
    (m, t, s, b)
}

/// Waits until the tenant holds nothing (an answer reaches its sink just before its
/// bytes are released).
fn assert_released(m: &Mediator, t: TenantId) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.usage(t).unwrap().held_bytes != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes still held",
            m.usage(t).unwrap().held_bytes
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn htod(s: u64, b: u64) -> Request {
    Request::new(
        s,
        Command::Htod {
            dst: b,
            offset: 0,
            data: vec![7; COPY],
        },
    )
}

/// Blocks the tenant's worker; returns the key that lets it go on.
fn block_worker(m: &Mediator, t: TenantId) -> mpsc::Sender<()> {
    let (entered_tx, entered) = mpsc::channel();
    let (open, open_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(entered_tx),
        open: Mutex::new(open_rx),
    });
    m.submit(t, Request::new(0, Command::Info), 0, gate);
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    open
}

#[test]
fn requests_past_the_budget_are_refused_with_limit_exceeded_while_queued_ones_count() {
    let (m, t, s, b) = setup();
    let open = block_worker(&m, t);
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(Answers(Mutex::new(tx)));
    let cost = request_cost(&htod(s, b).header());
    assert_eq!(cost, REQUEST_OVERHEAD + COPY as u64);
    let fit = (BUDGET - m.usage(t).unwrap().held_bytes) / cost;
    for token in 1..=fit + 5 {
        m.submit(t, htod(s, b), token, sink.clone());
        assert!(m.usage(t).unwrap().held_bytes <= BUDGET);
    }
    // The five that did not fit are answered at once, without waiting for the worker.
    for _ in 0..5 {
        let (token, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            token > fit,
            "token {token} of a request that fitted was answered"
        );
        assert_eq!(r.status, Status::LimitExceeded);
    }
    assert!(matches!(
        m.hold(t, cost),
        Err(HoldError::OverBudget { limit: BUDGET, .. })
    ));
    drop(open);
    for _ in 0..fit {
        let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, Status::Ok);
    }
    assert_released(&m, t);
}

#[test]
fn cancelling_drops_queued_requests_and_their_bytes_at_once() {
    let (m, t, s, b) = setup();
    let open = block_worker(&m, t);
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(Answers(Mutex::new(tx)));
    for token in 1..=4 {
        m.submit(t, htod(s, b), token, sink.clone());
    }
    assert!(m.usage(t).unwrap().held_bytes >= 4 * COPY as u64);
    // The worker is still busy: the queued copies go now, answered DEVICE_LOST.
    m.cancel_queued(t);
    for _ in 0..4 {
        let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, Status::DeviceLost);
    }
    let u = m.usage(t).unwrap();
    assert_eq!(u.cancelled, 4);
    assert!(u.held_bytes < COPY as u64, "{} bytes held", u.held_bytes);
    drop(open);
    // Nothing of the cancelled requests ran: the buffer keeps its zeros.
    let r = m.call(
        t,
        Request::new(
            s,
            Command::Dtoh {
                src: b,
                offset: 0,
                len: 16,
            },
        ),
    );
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.data, vec![0; 16]);
    assert_released(&m, t);
}

#[test]
fn a_reset_cancels_what_is_queued_instead_of_running_it() {
    let (m, t, s, b) = setup();
    let open = block_worker(&m, t);
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(Answers(Mutex::new(tx)));
    for token in 1..=4 {
        m.submit(t, htod(s, b), token, sink.clone());
    }
    let m2 = m.clone();
    let reset = std::thread::spawn(move || m2.reset_tenant(t));
    for _ in 0..4 {
        let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, Status::DeviceLost);
    }
    drop(open);
    reset.join().unwrap();
    assert_released(&m, t);
    let u = m.usage(t).unwrap();
    assert_eq!((u.sessions, u.mem_used), (0, 0));
}
