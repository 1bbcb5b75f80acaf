--- Watch coroutines: warn, then kill, those that run too long without
-- yielding. Compatible with corowatch 1.1, on a native core: no debug hook
-- runs while a watched coroutine stays within its limits (a watchdog thread
-- arms the hook when a deadline passes), and a killed coroutine cannot
-- survive however it catches errors.
-- @module corowatch

local core = require("corowatch.core")

local native = core.corowatch
local watch_running, reset = native.watch_running, native.reset
local set_user_hook, get_user_hook = native.set_user_hook, native.get_user_hook
local set_hooks = native.set_hooks

local raw_create, raw_resume = coroutine.create, coroutine.resume
local raw_status, raw_running = coroutine.status, coroutine.running
local raw_sethook, raw_gethook = debug.sethook, debug.gethook
local traceback, getinfo = debug.traceback, debug.getinfo
local error, pcall, type, select, tostring, setmetatable =
  error, pcall, type, select, tostring, setmetatable

-- Compatibility: what differs between versions, found out once.
-- Lua 5.4 closes a coroutine that raised an error in coroutine.wrap (its
-- to-be-closed variables run); earlier versions have no coroutine.close.
local raw_close = coroutine.close
-- Lua 5.1 and 5.2's coroutine.wrap add the position to a number error too
-- (making it a string); 5.3, 5.4 and LuaJIT only to a string.
local wrap_positions_numbers =
  type(select(2, pcall(coroutine.wrap(function() error(42, 0) end)))) == "string"

local M = {
  _VERSION = "corowatch " .. core._VERSION,
  _INFO = "watch coroutines and kill those that run too long without yielding",
}

local KILL_MESSAGE = "Coroutine exceeded its allowed running time of %s seconds, without yielding"
local WARN = 1 -- events from the native hook: 1 warn, 2 kill

-- The running thread, main thread included (Lua 5.1's coroutine.running()
-- gives nil there).
local running_thread = native.running_thread
local function running_key()
  return raw_running() or running_thread()
end

local weak_keys = { __mode = "k" }
-- One set of these per Lua state, however often this module is loaded: a
-- host that reloads it keeps its watches.
local shared = core.shared("corowatch")
-- co -> its watch settings { kill, warn, cb, message, explicit, inherited }:
-- its own (from watch: explicit is true), or the `inherited` twin of those
-- of the watched coroutine that created it (explicit false), shared by all
-- it created. The native resume reads the first two.
local watched = shared.watched or setmetatable({}, weak_keys)
local killed = shared.killed or setmetatable({}, weak_keys) -- co -> its kill message
shared.watched, shared.killed = watched, killed
-- How many watches `watch` has set in this Lua state (the supervisor
-- re-reads its actors' watches when it moves).
shared.watches_set = shared.watches_set or 0

-- Fields of a settings record.
local CALLBACK, MESSAGE, EXPLICIT, INHERITED = 3, 4, 5, 6

-- The kill message of the last watch, with the signature of the stack it
-- was built on and its limit: watches set in a loop at one place share
-- one string, built once. And its record, for the next watch set alike
-- (see `watch`).
local last_message, last_signature, last_limit, last_limit_type, last_record
local stack_signature = native.stack_signature
local math_type = math.type or function() return "number" end

-- Error levels: a function of this file that takes a `level` raises its
-- errors as `error(message, level)` called in its caller would, so that
-- they point at the code that called the public function.

-- Raises Lua's usual argument error, at `level`.
local function argerror(level, position, name, expected, got)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), level + 1)
end

-- Raises corowatch's own error about the arguments of `name`, at `level`.
local function refuse(level, name, message)
  error(("corowatch.%s: %s"):format(name, message), level + 1)
end

-- Raises `err`, raised by an original coroutine function called through
-- pcall, as the original raises it when called by the code at `level`: an
-- argument error names `name` (called here, it would name our local) and
-- gets that code's position; any other error goes on unchanged.
local function reraise(level, name, err)
  if type(err) == "string" then
    local fixed, found = err:gsub("^bad argument (#%d+) to '[^']*'",
      "bad argument %1 to '" .. name .. "'")
    if found > 0 then error(fixed, level + 1) end
  end
  error(err, 0)
end

