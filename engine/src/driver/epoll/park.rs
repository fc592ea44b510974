//! Driven shards on epoll: the epoll descriptor is what the application
//! waits on, a timer descriptor in its set makes it readable at the
//! earliest deadline, and a reap collects what is ready without sleeping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::{syscall, Epoll, IN, PARK_TAG};
use crate::driver::{KeyMap, OpMemory};

impl Epoll {
    /// For a driven shard: adds the park timer to the epoll set.
    pub fn enable_parking(&mut self) -> io::Result<()> {
        // SAFETY: timerfd_create takes no pointers; the descriptor is owned
        // here from birth.
        let fd = syscall!(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ev = libc::epoll_event {
            events: IN | libc::EPOLLET as u32,
            u64: PARK_TAG,
        };
        // SAFETY: `ev` is a live epoll_event for the call.
        syscall!(unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                timer.as_raw_fd(),
                &mut ev,
            )
        })?;
        self.park = Some(timer);
        Ok(())
    }

    /// Submits, then collects what is ready without sleeping: fired timers,
    /// and one epoll wait with a zero timeout.
    pub fn reap(&mut self, mem: &mut KeyMap<OpMemory>) -> io::Result<()> {
        self.submit(mem)?;
        self.expire(Instant::now(), mem);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let cap = self.events.len() as libc::c_int;
        // SAFETY: `events` is a live buffer of `cap` entries the kernel
        // fills; `zero` lives for the call.
        let n = unsafe {
            libc::epoll_pwait2(
                self.ep.as_raw_fd(),
                self.events.as_mut_ptr(),
                cap,
                &zero,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(())
            } else {
                Err(e)
            };
        }
        self.dispatch(n as usize, mem);
        self.expire(Instant::now(), mem);
        Ok(())
    }

    /// Arms the park timer (see `park`): at once when completions are queued
    /// or a listener has accepts left over, else at the earliest deadline,
    /// else never (a readiness report wakes the waiter by itself).
    pub fn prepare_wait(&mut self, ready: bool) -> io::Result<()> {
        let Some(timer) = self.park.as_ref().map(|t| t.as_raw_fd()) else {
            return Ok(());
        };
        let now = Instant::now();
        let at = if ready || self.has_work() {
            Some(now)
        } else {
            self.next_deadline()
        };
        if at.is_some() && at == self.park_at && at != Some(now) {
            return Ok(());
        }
        let after = at.map(|a| a.saturating_duration_since(now));
        // 0 would disarm it: "now" is one nanosecond.
        let value = match after {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            Some(d) => libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: if d.is_zero() {
                    1
                } else {
                    libc::c_long::from(d.subsec_nanos() as i32)
                },
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` lives for the call; the old value is not asked for.
        syscall!(unsafe { libc::timerfd_settime(timer, 0, &spec, std::ptr::null_mut()) })?;
        self.park_at = at;
        Ok(())
    }

    /// Whether operations were posted and not yet submitted.
    #[cfg(feature = "tokio")]
    pub fn has_queued(&self) -> bool {
        !self.sq.is_empty()
    }

    /// Completions to drain, accepts left over, or operations to submit.
    pub fn has_work(&self) -> bool {
        !self.cq.is_empty() || !self.ready.is_empty() || !self.sq.is_empty()
    }

    /// The epoll descriptor (readable while an event waits).
    pub fn fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }
}
