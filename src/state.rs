//! The Lua side of a VM's bookkeeping: the weak tables that map threads to
//! ids, guards and interrupt handlers, and registering a thread.

use std::ffi::c_void;
use std::sync::Arc;

use mlua::{ffi, AnyUserData, LightUserData, Lua, Table, Thread, UserData};

use crate::errors;
use crate::hook::{self, HANDLERS_KEY, IDS_KEY};
use crate::registry::{self, Id, Target};
use crate::vm::{self, Vm};

const VM_GUARD: &str = "corowatch.vm";
const ANCHOR: &str = "corowatch.anchor";
const IDS: &str = "corowatch.ids";
const GUARDS: &str = "corowatch.guards";
const HANDLERS: &str = "corowatch.handlers";

/// Ties a target to the life of its Lua thread: finalized with the thread.
struct ThreadGuard(Arc<Target>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.0.vm.target_died(self.0.id);
    }
}

impl UserData for ThreadGuard {}

/// The VM that `lua` belongs to, set up on first use.
pub fn vm(lua: &Lua) -> mlua::Result<Arc<Vm>> {
    // mlua keeps app data per VM (main state): the fast path.
    if let Some(vm) = lua.app_data_ref::<Arc<Vm>>() {
        return Ok(vm.clone());
    }
    // SAFETY: the closure only pushes one light userdata onto the stack
    // mlua hands it, which belongs to the running thread.
    let key = unsafe {
        lua.exec_raw::<LightUserData>((), |state| {
            ffi::lua_pushlightuserdata(state, vm::registry_key(state) as *mut c_void);
        })?
    };
    let vm = match vm::of_key(key.0 as usize) {
        Some(vm) => vm,
        None => set_up(lua, key.0 as usize)?,
    };
    lua.set_app_data(vm.clone());
    Ok(vm)
}

fn set_up(lua: &Lua, key: usize) -> mlua::Result<Arc<Vm>> {
    let anchor = lua.create_thread(lua.create_function(|_, ()| Ok(()))?)?;
    lua.set_named_registry_value(ANCHOR, &anchor)?;
    // SAFETY: the anchor is a thread of this VM (whose key this is), made
    // on the OS thread that runs it, and the registry holds it until the
    // VM's guard closes the Vm.
    let vm = unsafe { vm::create(key, anchor.to_pointer() as *mut ffi::lua_State) };
    lua.set_named_registry_value(VM_GUARD, VmGuard(vm.clone()))?;
    warm_up_metatable(lua, &vm, ThreadGuard)?;

    let ids = weak_keyed_table(lua)?;
    let handlers = weak_keyed_table(lua)?;
    lua.set_named_registry_value(IDS, &ids)?;
    lua.set_named_registry_value(GUARDS, weak_keyed_table(lua)?)?;
    lua.set_named_registry_value(HANDLERS, &handlers)?;
    // SAFETY: each closure pops the one table mlua pushed for it into the
    // registry under a static key; nothing else on the stack is touched.
    unsafe {
        lua.exec_raw::<()>(ids, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&IDS_KEY));
        })?;
        lua.exec_raw::<()>(handlers, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&HANDLERS_KEY));
        })?;
    }
    {
        // The closure borrows the Arc through a plain address: a closure
        // that owned a clone would leak it if the call raised (a longjmp
        // skips its drop).
        let vm_ref = &vm as *const Arc<Vm> as usize;
        // SAFETY: `state` is the running thread of this VM, on our OS thread;
        // `vm` outlives the call, which runs before `exec_raw` returns.
        unsafe {
            lua.exec_raw::<()>((), move |state| {
                crate::allocator::install(state, &*(vm_ref as *const Arc<Vm>))
            })?;
        }
    }
    Ok(vm)
}

/// Makes mlua create the metatable of a userdata type now, at load, with a
/// throwaway object (of a target that dies at once). mlua creates it on
/// first use without protection against memory errors (on 5.1 and LuaJIT
/// `lua_pushcfunction` allocates): a Lua error there would cross mlua's
/// frames, skip its clean-up and leave it pointing at a thread that may be
/// collected. Here, a memory error is only a failed `require`.
pub fn warm_up_metatable<T: UserData + 'static>(
    lua: &Lua,
    vm: &Arc<Vm>,
    make: impl FnOnce(Arc<Target>) -> T,
) -> mlua::Result<()> {
    if let Some(target) = registry::create(vm.clone()) {
        drop(lua.create_userdata(make(target))?);
    }
    Ok(())
}

