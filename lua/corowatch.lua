--- Watch coroutines: warn, then kill, those that run too long without
-- yielding. Compatible with corowatch 1.1, on a native core: no debug hook
-- runs while a watched coroutine stays within its limits (a watchdog thread
-- arms the hook when a deadline passes), and a killed coroutine cannot
-- survive however it catches errors.
-- @module corowatch

local core = require("corowatch.core")

local native = core.corowatch
local watch_running, reset = native.watch_running, native.reset
local lend_user_hook, user_hook_changed = native.lend_user_hook, native.user_hook_changed
local begin_user_hook_change = native.begin_user_hook_change

local raw_create, raw_resume = coroutine.create, coroutine.resume
local raw_status, raw_running = coroutine.status, coroutine.running
local raw_sethook, raw_gethook = debug.sethook, debug.gethook
local traceback = debug.traceback
local error, pcall, type, select, tostring, setmetatable =
  error, pcall, type, select, tostring, setmetatable

local M = {
  _VERSION = "corowatch " .. core._VERSION,
  _INFO = "watch coroutines and kill those that run too long without yielding",
}

local KILL_MESSAGE = "Coroutine exceeded its allowed running time of %s seconds, without yielding"
local WARN, KILL = 1, 2 -- events from the native hook; 3 is "killed again"

-- The running thread, main thread included (Lua 5.1's coroutine.running()
-- gives nil there).
local running_thread = native.running_thread
local function running_key()
  return raw_running() or running_thread()
end

local weak_keys = { __mode = "k" }
-- co -> its watch settings { kill, warn, cb, message, explicit, inherited }:
-- its own (from watch: explicit is true), or the `inherited` twin of those
-- of the watched coroutine that created it (explicit false), shared by all
-- it created. The native resume reads the first two.
local watched = setmetatable({}, weak_keys)
local killed = setmetatable({}, weak_keys) -- co -> its kill message

-- Fields of a settings record.
local CALLBACK, MESSAGE, EXPLICIT, INHERITED = 3, 4, 5, 6

-- The kill message of the last watch: watches set in a loop at one place
-- share one string instead of a traceback each.
local last_message

local function argerror(position, name, expected, got)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), 3)
end

--- Called by the native hook, on the running coroutine, about the watched
-- coroutine `co` at `depth` in the native chain.
local function dispatch(event, co, depth)
  local settings = watched[co]
  if not settings then return end
  if event == WARN then
    if settings[CALLBACK]("warn") then reset(depth) end
  elseif event == KILL then
    killed[co] = settings[MESSAGE]
    if settings[CALLBACK] then settings[CALLBACK]("kill") end
    error(settings[MESSAGE], 0)
  else
    error(killed[co] or settings[MESSAGE], 0)
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
M.resume, M.yield = native.make_functions(raw_resume, watched, killed)
local resume = M.resume

--- `coroutine.status`; a killed coroutine is "dead".
-- @tparam thread co the coroutine
-- @treturn string `"running"`, `"suspended"`, `"normal"` or `"dead"`
function M.status(co)
  if killed[co] then return "dead" end
  return raw_status(co)
end

--- `coroutine.running`, unchanged.
-- @function running
-- @treturn thread the running coroutine (nil in the main thread on Lua 5.1;
-- the main thread and true on Lua 5.2+)
M.running = raw_running

--- `coroutine.create`; a coroutine created while a watched one runs
-- inherits its watch settings (with its own clock).
-- @tparam function f the coroutine's body
-- @treturn thread the new coroutine
function M.create(f)
  local co = raw_create(f)
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
    watched[co] = settings
  end
  return co
end
local create = M.create

local function unwrap(ok, ...)
  if ok then return ... end
  error((...), 0)
end

--- `coroutine.wrap`: values without the status flag, errors (the kill
-- included) raised in the caller.
-- @tparam function f the coroutine's body
-- @treturn function resumes the coroutine with its arguments, returns what
-- it yields or returns
function M.wrap(f)
  local co = create(f)
  return function(...) return unwrap(resume(co, ...)) end
end

local function check_limit(position, value)
  if value ~= nil and (type(value) ~= "number" or value ~= value -- NaN
      or value <= 0 or value == 1/0) then
    argerror(position, "watch", "positive number of seconds or nil", value)
  end
end

