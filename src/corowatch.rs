//! corowatch's native half, called by `lua/corowatch.lua`: the patched
//! resume and yield, watching the running coroutine, the clock, and the
//! dispatcher the hook calls.

use std::ffi::c_int;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, MultiValue, Table, Thread, Value};

use crate::allowhook;
use crate::clock;
use crate::gate::{self, WhenClosed};
use crate::hook::{self, ANCHORS_KEY, DISPATCH_KEY};
use crate::resume;
use crate::stack_room::Room;
use crate::state;
use crate::watch::Watch;

/// The VM is closing: corowatch's functions that cannot do without it
/// raise this; those about the user's hook do nothing.
const CLOSING: &str = "corowatch: the Lua state is closing";

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let corowatch = lua.create_table()?;
    let vm = state::vm(lua)?;
    allowhook::calibrate(lua)?;
    let raise = WhenClosed::Raise(CLOSING);
    let nothing = WhenClosed::Nothing;
    gate::set_all(
        lua,
        &corowatch,
        &vm,
        vec![
            (
                "make_functions",
                lua.create_function(make_functions)?,
                raise,
            ),
            ("watch_running", lua.create_function(watch_running)?, raise),
            ("reset", lua.create_function(reset)?, nothing),
            (
                "set_dispatcher",
                lua.create_function(set_dispatcher)?,
                raise,
            ),
            (
                "set_user_hook",
                lua.create_function(set_user_hook)?,
                nothing,
            ),
            (
                "get_user_hook",
                lua.create_function(get_user_hook)?,
                nothing,
            ),
            #[cfg(feature = "luajit")]
            (
                "watch_dispatch",
                lua.create_function(watch_dispatch)?,
                raise,
            ),
        ],
    )?;
    // Plain C functions, which work at any point of `lua_close`.
    for (name, function) in [
        ("gettime", lua_gettime as ffi::lua_CFunction),
        ("running_thread", lua_running_thread),
        ("set_hooks", lua_set_hooks),
        ("stack_signature", lua_stack_signature),
    ] {
        // SAFETY: pushes one C function for mlua to take.
        let function = unsafe {
            lua.exec_raw::<Function>((), |state| ffi::lua_pushcfunction(state, function))?
        };
        corowatch.set(name, function)?;
    }
    Ok(corowatch)
}

fn state_of(thread: &Thread) -> *mut ffi::lua_State {
    thread.to_pointer() as *mut ffi::lua_State
}

fn seconds(value: f64, what: &str) -> mlua::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|limit| !limit.is_zero())
        .ok_or_else(|| mlua::Error::runtime(format!("{what} must be a positive number of seconds")))
}

/// `make_functions(resume, watched, killed, close)` -> resume, yield, close
///
/// The patched `coroutine.resume` and `coroutine.yield` (see
/// [`crate::resume`]), over the original resume, the `co -> settings` table
/// and the `co -> kill message` table; and, given Lua 5.4's original
/// `coroutine.close`, the patched close over it and the same tables (nil
/// without one).
fn make_functions(
    lua: &Lua,
    (original, watched, killed, original_close): (Function, Table, Table, Option<Function>),
) -> mlua::Result<MultiValue> {
    // The closures hold the VM as a raw pointer: this reference is leaked on
    // purpose, so the Vm outlives every closure (they may run during
    // `lua_close`, after the VM's guard is gone; a closed Vm is inert).
    let vm = Arc::into_raw(state::vm(lua)?) as usize;
    let anchors = anchors(lua)?;
    // SAFETY: the closures consume exactly the values mlua pushed for them
    // and leave the function they make on the stack for mlua to take.
    // `exec_raw` runs each in a C function under `lua_pcall`, with those
    // values as its arguments and nothing pushed yet: the room Lua gives a
    // C function is theirs.
    unsafe {
        let close = match original_close {
            Some(original_close) => Some(lua.exec_raw::<Function>(
                (
                    original_close,
                    watched.clone(),
                    killed.clone(),
                    anchors.clone(),
                ),
                move |state| resume::push_close(state, vm as *const _, Room::on_entry()),
            )?),
            None => None,
        };
        let watched_for_set = watched.clone();
        let resume = lua
            .exec_raw::<Function>((original, watched, killed.clone(), anchors), move |state| {
                resume::push_resume(state, vm as *const _, Room::on_entry())
            })?;
        let yield_ = lua.exec_raw::<Function>(killed, move |state| {
            resume::push_yield(state, vm as *const _, Room::on_entry())
        })?;
        let set_watch = lua.exec_raw::<Function>(watched_for_set, move |state| {
            resume::push_set_watch(state, vm as *const _, Room::on_entry())
        })?;
        lua.pack_multi((resume, yield_, close, set_watch))
    }
}