--- Called by the native hook, on the running coroutine, about the watched
-- coroutine `co` at `depth` in the native chain.
local function dispatch(event, co, depth)
  local settings = watched[co]
  if not settings then return end
  if event == WARN then
    -- The thread's hooks on (PUC Lua), the kill reaches a callback that
    -- runs past it; they go off again before the hook returns, as Lua
    -- expects. An error leaves them on: Lua restores them itself then.
    set_hooks(true)
    local again = settings[CALLBACK]("warn")
    set_hooks(false)
    if again then reset(depth) end
  else -- KILL: at every event once the kill deadline passed
    local message = killed[co]
    if message == nil then
      -- The first time: `killed` is the one record of it.
      message = settings[MESSAGE]
      killed[co] = message
      if settings[CALLBACK] then settings[CALLBACK]("kill") end
    end
    error(message, 0)
  end
end
native.set_dispatcher(dispatch)

--- The module's version: `"corowatch "` followed by the native core's
-- version (the rock's version).
-- @field _VERSION

--- A line saying what the module is.
-- @field _INFO

--- `coroutine.resume`, keeping track of watched coroutines (native). A
-- killed coroutine is dead: resuming it returns false and the kill message.
-- @function resume
-- @tparam thread co the coroutine
-- @param ... values passed to it (the function's arguments, or `yield`'s results)
-- @treturn boolean true if it yielded or returned, false if it raised an
-- error (the kill included) or could not be resumed
-- @return the values it yielded or returned, or the error

--- `coroutine.yield`, keeping track of watched coroutines (native).
-- @function yield
-- @param ... values returned by the `resume` that resumed the coroutine
-- @return the values passed to the next `resume`
-- @raise the kill message, in a killed coroutine (it cannot yield)

--- Lua 5.4's `coroutine.close`, with the coroutine's watch in force (from
-- the call on) while its pending `<close>` handlers run: one that runs past
-- the kill limit is killed, and those still pending get the kill at their
-- first instruction. A killed coroutine answers `false` and the kill
-- message. Nil before 5.4.
-- @function close
-- @tparam thread co a suspended or dead coroutine
-- @treturn boolean true if no error (nor kill) is left
-- @return the error or the kill message
-- `set_watch(co, settings)` is `watched[co] = settings`, and the only way
-- this file writes it: the native resume remembers the watch it read last
-- for a coroutine, and set_watch moves the VM's watch epoch in the same C
-- call as the write, so no hook can resume `co` in between.
local set_watch
M.resume, M.yield, M.close, set_watch = native.make_functions(raw_resume, watched, killed, raw_close)
local resume = M.resume

if jit then
  -- LuaJIT treats a C function that yields while any hook runs (the hook
  -- is global to the VM) as a yield of the hook itself: wrong values, then
  -- a crash. Its own yield knows better; this is the same check in Lua.
  local raw_yield = coroutine.yield
  function M.yield(...)
    local message = killed[raw_running()]
    if message then error(message, 0) end
    return raw_yield(...)
  end
end

--- `coroutine.status`; a killed coroutine is "dead".
-- @tparam thread co the coroutine
-- @treturn string `"running"`, `"suspended"`, `"normal"` or `"dead"`
function M.status(co)
  if killed[co] then return "dead" end
  if type(co) ~= "thread" then reraise(2, "status", select(2, pcall(raw_status, co))) end
  return raw_status(co)
end

--- `coroutine.running`, unchanged.
-- @function running
-- @treturn thread the running coroutine (nil in the main thread on Lua 5.1;
-- the main thread and true on Lua 5.2+)
M.running = raw_running

-- A coroutine created while a watched one runs inherits its watch
-- settings (with its own clock). Errors are `name`'s, at `level`.
local function new_coroutine(f, name, level)
  local made, co = pcall(raw_create, f)
  if not made then reraise(level + 1, name, co) end
  local settings = watched[running_key()]
  if settings then
    if settings[EXPLICIT] then
      local twin = settings[INHERITED]
      if not twin then
        twin = { settings[1], settings[2], settings[CALLBACK], settings[MESSAGE], false }
        settings[INHERITED] = twin
      end
      settings = twin
    end
    set_watch(co, settings)
  end
  return co
end

--- `coroutine.create`; a coroutine created while a watched one runs
-- inherits its watch settings (with its own clock).
-- @tparam function f the coroutine's body
-- @treturn thread the new coroutine
function M.create(f)
  local co = new_coroutine(f, "create", 2)
  return co
end

-- The outcome of `resume(co, ...)` as `coroutine.wrap` gives it: the values,
-- or the error raised at the position of the wrapped function's caller (a
-- string error; 5.1 and 5.2: a number too), after closing the coroutine
-- (5.4). A kill is raised as its own message, with no position, as
-- `resume` returns it. Tail-called by the wrapped function.
local function unwrap(co, ok, ...)
  if ok then return ... end
  local err = ...
  if M.close and raw_status(co) == "dead" then
    -- The patched close keeps the coroutine's watch while its
    -- to-be-closed variables run.
    local closed, close_err = M.close(co)
    if not closed then err = close_err end
  end
  if killed[co] then error((...), 0) end
  local kind = type(err)
  if kind == "string" or kind == "number" and wrap_positions_numbers then
    -- Level 1 is this function; the wrapped function's caller is the next
    -- level that is not a call lost to a tail call (5.1 lists those).
    local level = 2
    while (getinfo(level, "S") or {}).what == "tail" do level = level + 1 end
    error(err, level)
  end
  error(err, 0)
