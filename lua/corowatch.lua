--- Watch coroutines: warn, then kill, those that run too long without
-- yielding. Compatible with corowatch 1.1, on a native core: no debug hook
-- runs while a watched coroutine stays within its limits (a watchdog thread
-- arms the hook when a deadline passes), and a killed coroutine cannot
-- survive however it catches errors.
-- @module corowatch

local core = require("corowatch.core")

local native = core.corowatch
local leave, watch_running, reset = native.leave, native.watch_running, native.reset
local lend_user_hook, user_hook_changed = native.lend_user_hook, native.user_hook_changed

local raw_create, raw_resume, raw_yield = coroutine.create, coroutine.resume, coroutine.yield
local raw_status, raw_running = coroutine.status, coroutine.running
local raw_sethook, raw_gethook = debug.sethook, debug.gethook
local traceback = debug.traceback
local error, type, select, tostring, setmetatable = error, type, select, tostring, setmetatable

local M = {
  _VERSION = "corowatch " .. core._VERSION,
  _INFO = "watch coroutines and kill those that run too long without yielding",
}

local KILL_MESSAGE = "Coroutine exceeded its allowed running time of %s seconds, without yielding"
local WARN, KILL = 1, 2 -- events from the native hook; 3 is "killed again"

-- Lua 5.1's coroutine.running() gives nil on the main thread: this key
-- stands for it there. Elsewhere the main thread is a thread like any other.
local MAIN = {}
local function running_key()
  local co, is_main = raw_running()
  if co == nil then return MAIN, true end
  return co, is_main == true
end

local weak_keys = { __mode = "k" }
local explicit = setmetatable({}, weak_keys)  -- co -> settings of its watch()
local inherited = setmetatable({}, weak_keys) -- co -> settings of its watched creator
local killed = setmetatable({}, weak_keys)    -- co -> its kill message

-- The coroutines resumed through `resume` and running, outermost first;
-- stack[0] is the thread that resumed stack[1]. While something watched runs
-- (`active`), the native chain mirrors stack[base], stack[base + 1], ...
local stack, n = {}, 0
local base, active = nil, false

local function settings_of(co)
  return explicit[co] or inherited[co]
end

local function argerror(position, name, expected, got)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), 3)
end

--- Called by the native hook, on the running coroutine: `depth` is the
-- watched coroutine's place in the native chain.
local function dispatch(event, depth)
  local co = stack[base + depth - 1]
  local settings = settings_of(co)
  if not settings then return end
  if event == WARN then
    if settings.cb("warn") then reset(depth) end
  elseif event == KILL then
    killed[co] = settings.message
    if settings.cb then settings.cb("kill") end
    error(settings.message, 0)
  else
    error(killed[co] or settings.message, 0)
  end
end
native.set_dispatcher(dispatch)

local resume_watched = native.make_resume(raw_resume)

local function set_active(now_active)
  active = now_active
  if not active then base = nil end
end

-- Common end of both paths: pop `co`, and answer for a killed coroutine.
-- (false, not nil: a slot set to nil and back costs Lua a rehash.)
local function finish(co, ...)
  stack[n] = false
  n = n - 1
  local message = killed[co]
  if message then return false, message end
  return ...
end

local function finish_fast(co, ...)
  -- Something inside called watch(nil), and the chain now includes `co`.
  if active and n >= base then set_active(leave()) end
  return finish(co, ...)
end

local function finish_watched(co, now_active, ...)
  set_active(now_active)
  return finish(co, ...)
end

--- `coroutine.resume`, keeping track of watched coroutines.
function M.resume(co, ...)
  local message = killed[co]
  if message then return false, message end
  if type(co) ~= "thread" then return raw_resume(co, ...) end
  if n == 0 then stack[0] = running_key() end
  n = n + 1
  stack[n] = co
  local settings = settings_of(co)
  if not settings and not active then
    return finish_fast(co, raw_resume(co, ...))
  end
  if not active then base = n - 1 end
  active = true
  if settings then
    return finish_watched(co, resume_watched(co, true, settings.kill, settings.warn, ...))
  end
  return finish_watched(co, resume_watched(co, false, nil, nil, ...))
end
local resume = M.resume

--- `coroutine.yield`; a killed coroutine cannot yield.
function M.yield(...)
  local message = killed[raw_running() or MAIN]
  if message then error(message, 0) end
  return raw_yield(...)
end

--- `coroutine.status`; a killed coroutine is "dead".
function M.status(co)
  if killed[co] then return "dead" end
  return raw_status(co)
end

--- `coroutine.running`, unchanged.
M.running = raw_running

--- `coroutine.create`; a coroutine created while a watched one runs
-- inherits its watch settings (with its own clock).
function M.create(f)
  local co = raw_create(f)
  local settings = settings_of(running_key())
  if settings then inherited[co] = settings end
  return co
end
local create = M.create

local function unwrap(ok, ...)
  if ok then return ... end
  error((...), 0)
end

--- `coroutine.wrap`: values without the status flag, errors (the kill
-- included) raised in the caller.
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
  if explicit[key] then
    error("corowatch.watch: this coroutine is already watched", 2)
  end
  local message = KILL_MESSAGE:format(tostring(killlimit))
  explicit[key] = {
    kill = killlimit, warn = warnlimit, cb = cb, hookcount = hookcount,
    message = traceback(message, 2),
  }
  inherited[key] = nil

  -- Its clock starts now if it is running, else when it is next resumed.
  if watch_running(thread, killlimit, warnlimit) and not active then
    if n == 0 then stack[0] = running_key() end
    base, active = n, true
  end
  return co or raw_running()
end

--- Like `coroutine.wrap`, with the wrapped coroutine watched.
-- @see watch
function M.wrapf(f, killlimit, warnlimit, cb, hookcount)
  local co = create(f)
  M.watch(co, killlimit, warnlimit, cb, hookcount)
  return function(...) return unwrap(resume(co, ...)) end
end

--- Seconds on a monotonic clock (native; sub-microsecond resolution).
M.gettime = native.gettime

-- Is `co` (the first argument of a debug function) the running thread?
local function about_running(argc, co)
  return argc == 0 or type(co) ~= "thread" or co == raw_running()
end

--- `debug.sethook`: the user's hook runs beside a watch, and nothing done
-- with it removes the watch.
function M.sethook(...)
  raw_sethook(...)
  if about_running(select("#", ...), ...) then user_hook_changed() end
end

--- `debug.gethook`: shows the user's hook, not the watch's.
function M.gethook(...)
  if about_running(select("#", ...), ...) and lend_user_hook() then
    local hook, mask, count = raw_gethook(...)
    user_hook_changed()
    return hook, mask, count
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