/// The VM's `depth -> coroutine` table for the running chain, created once
/// and kept in the registry, where the hook finds it.
fn anchors(lua: &Lua) -> mlua::Result<Table> {
    const NAME: &str = "corowatch.anchors";
    if let Some(table) = lua.named_registry_value::<Option<Table>>(NAME)? {
        return Ok(table);
    }
    let table = lua.create_table()?;
    lua.set_named_registry_value(NAME, &table)?;
    // SAFETY: pops the table mlua pushed into the registry under a static key.
    unsafe {
        lua.exec_raw::<()>(&table, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&ANCHORS_KEY));
        })?;
    }
    Ok(table)
}

/// `watch_running([co], [kill], [warn])` -> whether `co` (default: the
/// running thread) is running: its watch starts now; otherwise it starts
/// when `co` is next resumed.
fn watch_running(
    lua: &Lua,
    (co, kill, warn): (Option<Thread>, Option<f64>, Option<f64>),
) -> mlua::Result<bool> {
    let kill = kill.map(|kill| seconds(kill, "kill limit")).transpose()?;
    let warn = warn.map(|warn| seconds(warn, "warn limit")).transpose()?;
    let limit = |limit: Option<Duration>| limit.map_or(clock::NEVER, clock::nanos);
    let watch = Watch::start(limit(kill), limit(warn), clock::now());
    let co = co.unwrap_or_else(|| lua.current_thread());
    let running = lua.current_thread();
    let vm = state::vm(lua)?;
    let (co_state, running_state) = (state_of(&co), state_of(&running));
    // SAFETY: as for `watch_running` below.
    let mut wanted = unsafe { vm.watch_anchors(co_state, running_state) };
    // Anchored first (that may raise), then watched, so that the chain
    // names no thread that could stop running unseen without an anchor.
    // Anchoring runs no Lua code, so the chain asks again for other
    // anchors only if a finalizer changed it meanwhile: a few rounds.
    for _ in 0..8 {
        let anchors = anchors(lua)?;
        if let Some(depth) = wanted.state_at {
            anchors.raw_set(depth, &co)?;
        }
        if let Some(depth) = wanted.running_at {
            anchors.raw_set(depth, &running)?;
        }
        // SAFETY: `co` is held by this call, so alive, and `running` is the
        // running thread; both belong to this VM, which this OS thread runs.
        match unsafe { vm.watch_running(co_state, running_state, watch, wanted) } {
            Ok(watched) => return Ok(watched),
            Err(needed) => wanted = needed,
        }
    }
    Err(mlua::Error::runtime(
        "corowatch.watch: the running coroutines kept changing",
    ))
}

/// `reset(depth)`: the warn callback of the coroutine at `depth` asked for
/// more time.
fn reset(lua: &Lua, depth: usize) -> mlua::Result<()> {
    // SAFETY: a Lua call, so on the VM's own thread, outside every other
    // use of its chain.
    unsafe { state::vm(lua)?.reset(depth) };
    Ok(())
}

/// `running_thread()`: the running thread, main thread included (Lua 5.1's
/// `coroutine.running()` gives nil there).
unsafe extern "C-unwind" fn lua_running_thread(state: *mut ffi::lua_State) -> std::ffi::c_int {
    // SAFETY: called by Lua, nothing pushed yet.
    let _result = Room::<1>::on_entry();
    ffi::lua_pushthread(state);
    1
}

/// `set_hooks(on)`: turns the running thread's hooks on or off (see
/// [`crate::allowhook`]); returns whether it could (PUC Lua only).
unsafe extern "C-unwind" fn lua_set_hooks(state: *mut ffi::lua_State) -> std::ffi::c_int {
    let on = ffi::lua_toboolean(state, 1) != 0;
    // SAFETY: `state` is the running thread, on its OS thread. Called from
    // the dispatcher, inside the hook, hooks turned on let the hook nest:
    // the hook's frame holds nothing to drop and no lock while it calls
    // the dispatcher (see `crate::hook::handle`), so a nested hook may raise
    // through it.
    let done = allowhook::set(state, on);
    // SAFETY: called by Lua, nothing pushed yet.
    let _result = Room::<1>::on_entry();
    ffi::lua_pushboolean(state, c_int::from(done));
    1
}