--- Watches a coroutine.
-- @tparam ?thread co the coroutine; nil for the running coroutine or main thread
-- @tparam ?number killlimit seconds it may run without yielding before it is killed
-- @tparam ?number warnlimit seconds before `cb("warn")` is called (below killlimit)
-- @tparam ?function cb called with "warn" or "kill" on the running coroutine;
-- a truthy answer to "warn" resets both timeouts
-- @tparam ?integer hookcount accepted for compatibility, at least 1; no effect
-- (the native watchdog replaced count-hook polling)
-- @treturn thread co
-- @raise on bad arguments, or when `co` is already explicitly watched
function M.watch(co, killlimit, warnlimit, cb, hookcount)
  if co ~= nil and type(co) ~= "thread" then argerror(1, "watch", "coroutine or nil", co) end
  check_limit(2, killlimit)
  check_limit(3, warnlimit)
  if killlimit == nil and warnlimit == nil then
    error("corowatch.watch: a kill limit or a warn limit is required", 2)
  end
  if cb ~= nil and type(cb) ~= "function" then argerror(4, "watch", "function or nil", cb) end
  if warnlimit ~= nil and cb == nil then
    error("corowatch.watch: a warn limit needs a callback", 2)
  end
  if warnlimit and killlimit and warnlimit >= killlimit then
    error("corowatch.watch: the warn limit must be below the kill limit", 2)
  end
  if hookcount ~= nil and (type(hookcount) ~= "number" or hookcount < 1) then
    argerror(5, "watch", "number >= 1 or nil", hookcount)
  end

  local key, thread = co, co
  if co == nil then key = running_key(); thread = nil end
  local current = watched[key]
  if current and current[EXPLICIT] then
    error("corowatch.watch: this coroutine is already watched", 2)
  end
  local message = traceback(KILL_MESSAGE:format(tostring(killlimit)), 2)
  if message == last_message then message = last_message end
  last_message = message
  watched[key] = { killlimit or false, warnlimit or false, cb or false, message, true }

  -- Its clock starts now if it is running, else when it is next resumed.
  watch_running(thread, killlimit, warnlimit)
  return co or raw_running()
end

--- Like `coroutine.wrap`, with the wrapped coroutine watched.
-- @tparam function f the coroutine's body
-- @tparam ?number killlimit as for `watch`
-- @tparam ?number warnlimit as for `watch`
-- @tparam ?function cb as for `watch`
-- @tparam ?integer hookcount as for `watch`
-- @treturn function resumes the coroutine with its arguments, returns what
-- it yields or returns, raises its errors (the kill included)
-- @raise as `watch` does, on bad arguments
-- @see watch
function M.wrapf(f, killlimit, warnlimit, cb, hookcount)
  local co = create(f)
  M.watch(co, killlimit, warnlimit, cb, hookcount)
  return function(...) return unwrap(resume(co, ...)) end
end

--- Seconds on a monotonic clock (native; sub-microsecond resolution).
-- @function gettime
-- @treturn number seconds since an arbitrary point, for differences only
M.gettime = native.gettime

-- Is `co` (the first argument of a debug function) the running thread?
local function about_running(argc, co)
  return argc == 0 or type(co) ~= "thread" or co == raw_running()
end

--- `debug.sethook`: the user's hook runs beside a watch, and nothing done
-- with it removes the watch. Same arguments as `debug.sethook`.
-- @tparam[opt] thread co the coroutine; the running one if omitted
-- @tparam ?function hook the hook, or nil to remove the user's hook
-- @tparam[opt] string mask `"c"`, `"r"` and `"l"` as for `debug.sethook`
-- @tparam[opt] integer count call the hook every `count` instructions
-- @raise `bad argument` as `debug.sethook` does
function M.sethook(...)
  begin_user_hook_change()
  local ok, err = pcall(raw_sethook, ...)
  user_hook_changed(about_running(select("#", ...), ...))
  if not ok then
    -- An argument error gets the caller's position; anything else (a kill
    -- that landed meanwhile) goes on unchanged.
    local bad_argument = type(err) == "string" and err:find("^bad argument")
    error(err, bad_argument and 2 or 0)
  end
end

-- Puts the watch's hook back after `gethook` read the user's.
local function relend(ok, ...)
  user_hook_changed(true)
  if not ok then error((...), 0) end
  return ...
end

--- `debug.gethook`: shows the user's hook, not the watch's.
-- @tparam[opt] thread co the coroutine; the running one if omitted
-- @treturn ?function the user's hook
-- @treturn string its mask
-- @treturn integer its count
function M.gethook(...)
  if lend_user_hook(about_running(select("#", ...), ...)) then
    return relend(pcall(raw_gethook, ...))
  end
  return raw_gethook(...)
end

local exported = { "create", "resume", "yield", "status", "wrap", "running",
  "watch", "wrapf", "gettime" }

--- Exports the coroutine functions. Given a global environment (a table
-- with a `coroutine` table), patches its `coroutine` and `debug` tables and
-- sets its `corowatch`; given any other table, puts the functions in it.
-- @tparam[opt] table t the target; a new table if nil
-- @treturn table t
-- @raise `bad argument #1 to 'export'` if `t` is not a table or nil
function M.export(t)
  if t ~= nil and type(t) ~= "table" then argerror(1, "export", "table or nil", t) end
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
