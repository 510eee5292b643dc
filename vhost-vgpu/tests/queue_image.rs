// SPDX-License-Identifier: Apache-2.0
//! The fuzz harness of `vhost-vgpu/fuzz` on stable: its seeds, random RAM images and
//! mutated seeds go through the backend's chain checks, decoding and completions, and
//! so do inputs the fuzzer once stopped on.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use vhost_vgpu::testvmm::fuzz;

/// Runs `input` on a thread and fails if it does not finish in time (a hang is a finding).
fn run_bounded(input: Vec<u8>) -> fuzz::Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    let shown = format!("{:?}", &input[..input.len().min(48)]);
    std::thread::spawn(move || {
        let _ = tx.send(fuzz::run(&input));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("input starting {shown} did not finish"))
}

#[test]
fn inputs_the_fuzzer_stopped_on_finish() {
    // Chains of one zero-length descriptor far outside RAM, EVENT_IDX on, and an available
    // index more than a queue ahead (now published as a full queue; see the transport
    // test for the index itself).
    let zero_len_outside = vec![
        7, 220, 0, 74, 6, 65, 42, 0, 255, 0, 0, 0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 0, 0,
    ];
    let o = run_bounded(zero_len_outside);
    assert_eq!((o.popped, o.used), (16, 16));
}

#[test]
fn random_ram_images_never_hang_or_over_return() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..300 {
        let len = rng.random_range(0..fuzz::PREFIX + fuzz::RAM_SIZE);
        let mut input = vec![0u8; len];
        rng.fill_bytes(&mut input);
        let o = run_bounded(input);
        assert!(o.used <= o.popped);
    }
}

#[test]
fn mutated_seeds_never_hang_or_over_return() {
    let seeds = fuzz::seeds();
    let mut rng = StdRng::seed_from_u64(12);
    let interesting: [u64; 8] = [0, 1, 31, 32, 80, 0xffff, u32::MAX as u64, u64::MAX];
    for _ in 0..1000 {
        let mut input = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..input.len());
            match rng.random_range(0..4) {
                0 => input[at] = rng.random(),
                1 => input[at] ^= 1 << rng.random_range(0..8),
                2 => {
                    let v = interesting[rng.random_range(0..interesting.len())].to_le_bytes();
                    let n = [2, 4, 8][rng.random_range(0..3)].min(input.len() - at);
                    input[at..at + n].copy_from_slice(&v[..n]);
                }
                _ => input.truncate(at.max(fuzz::PREFIX)),
            }
        }
        let o = run_bounded(input);
        assert!(o.used <= o.popped);
    }
}

/// A fuzzer finding: a chain whose one writable buffer covers the descriptor table and the
/// available ring gets its response header written over the available index (61 -> 0).
/// With EVENT_IDX the backend then finds the index "more than a queue ahead" and its
/// pop / re-enable loop spins forever in the vring worker.
#[test]
fn a_response_written_over_the_available_ring_does_not_hang_the_queue() {
    let input = vec![
        0x9b, 0xbf, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x10, 0x00, 0x00, 0x02,
        0x7b,
    ];
    let o = run_bounded(input);
    assert_eq!(o.used, 1);
}