/// `stack_signature(level)`: a number that names the call stack from
/// `level` down (levels as `debug.traceback` counts them): where each
/// frame's function was defined and the line it is at. Two calls from the
/// same place through the same calls get the same number, so `watch` can
/// tell that its traceback would be the one it built last, without
/// building it (a string of a few hundred bytes per watch otherwise, not
/// interned from 5.2 on). It neither allocates nor raises.
unsafe extern "C-unwind" fn lua_stack_signature(state: *mut ffi::lua_State) -> c_int {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut level = ffi::lua_tointeger(state, 1).max(0) as c_int;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |value: u64| {
        hash = (hash ^ value).wrapping_mul(PRIME);
    };
    let mut ar = std::mem::MaybeUninit::<ffi::lua_Debug>::zeroed();
    // SAFETY: `state` is the running thread; `lua_getstack` and
    // `lua_getinfo` with "Sl" only read its frames and their functions'
    // prototypes (the source string they point to is the prototype's,
    // alive while the frame is), and fill `ar`.
    while ffi::lua_getstack(state, level, ar.as_mut_ptr()) != 0 {
        ffi::lua_getinfo(state, c"Sl".as_ptr(), ar.as_mut_ptr());
        let info = ar.assume_init_ref();
        mix(info.source as usize as u64);
        mix(info.linedefined as u64);
        mix(info.currentline as u64);
        level += 1;
    }
    mix(level as u64);
    // SAFETY: called by Lua, nothing pushed yet.
    let _result = Room::<1>::on_entry();
    // A Lua 5.1 number is a double: keep 53 bits, exact there.
    ffi::lua_pushnumber(state, (hash >> 11) as ffi::lua_Number);
    1
}

/// `gettime()`: seconds on a monotonic clock.
unsafe extern "C-unwind" fn lua_gettime(state: *mut ffi::lua_State) -> std::ffi::c_int {
    // SAFETY: called by Lua, nothing pushed yet.
    let _result = Room::<1>::on_entry();
    ffi::lua_pushnumber(state, gettime());
    1
}

/// Seconds on a monotonic clock, from an arbitrary origin.
fn gettime() -> f64 {
    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
    // Start well above zero so that differences never look like a reset clock.
    1.0e3 + ORIGIN.elapsed().as_secs_f64()
}

/// LuaJIT: `watch_dispatch(f, limit)`: makes the first four upvalues of
/// the Lua function `f` a dispatch probe (a count, a limit, a coroutine,
/// the chain's length: see [`crate::probe`]), or tells the probe
/// registered already that its loop delivers with limits as small as
/// `limit` seconds. Returns whether `f` is a probe: false if its first,
/// second and fourth upvalues are not closed numbers (it was called
/// before the function that declares them returned), or if the VM has no
/// room for another probe.
#[cfg(feature = "luajit")]
fn watch_dispatch(lua: &Lua, (probe, limit): (Function, f64)) -> mlua::Result<bool> {
    use crate::hook::PROBES_KEY;
    use crate::probe::{locate, MAX_PROBES};
    use crate::vm::Registered;
    let limit = clock::nanos(seconds(limit, "corowatch.watch_dispatch: limit")?);
    let vm = state::vm(lua)?;
    let vm_at = Arc::as_ptr(&vm) as usize;
    // SAFETY: the closure runs in a C function under `lua_pcall` with `f`
    // at index 1 and the room Lua gives a C function; it holds only
    // `Copy` values (the VM is held by `vm`, in this frame, which a Lua
    // error does not skip), and leaves one boolean. The probe's function
    // is anchored before the VM reads its upvalues from another thread.
    let registered = unsafe {
        lua.exec_raw::<bool>(probe, move |state| {
            let vm = &*(vm_at as *const crate::vm::Vm);
            let is_probe =
                ffi::lua_iscfunction(state, 1) == 0 && !ffi::lua_getupvalue(state, 1, 4).is_null();
            if is_probe {
                ffi::lua_pop(state, 1);
            }
            let found = if is_probe {
                locate(state, 1, 1)
                    .zip(locate(state, 1, 2))
                    .zip(locate(state, 1, 4))
            } else {
                None
            };
            // The anchors' table, with a slot for every probe made ahead:
            // anchoring there cannot fail once the probe is registered.
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&PROBES_KEY));
            if ffi::lua_type(state, -1) != ffi::LUA_TTABLE {
                ffi::lua_pop(state, 1);
                ffi::lua_createtable(state, MAX_PROBES as c_int, 0);
                for slot in 1..=MAX_PROBES {
                    ffi::lua_pushboolean(state, 0);
                    ffi::lua_rawseti(state, -2, slot as ffi::lua_Integer);
                }
                ffi::lua_pushvalue(state, -1);
                ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&PROBES_KEY));
            }
            let registered = match found {
                Some(((count, limit_at), chain_length_at)) => {
                    vm.add_probe(count, limit_at, chain_length_at, limit)
                }
                None => Registered::Refused,
            };
            if let Registered::New(index) = registered {
                ffi::lua_pushvalue(state, 1);
                ffi::lua_rawseti(state, -2, index as ffi::lua_Integer + 1);
            }
            ffi::lua_settop(state, 0);
            ffi::lua_pushboolean(state, c_int::from(registered != Registered::Refused));
        })?
    };
    drop(vm);
    Ok(registered)
}

