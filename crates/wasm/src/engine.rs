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
        let engine = Engine::new(&config(settings, Enabled::Yes, 2 << 20, 64 << 10))
            .or_else(|_| Engine::new(&config(settings, Enabled::No, 128 << 10, 16 << 10)))?;
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
