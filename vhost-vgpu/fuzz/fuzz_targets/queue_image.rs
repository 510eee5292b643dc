// SPDX-License-Identifier: Apache-2.0
//! Raw bytes as a guest's descriptor table, rings and RAM, through the backend's chain
//! checks, request decoding and completions (see `vhost_vgpu::testvmm::fuzz`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_vgpu::testvmm::fuzz::run(data);
});
