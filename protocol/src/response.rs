// SPDX-License-Identifier: Apache-2.0
//! The response header written at the end of every chain.

use crate::request::DecodeError;
use crate::wire::{put_u32, put_u64, u32_at, u64_at};
use crate::{Status, RESPONSE_HEADER_SIZE};

/// The fixed header the device writes into the last writable bytes of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub status: Status,
    /// Status-specific detail: the CUDA error code, the failing parameter index, ...
    pub detail: u32,
    /// First result: session id, buffer or module handle.
    pub value0: u64,
    /// Second result, operation-specific.
    pub value1: u64,
    /// Bytes written into the writable payload.
    pub written: u32,
}

impl ResponseHeader {
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_SIZE] {
        let mut b = [0u8; RESPONSE_HEADER_SIZE];
        put_u32(&mut b, 0, self.status as u32);
        put_u32(&mut b, 4, self.detail);
        put_u64(&mut b, 8, self.value0);
        put_u64(&mut b, 16, self.value1);
        put_u32(&mut b, 24, self.written);
        b
    }

    pub fn decode(b: &[u8]) -> Result<ResponseHeader, DecodeError> {
        if b.len() < RESPONSE_HEADER_SIZE {
            return Err(DecodeError::Truncated {
                needed: RESPONSE_HEADER_SIZE,
                got: b.len(),
            });
        }
        let raw = u32_at(b, 0);
        Ok(ResponseHeader {
            status: Status::from_u32(raw).ok_or(DecodeError::UnknownStatus(raw))?,
            detail: u32_at(b, 4),
            value0: u64_at(b, 8),
            value1: u64_at(b, 16),
            written: u32_at(b, 24),
        })
    }
}

/// A complete response: the header's fields plus the writable payload's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub detail: u32,
    pub value0: u64,
    pub value1: u64,
    pub data: Vec<u8>,
    /// Bytes a host-side transport already placed at the start of the writable payload
    /// (device-to-host data copied straight into the guest's buffers); `data` is then
    /// empty. Never on the wire by itself: it becomes the header's `written`.
    pub placed: u32,
}

impl Response {
    /// A success with no results.
    pub fn ok() -> Response {
        Response::error(Status::Ok, 0)
    }

    /// A success carrying one result value.
    pub fn value(v: u64) -> Response {
        Response {
            value0: v,
            ..Response::ok()
        }
    }

    /// A success carrying bytes for the writable payload.
    pub fn data(data: Vec<u8>) -> Response {
        Response {
            data,
            ..Response::ok()
        }
    }

    /// A failure with its detail code.
    pub fn error(status: Status, detail: u32) -> Response {
        Response {
            status,
            detail,
            value0: 0,
            value1: 0,
            data: Vec::new(),
            placed: 0,
        }
    }

    /// A success whose `bytes` of data were already placed in the writable payload.
    pub fn placed(bytes: u32) -> Response {
        Response {
            placed: bytes,
            ..Response::ok()
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The header to write once `data` has been copied into the writable payload.
    pub fn header(&self) -> ResponseHeader {
        ResponseHeader {
            status: self.status,
            detail: self.detail,
            value0: self.value0,
            value1: self.value1,
            written: u32::try_from(self.data.len())
                .unwrap_or(u32::MAX)
                .saturating_add(self.placed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = ResponseHeader {
            status: Status::QuotaExceeded,
            detail: 7,
            value0: u64::MAX,
            value1: 3,
            written: 99,
        };
        assert_eq!(ResponseHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn truncated_or_unknown_status_is_rejected() {
        assert_eq!(
            ResponseHeader::decode(&[0; 31]),
            Err(DecodeError::Truncated {
                needed: 32,
                got: 31
            })
        );
        let mut b = [0u8; 32];
        b[0] = 200;
        assert_eq!(
            ResponseHeader::decode(&b),
            Err(DecodeError::UnknownStatus(200))
        );
    }
}