fn weak_keyed_table(lua: &Lua) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.raw_set("__mode", "k")?;
    table.set_metatable(Some(meta))?;
    Ok(table)
}

/// The id of `thread`, registering it on first use. `Err` carries a message
/// for the Lua side to raise.
pub fn id_of(lua: &Lua, thread: &Thread) -> mlua::Result<Result<Id, String>> {
    let vm = vm(lua)?;
    let ids: Table = lua.named_registry_value(IDS)?;
    let state = thread.to_pointer() as *mut ffi::lua_State;
    if let Some(id) = ids.raw_get::<Option<Id>>(thread)? {
        // A coroutine a finalizer brought back keeps its entry here, but
        // its id ended with its guard: it gets a new one (ids are never
        // reused), as any other coroutine would.
        if vm.names(id, state) {
            return Ok(Ok(id));
        }
    }
    let Some(target) = registry::create(vm.clone()) else {
        return Ok(Err(format!(
            "{}: no interruptible ids left",
            errors::NOT_SUPPORTED
        )));
    };
    let id = target.id;
    // SAFETY: `thread` is alive (we hold it) and of this VM; the guard made
    // below reports its death (on 5.1 with its block's free, watched next;
    // the main thread dies with the VM).
    unsafe { vm.add(id, state) };
    #[cfg(feature = "lua51")]
    // SAFETY: as above.
    if !unsafe { vm.watch_block(id, state) } && !is_running_main(lua, state)? {
        return Ok(Err(format!(
            "{}: cannot follow the lifetime of coroutines in this Lua state",
            errors::NOT_SUPPORTED
        )));
    }
    // LuaJIT: another thread never writes a hook of a coroutine (it asks
    // the VM's thread), so without the allocator's word its death is
    // only heard of late (its guard's finalizer), not unsafely.
    #[cfg(feature = "luajit")]
    // SAFETY: as above.
    let _ = unsafe { vm.watch_block(id, state) };
    let guard: AnyUserData = lua.create_userdata(ThreadGuard(target))?;
    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
    guard.set_user_value(thread)?;
    let guards: Table = lua.named_registry_value(GUARDS)?;
    guards.raw_set(thread, guard)?;
    ids.raw_set(thread, id)?;
    Ok(Ok(id))
}

/// Lua 5.1: whether `state` is the main thread, currently running.
#[cfg(feature = "lua51")]
fn is_running_main(lua: &Lua, state: *mut ffi::lua_State) -> mlua::Result<bool> {
    // SAFETY: pushes one boolean; `lua_pushthread` pushes the running thread
    // and says whether it is the main one, and we pop what it pushed.
    unsafe {
        lua.exec_raw::<bool>((), move |running| {
            let is_main = ffi::lua_pushthread(running) == 1;
            ffi::lua_pop(running, 1);
            ffi::lua_pushboolean(running, (is_main && running == state) as i32);
        })
    }
}

/// Sets (or with `None` removes) the interrupt handler of `thread`.
pub fn set_handler(
    lua: &Lua,
    thread: &Thread,
    handler: Option<mlua::Function>,
) -> mlua::Result<()> {
    let vm = vm(lua)?;
    if handler.is_some() {
        vm.note_handler_set();
    }
    let handlers: Table = lua.named_registry_value(HANDLERS)?;
    handlers.raw_set(thread, handler)
}

/// `shared(name)`: a table of this VM's, the same one for every load of
/// the Lua modules (a host that reloads a module keeps its watches and
/// interruptible objects).
pub fn shared_table(lua: &Lua, name: String) -> mlua::Result<Table> {
    let key = format!("corowatch.shared.{name}");
    if let Some(table) = lua.named_registry_value::<Option<Table>>(&key)? {
        return Ok(table);
    }
    let table = lua.create_table()?;
    lua.set_named_registry_value(&key, &table)?;
    Ok(table)
}

/// Guard kept in the Lua registry: finalized by `lua_close`, it closes the VM.
pub struct VmGuard(pub Arc<Vm>);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(anchor) = self.0.anchor() {
            // SAFETY: lua_close runs finalizers before freeing any state, so
            // the anchor is alive; this runs on the closing thread.
            unsafe { crate::allocator::uninstall(anchor) };
        }
        self.0.close();
    }
}

impl mlua::UserData for VmGuard {}