end

--- `coroutine.wrap`: values without the status flag, errors raised in the
-- caller as `coroutine.wrap` raises them (on 5.4, after closing the
-- coroutine); a kill is raised as its own message.
-- @tparam function f the coroutine's body
-- @treturn function resumes the coroutine with its arguments, returns what
-- it yields or returns
function M.wrap(f)
  local co = new_coroutine(f, "wrap", 2)
  return function(...) return unwrap(co, resume(co, ...)) end
end

-- Limits as the native core takes them: a limit this long (2^32 s, 136
-- years) or longer never fires; a shorter one than a nanosecond, the
-- clock's resolution, fires after one.
local NEVER, SHORTEST = 2^32, 1e-9

-- Checks a limit; returns it as the native core takes it: false for
-- none or never, else seconds.
local function check_limit(level, name, position, value)
  if value == nil then return false end
  if type(value) ~= "number" or value ~= value -- NaN
      or value <= 0 or value == 1/0 then
    argerror(level + 1, position, name, "positive number of seconds or nil", value)
  end
  if value >= NEVER then return false end
  if value < SHORTEST then return SHORTEST end
  return value
end

-- `watch` for the public function `name`; errors at `level`.
local function watch(name, level, co, killlimit, warnlimit, cb, hookcount)
  if co ~= nil and type(co) ~= "thread" then
    argerror(level + 1, 1, name, "coroutine or nil", co)
  end
  local kill = check_limit(level + 1, name, 2, killlimit)
  local warn = check_limit(level + 1, name, 3, warnlimit)
  if killlimit == nil and warnlimit == nil then
    refuse(level + 1, name, "a kill limit or a warn limit is required")
  end
  if cb ~= nil and type(cb) ~= "function" then
    argerror(level + 1, 4, name, "function or nil", cb)
  end
  if warnlimit ~= nil and cb == nil then refuse(level + 1, name, "a warn limit needs a callback") end
  if warnlimit and killlimit and warnlimit >= killlimit then
    refuse(level + 1, name, "the warn limit must be below the kill limit")
  end
  if hookcount ~= nil and (type(hookcount) ~= "number" or hookcount ~= hookcount or hookcount < 1) then
    argerror(level + 1, 5, name, "number >= 1 or nil", hookcount)
  end

  local key, thread = co, co
  if co == nil then key = running_key(); thread = nil end
  local current = watched[key]
  if current and current[EXPLICIT] then refuse(level + 1, name, "this coroutine is already watched") end
  -- A new watch would give a killed coroutine new deadlines: it would live on.
  if killed[key] ~= nil then refuse(level + 1, name, "this coroutine was killed") end
  -- The message names the limit as given (1 and 1.0 print apart on 5.3+).
  local signature, limit_type = stack_signature(level + 1), math_type(killlimit)
  if not (signature == last_signature and killlimit == last_limit and limit_type == last_limit_type) then
    last_message = traceback(KILL_MESSAGE:format(tostring(killlimit)), level + 1)
    last_signature, last_limit, last_limit_type = signature, killlimit, limit_type
  end
  local message = last_message
  cb = cb or false
  -- Coroutines watched alike (same limits, callback and message: the same
  -- call site) share one record, which nothing changes but its inherited
  -- twin, the same for all of them: a watch then costs a slot in `watched`.
  -- (The native resume keeps the limits of the record it read last: a
  -- record's limits must never change.)
  local record = last_record
  if not (record and record[1] == kill and record[2] == warn and record[CALLBACK] == cb
      and record[MESSAGE] == message) then
    record = { kill, warn, cb, message, true }
    last_record = record
  end
  set_watch(key, record)
  shared.watches_set = shared.watches_set + 1

  -- Its clock starts now if it is running, else when it is next resumed.
  watch_running(thread, kill or nil, warn or nil)
  return co or raw_running()
end

--- Watches a coroutine.
-- @tparam ?thread co the coroutine; nil for the running coroutine or main thread
-- @tparam ?number killlimit seconds it may run without yielding before it is
-- killed: any positive finite number; 2^32 (136 years) or more means never
-- @tparam ?number warnlimit seconds before `cb("warn")` is called (below
-- killlimit; the same range)
-- @tparam ?function cb called with "warn" or "kill" on the running coroutine;
-- a truthy answer to "warn" resets both timeouts
-- @tparam ?integer hookcount accepted for compatibility, at least 1; no effect
-- (the native watchdog replaced count-hook polling)
-- @treturn thread co
-- @raise on bad arguments, or when `co` is already explicitly watched or
-- was killed (a refused watch leaves `co` as it was), at the caller's position
function M.watch(co, killlimit, warnlimit, cb, hookcount)
  local watched_co = watch("watch", 2, co, killlimit, warnlimit, cb, hookcount)
  return watched_co
end

--- Like `coroutine.wrap`, with the wrapped coroutine watched.
-- @tparam function f the coroutine's body
-- @tparam ?number killlimit as for `watch`
-- @tparam ?number warnlimit as for `watch`
-- @tparam ?function cb as for `watch`
-- @tparam ?integer hookcount as for `watch`
-- @treturn function the wrapped coroutine (see `wrap`)
-- @raise as `wrap` and `watch` do, naming `wrapf`
-- @see watch
function M.wrapf(f, killlimit, warnlimit, cb, hookcount)
  local co = new_coroutine(f, "wrapf", 2)
  watch("wrapf", 2, co, killlimit, warnlimit, cb, hookcount)
  return function(...) return unwrap(co, resume(co, ...)) end
end

--- Seconds on a monotonic clock (native; sub-microsecond resolution).
-- @function gettime
-- @treturn number seconds since an arbitrary point, for differences only
M.gettime = native.gettime

-- Raises an error of Lua's own debug function as that function raises it
-- for the code two levels up: an argument error gets that code's position.
local function raise_hook_error(err)
  local bad_argument = type(err) == "string" and err:find("^bad argument")
  error(err, bad_argument and 3 or 0)
end

--- `debug.sethook`: the user's hook runs beside a watch, and nothing done
-- with it removes the watch. Same arguments as `debug.sethook`.
-- @tparam[opt] thread co the coroutine; the running one if omitted
-- @tparam ?function hook the hook, or nil to remove the user's hook
-- @tparam[opt] string mask `"c"`, `"r"` and `"l"` as for `debug.sethook`
-- @tparam[opt] integer count call the hook every `count` instructions
-- @raise `bad argument` as `debug.sethook` does
function M.sethook(...)
  local done, ok, err = set_user_hook(raw_sethook, ...)
  if not done then
    -- The state is closing: nothing is watched any more.
    return raw_sethook(...)
  end
  if not ok then raise_hook_error(err) end
end

--- `debug.gethook`: shows the user's hook, not the watch's.
-- @tparam[opt] thread co the coroutine; the running one if omitted
-- @treturn ?function the user's hook
-- @treturn string its mask
-- @treturn integer its count
function M.gethook(...)
  local done, ok, hook, mask, count = get_user_hook(raw_gethook, ...)
  if not done then return raw_gethook(...) end
  if not ok then raise_hook_error(hook) end
  if mask == nil then return hook end
  return hook, mask, count
end

local exported = { "create", "resume", "yield", "status", "wrap", "running",
  "watch", "wrapf", "gettime" }
if M.close then exported[#exported + 1] = "close" end

--- Exports the coroutine functions. Given a global environment (a table
-- with a `coroutine` table), patches its `coroutine` and `debug` tables and
-- sets its `corowatch`; given any other table, puts the functions in it.
-- @tparam[opt] table t the target; a new table if nil
-- @treturn table t
-- @raise `bad argument #1 to 'export'` if `t` is not a table or nil
function M.export(t)
  if t ~= nil and type(t) ~= "table" then argerror(2, 1, "export", "table or nil", t) end
  t = t or {}
  local target = t
  if type(t.coroutine) == "table" then
    target = t.coroutine
    if type(t.debug) == "table" then
      t.debug.sethook, t.debug.gethook = M.sethook, M.gethook
    end
    t.corowatch = M
  end
  for _, name in ipairs(exported) do target[name] = M[name] end
  return t
end

return M
