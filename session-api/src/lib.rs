//! hoststack session API.
//!
//! This crate is the single source of truth for the shared-memory ABI between
//! the `hoststackd` daemon and applications: segment layout ([`segment`]),
//! single-producer/single-consumer byte FIFOs ([`fifo`]), fixed-size message
//! queues ([`mq`]), the event and request formats carried on them ([`msg`]),
//! the attach protocol spoken over the unix control socket ([`proto`]), and the
//! native client API that applications use ([`client`]).
//!
//! Everything an app writes into shared memory is untrusted by the daemon: the
//! FIFO and queue handles keep their own copy of the index they own and check
//! every index they read from the other side.

pub mod client;
pub mod fasthash;
pub mod fifo;
pub mod mq;
pub mod msg;
pub mod proto;
pub mod segment;
pub mod shm;
pub mod sys;
