//! Harness pieces shared by the libFuzzer targets in `fuzz_targets/`.
//!
//! - [`input`]: the byte format every target reads (little-endian integers in order,
//!   explicit lengths), and the writer the seed corpus is made with.
//! - [`device`]: device configurations and well-formed requests from input bytes, and the
//!   checks every answer of the device must pass.
//! - [`guest`]: guest memory with a hole and the split rings of both queues, for the
//!   descriptor-chain target.
//! - [`hostile`]: a hostile device for the driver target: a `Transport` and `Hal` whose
//!   config, features, status and every used entry come from the input.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod device;
pub mod guest;
pub mod hostile;
pub mod input;
pub mod seeds;
