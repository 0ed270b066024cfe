//! Test-only upstream servers on 127.0.0.1:0.
#![forbid(unsafe_code)]
