//! hoststack daemon library: uplinks ([`uplink`]), the smoltcp transport core
//! ([`stack`]), the session layer ([`session`]), the app registry ([`app`]),
//! configuration ([`config`]) and the event loop ([`daemon`]).
//!
//! [`stack`] and [`session`] are sans-IO: they take frames and time as input
//! and write frames to a [`stack::FrameTx`], so they are tested without root,
//! sockets or threads. OS-facing code lives in [`uplink`], [`sys`] and
//! [`daemon`].
pub mod app;
pub mod bufpool;
pub mod config;
pub mod daemon;
pub mod frag;
pub mod recovery;
pub mod session;
pub mod stack;
pub mod sys;
pub mod timers;
pub mod uplink;