/// `set_dispatcher(f)`: the function the hook calls with (event, co, depth).
fn set_dispatcher(lua: &Lua, dispatcher: Function) -> mlua::Result<()> {
    state::vm(lua)?;
    // SAFETY: the closure pops the one function mlua pushed for it into the
    // registry under a static key.
    unsafe {
        lua.exec_raw::<()>(dispatcher, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&DISPATCH_KEY));
        })
    }
}

/// The thread a call of a debug function is about: its first argument if
/// that is a thread, else the running thread.
fn hook_target(lua: &Lua, args: &MultiValue) -> Thread {
    match args.front() {
        Some(Value::Thread(co)) => co.clone(),
        _ => lua.current_thread(),
    }
}

/// Calls `function(args)` in protected mode: `true` and its results, or
/// `false` and its error value as it raised it (mlua's own `call` would
/// add a traceback to the message).
fn call_protected(lua: &Lua, function: Function, args: MultiValue) -> mlua::Result<MultiValue> {
    // SAFETY: the closure runs in mlua's protected call with `function` and
    // `args` on its stack, and holds nothing with a destructor: `lua_pcall`
    // catches what `function` raises; `luaL_checkstack` may raise, which
    // mlua's protected call catches.
    unsafe {
        lua.exec_raw::<MultiValue>((function, args), |state| {
            let nargs = ffi::lua_gettop(state) - 1;
            let status = ffi::lua_pcall(state, nargs, ffi::LUA_MULTRET, 0);
            ffi::luaL_checkstack(state, 1, std::ptr::null());
            ffi::lua_pushboolean(state, c_int::from(status == ffi::LUA_OK));
            ffi::lua_insert(state, 1);
        })
    }
}

/// `set_user_hook(sethook, ...)` -> `true`, then as [`call_protected`]: calls
/// Lua's own `debug.sethook(...)` for the user. Another OS thread arms no
/// hook meanwhile (see `Arming::begin_user_change`), and what our hook
/// replaced becomes the user's new hook. One native call, so that nothing
/// (a kill landing in Lua code) comes between the change's start and end.
fn set_user_hook(lua: &Lua, (sethook, args): (Function, MultiValue)) -> mlua::Result<MultiValue> {
    let target = hook_target(lua, &args);
    let vm = state::vm(lua)?;
    vm.begin_user_hook_change();
    let outcome = call_protected(lua, sethook, args);
    // SAFETY: `target` is held here and belongs to this VM, which this OS
    // thread runs.
    unsafe { vm.user_hook_changed(state_of(&target)) };
    Ok(MultiValue::from_iter(
        [Value::Boolean(true)].into_iter().chain(outcome?),
    ))
}

/// `get_user_hook(gethook, ...)` -> `true`, then as [`call_protected`]: calls
/// Lua's own `debug.gethook(...)` with the user's hook put back in place of
/// ours for the call, so that it shows the user's.
fn get_user_hook(lua: &Lua, (gethook, args): (Function, MultiValue)) -> mlua::Result<MultiValue> {
    let target = hook_target(lua, &args);
    let vm = state::vm(lua)?;
    // SAFETY: as in `set_user_hook`.
    let lent = unsafe { vm.lend_user_hook(state_of(&target)) };
    let outcome = call_protected(lua, gethook, args);
    if lent {
        // SAFETY: as above.
        unsafe { vm.user_hook_changed(state_of(&target)) };
    }
    Ok(MultiValue::from_iter(
        [Value::Boolean(true)].into_iter().chain(outcome?),
    ))
}
