//! `libvcl_preload.so`: an LD_PRELOAD shim that serves the AF_INET/AF_INET6
//! TCP and UDP sockets of unmodified programs through hoststack, leaving
//! every other fd (files, pipes, AF_UNIX, netlink, DNS on port 53...) to
//! the kernel. Start programs with `hoststack run -- CMD ARGS...`.
//!
//! Design in brief (details in docs/architecture.md):
//! - every hoststack socket is backed by a real kernel socket created by
//!   `socket()` (the placeholder; an accepted connection gets a dup of a
//!   per-family template socket): fd numbers, limits,
//!   close-on-exec and dup come from the kernel, and a socket that must
//!   stay in the kernel (DNS, loopback UDP, an option the stack cannot
//!   honour) simply keeps using its placeholder;
//! - one hoststack worker per process, shared by its threads under one
//!   lock; fork children attach as their own app and take over listeners
//!   on first use (nginx's master/worker model);
//! - epoll/poll/select block in the kernel on the worker's eventfd plus
//!   the app's kernel fds: no busy polling.
//!
//! `unsafe` lives in `real` (dlsym), `sys` (futex lock, sockaddr) and
//! `hooks` (the C ABI).

pub mod config;
mod hooks;
mod iomux;
mod ops;
mod real;
mod sockopt;
pub mod state;
mod sys;

/// Registered from the ELF constructor: keep the shim consistent over fork.
extern "C" fn init() {
    state::note_pid();
    state::env();
    // SAFETY: registering plain extern "C" callbacks.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    session_api::shm::set_fd_placer(state::place_own_fd);
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" fn fork_prepare() {
    // No other thread may be inside the shim while the address space is copied.
    state::STATE.raw_lock();
}

extern "C" fn fork_parent() {
    // The shim's own work: descriptors it drops are really closed.
    let _inside = hooks::enter();
    // SAFETY: fork_prepare took the lock; no guard exists.
    unsafe {
        if let Some(s) = state::STATE.get_locked().as_mut() {
            s.after_fork_parent();
        }
        state::STATE.raw_unlock();
    }
}

extern "C" fn fork_child() {
    state::note_pid();
    let _inside = hooks::enter();
    // SAFETY: the child has one thread; the lock copy is ours.
    unsafe {
        if let Some(s) = state::STATE.get_locked().as_mut() {
            s.after_fork_child();
        }
        state::STATE.force_unlock();
    }
}
