//! The wasmtime engine a runtime's WebAssembly functions share: its configuration (epoch
//! interruption, the pooling allocator), the linker that offers WASI preview 1 and nothing
//! else, the per-instance memory limit, and the thread that advances the epoch.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::Thread,
    time::Duration,
};

use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig,
    ResourceLimiter,
};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::WasmSettings;

/// What a store holds for one instance.
pub(crate) struct Guest {
    pub wasi: WasiP1Ctx,
    pub limits: MemoryLimit,
}

/// The engine, its linker and its epoch.
pub(crate) struct Machine {
    pub engine: Engine,
    pub linker: Linker<Guest>,
    pub ticker: Ticker,
    /// The suffix of compiled files this engine loads.
    pub tag: String,
}

impl Machine {
    pub fn new(settings: &WasmSettings) -> wasmtime::Result<Self> {
        // An instance's memory and table are reset for the next by rewriting the pages it
        // dirtied (found with Linux's PAGEMAP_SCAN, 6.7+), up to 2 MiB and 64 KiB; only beyond
        // are pages given back with madvise, which costs every thread of the runtime a TLB
        // flush. Without the ioctl the first 128 KiB and 16 KiB are rewritten whole
        // (BENCHMARKS.md, issue 16).
        let before = anonymous_mappings();
        let engine = Engine::new(&config(settings, Enabled::Yes, 2 << 20, 64 << 10))
            .or_else(|_| Engine::new(&config(settings, Enabled::No, 128 << 10, 16 << 10)))?;
        exclude_from_fork(&before);
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |guest: &mut Guest| &mut guest.wasi)?;
        let ticker = Ticker::spawn(engine.clone(), settings.epoch_tick)?;
        Ok(Self {
            tag: crate::compiled::engine_tag(&engine),
            engine,
            linker,
            ticker,
        })
    }
}

/// An instance's async stack. An odd size on purpose: the pool's stacks are then told from
/// thread stacks (2 or 8 MiB) in `/proc/self/maps` (see `exclude_from_fork`).
const ASYNC_STACK_BYTES: usize = (2 << 20) + (64 << 10);

/// One anonymous mapping of this process.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Readable and writable (a stack), or neither (a reservation or a guard page).
    writable: bool,
}

/// This process's anonymous mappings, from `/proc/self/maps`.
fn anonymous_mappings() -> Vec<Mapping> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            // offset, device, inode; a path after them means not anonymous.
            if fields.nth(3).is_some() {
                return None;
            }
            Some(Mapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                writable: perms.starts_with("rw"),
            })
        })
        .collect()
}

/// Keeps the engine's reservations out of forked children. A fork copies every mapping of the
/// runtime, which exec then tears down: the pool's stacks and their guard pages are two
/// thousand mappings, which took a plugin's cold start from 4-5 ms to 7-9 ms in a runtime that
/// had made its WebAssembly engine, when plugins were still forked (BENCHMARKS.md, issue 15;
/// they are now started without a copy, see mycelium-plugin's `spawn`, but any other child
/// the runtime forks gains the same). A forked child only execs, and never touches
/// WebAssembly memory. Only mappings made while the engine was made, and shaped
/// like its reservations (1 GiB or more, or a stack of exactly `ASYNC_STACK_BYTES` and the
/// guard page under it), are marked: a thread's stack must stay in a child it forks.
fn exclude_from_fork(before: &[Mapping]) {
    const LARGE: usize = 1 << 30;
    let page = 4096;
    let stack = ASYNC_STACK_BYTES.div_ceil(page) * page;
    let new: Vec<Mapping> = anonymous_mappings()
        .into_iter()
        .filter(|m| !before.contains(m))
        .collect();
    let is_stack = |m: &Mapping| m.writable && m.end - m.start == stack;
    for (i, mapping) in new.iter().enumerate() {
        let size = mapping.end - mapping.start;
        let guard_of_stack = !mapping.writable
            && size == page
            && new
                .get(i + 1)
                .is_some_and(|next| next.start == mapping.end && is_stack(next));
        if size >= LARGE && !mapping.writable || is_stack(mapping) || guard_of_stack {
            if let Err(error) = dont_fork(mapping.start, size) {
                tracing::debug!(%error, "cannot keep a WebAssembly reservation out of forked plugins");
            }
        }
    }
}

#[allow(unsafe_code)]
fn dont_fork(start: usize, length: usize) -> std::io::Result<()> {
    // SAFETY: `madvise` with `MADV_DONTFORK` changes only what a future fork copies; the
    // range is a whole mapping read from /proc/self/maps and stays mapped in this process.
    if unsafe { libc::madvise(start as *mut libc::c_void, length, libc::MADV_DONTFORK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The engine's configuration; `keep_memory` and `keep_table` bytes of an instance's memory
/// and table are reset in place (`madvise` beyond).
fn config(
    settings: &WasmSettings,
    pagemap: Enabled,
    keep_memory: usize,
    keep_table: usize,
) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    let instances = settings.max_instances.max(1);
    pool.total_core_instances(instances)
        .total_memories(instances)
        .total_tables(instances)
        .total_stacks(instances)
        .max_memory_size(usize::try_from(settings.max_memory_mb << 20).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(keep_memory)
        .table_keep_resident(keep_table)
        .pagemap_scan(pagemap);
    let mut config = Config::new();
    config
        .async_stack_size(ASYNC_STACK_BYTES)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// The memory one instance may have. Going past it traps the guest (rather than failing
/// `memory.grow` quietly, which most guests answer with an unhelpful abort), and the flag
/// lets the call say why.
pub(crate) struct MemoryLimit {
    pub bytes: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            self.exceeded = true;
            wasmtime::bail!("memory limit reached");
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Table entries one instance may have (function pointers; compilers emit a few thousand).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Ticks of no running instance after which the epoch thread sleeps until the next call.
const IDLE_TICKS: u32 = 100;

/// Advances the engine's epoch every tick while instances run, so each running guest reaches
/// its epoch check (yield, deadline) within a tick; parks after a while without calls, so an
/// idle runtime has no timer waking it.
pub(crate) struct Ticker {
    state: Arc<TickState>,
    thread: Thread,
}

struct TickState {
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
}

impl Ticker {
    fn spawn(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let state = Arc::new(TickState {
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let shared = state.clone();
        let handle = std::thread::Builder::new()
            .name("mycelium-wasm-epoch".into())
            .spawn(move || {
                let mut idle = 0;
                while !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                    if shared.running.load(Ordering::SeqCst) > 0 {
                        idle = 0;
                        continue;
                    }
                    idle += 1;
                    if idle < IDLE_TICKS {
                        continue;
                    }
                    idle = 0;
                    // Either a call starting now sees `parked` and unparks us, or we see
                    // its count and do not park.
                    shared.parked.store(true, Ordering::SeqCst);
                    if shared.running.load(Ordering::SeqCst) == 0
                        && !shared.stop.load(Ordering::SeqCst)
                    {
                        std::thread::park();
                    }
                    shared.parked.store(false, Ordering::SeqCst);
                }
            })?;
        Ok(Self {
            state,
            thread: handle.thread().clone(),
        })
    }

    /// Counts a running instance until the guard drops.
    pub fn running(&self) -> Running<'_> {
        if self.state.running.fetch_add(1, Ordering::SeqCst) == 0
            && self.state.parked.load(Ordering::SeqCst)
        {
            self.thread.unpark();
        }
        Running(self)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// An instance running; see [`Ticker::running`].
pub(crate) struct Running<'a>(&'a Ticker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.state.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One mapping of `/proc/self/smaps`: where, whether writable, whether forks leave it out.
    struct Smap {
        start: usize,
        end: usize,
        writable: bool,
        dont_fork: bool,
    }

    fn smaps() -> Vec<Smap> {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut maps: Vec<Smap> = Vec::new();
        for line in text.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if let Some(last) = maps.last_mut() {
                    last.dont_fork = flags.split_whitespace().any(|f| f == "dc");
                }
                continue;
            }
            let mut fields = line.split_whitespace();
            let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            maps.push(Smap {
                start,
                end,
                writable: fields.next().is_some_and(|p| p.starts_with("rw")),
                dont_fork: false,
            });
        }
        maps
    }

    #[test]
    fn the_pools_stacks_stay_out_of_forked_children_and_thread_stacks_do_not() {
        let settings = WasmSettings::default();
        let _machine = Machine::new(&settings).unwrap();
        let maps = smaps();
        let stack = ASYNC_STACK_BYTES.div_ceil(4096) * 4096;
        // Other tests may be making engines of their own meanwhile: count, don't demand all.
        // The pool's topmost stack merges with the writable mapping above it into one
        // mapping of another size, copied as one.
        let excluded_stacks = maps
            .iter()
            .filter(|m| m.writable && m.end - m.start == stack && m.dont_fork)
            .count();
        assert!(
            excluded_stacks >= settings.max_instances as usize - 1,
            "{excluded_stacks} of the pool's stacks left out of forks"
        );
        let here = &settings as *const WasmSettings as usize;
        let own = maps
            .iter()
            .find(|m| m.start <= here && here < m.end)
            .expect("this thread's stack is mapped");
        assert!(!own.dont_fork, "a thread's stack must stay in its forks");
        assert!(
            maps.iter()
                .filter(|m| !m.dont_fork && m.end - m.start == stack)
                .count()
                < 64,
            "the stacks are what made forks slow"
        );
    }
}
