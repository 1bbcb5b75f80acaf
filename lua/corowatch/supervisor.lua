--- Supervise actors run as coroutines: seed 003's event dispatcher, kept
-- alive the way Erlang/OTP supervisors keep their children alive.
--
-- An actor is a function run in a coroutine. It waits for an event with
-- `coroutine.yield("waitfor", event)` (or `supervisor.waitfor(event)`) and is
-- resumed with `(event, ...)` when someone signals that event. Every actor is
-- watched by corowatch: one that runs longer than its limit without waiting
-- is killed (it cannot swallow the kill with `pcall`), logged with its
-- traceback, and restarted or not according to its restart type and the
-- supervisor's strategy. Nothing global is patched: this module uses
-- corowatch's own `create`/`resume`/`yield`/`status`/`watch`.
-- @module corowatch.supervisor

local cw = require("corowatch")

local cw_create, cw_resume, cw_yield, cw_watch, cw_status, gettime =
  cw.create, cw.resume, cw.yield, cw.watch, cw.status, cw.gettime
local raw_status, raw_running = coroutine.status, coroutine.running
local traceback, getinfo = debug.traceback, debug.getinfo
local error, pcall, select, type, tostring, getmetatable, setmetatable, ipairs, pairs, rawequal =
  error, pcall, select, type, tostring, getmetatable, setmetatable, ipairs, pairs, rawequal
local concat, sort, remove = table.concat, table.sort, table.remove
local date, io = os.date, io

-- Compatibility: `unpack` moved into `table` in 5.2; `coroutine.close`
-- (which runs a suspended or failed coroutine's pending `<close>` handlers)
-- exists only on 5.4, and corowatch's keeps the actor's watch while they
-- run (a killed actor's would otherwise run out of any watch's reach).
local unpack = table.unpack or unpack -- luacheck: ignore 143
local coclose = cw.close

local M = {
  _VERSION = cw._VERSION,
  _INFO = "supervise actors run as coroutines: restart strategies, runaway actors killed",
}

-- Actor states, as `status` reports them.
local WAITING, RUNNING, RESTARTING, STOPPED = "waiting", "running", "restarting", "stopped"

local STRATEGIES = { one_for_one = true, one_for_all = true, rest_for_one = true }
local RESTARTS = { permanent = true, transient = true, temporary = true }

-- First value an actor's body returns when its function returned, so that
-- a return is told from a yield without asking the coroutine's status.
local RETURNED = setmetatable({}, { __tostring = function() return "returned" end })
-- Yielded by `supervisor.run`: "deliver me whatever my own actors wait for".
local NESTED = setmetatable({}, { __tostring = function() return "nested supervisor" end })
-- `supervisor.run`'s coroutine -> the supervisor its `init` is building:
-- if the actor ends before it first waits, its actors are stopped.
local building = setmetatable({}, { __mode = "k" })

local KILLED = "^Coroutine exceeded its allowed running time"
local DONE_REASON = "done() was called"

local Supervisor = {}
Supervisor.__index = Supervisor

-- ----------------------------------------------------------------------
-- LuaJIT: the dispatch probe
-- ----------------------------------------------------------------------
-- On LuaJIT corowatch's C `resume` costs more than a whole delivery
-- through LuaJIT's own `coroutine.resume` (written in assembly). So
-- `signal` resumes its watched actors with LuaJIT's own resume, and tells
-- the core what it runs through these upvalues, which the core's watchdog
-- samples from its thread (src/probe.rs): a count moved at the start of
-- each delivery, the limit of the actor it delivers to (0 between
-- deliveries) and its coroutine. An actor whose delivery runs past
-- its limit is killed as corowatch kills (the same message, at every
-- instruction until it dies), within an eighth of the limit more (at
-- least 1 ms). The core writes the fourth, WATCHED_RUNNING, the length of
-- corowatch's chain: while something watched runs (a watched coroutine
-- called `signal`), its deadline must reach the actors, and they go
-- through corowatch's resume. So does a signal made while a delivery to a
-- watched actor runs (from inside it), under the outer delivery's probe,
-- a delivery to an actor whose watch is not the one `start` set (it
-- inherited one, or was watched anew), and everything else that resumes
-- actors.
local raw_resume = coroutine.resume
local PROBE_COUNT, PROBE_LIMIT, PROBE_CO, WATCHED_RUNNING = 0, 0, false, 0
-- Its upvalues, in this order, are the probe.
local function probe() return PROBE_COUNT, PROBE_LIMIT, PROBE_CO, WATCHED_RUNNING end
local core = require("corowatch.core")
local watch_dispatch = jit and core.corowatch.watch_dispatch
-- corowatch's `co -> watch settings` (its inheritance included), and how
-- many watches it has set.
local cw_shared = core.shared("corowatch")
local cw_watched = cw_shared.watched
-- Whether the core samples the probe (from the first watched supervisor on).
local probed = false

-- Tells the core about a limit its actors may be delivered with; the
-- first time, registers the probe (its upvalues are closed by now: the
-- module has returned).
local function announce(limit)
  if watch_dispatch and limit then
    -- Written here once, so that LuaJIT's compiler never takes the core's
    -- value for a constant.
    WATCHED_RUNNING = WATCHED_RUNNING
    local ok, registered = pcall(watch_dispatch, probe, limit)
    probed = probed or (ok and registered)
  end
end

-- How `signal`, through the probe, resumes an actor whose watch is
-- `watch`: with LuaJIT's resume if it is unwatched, also through the probe
-- if it keeps the watch `start` set, else with corowatch's resume (it
-- inherited a watch, or was watched anew).
local function route_of(rec, watch)
  if watch == nil then return "raw" end
  if watch == rec.watch and rec.limit then return "probed" end
  return "slow"
end

-- corowatch set a watch since this supervisor last looked: its actors'
-- routes are read again.
local function reroute(self)
  for _, rec in ipairs(self.actors) do
    if rec.co then rec.route = route_of(rec, cw_watched[rec.co]) end
  end
  self.watches_seen = cw_shared.watches_set
end

-- Whether a `signal` runs below the caller of the caller of this function,
-- on this thread.
local function signal_below()
  local level = 4
  while true do
    local info = getinfo(level, "f")
    if not info then return false end
    if info.func == Supervisor.signal then return true end
    level = level + 1
  end
end

-- A probe left behind by a delivery cut short (an error in the loop's own
-- thread) names a coroutine that no longer runs: it is cleared, so that the
-- next signal can use it. A loop still under way is not cut short: its
-- coroutine runs (a signal made from inside it), or the loop is about to
-- resume it (a signal made by a hook or an mtint handler on the loop's own
-- thread, between its stores and its resume: a `signal` frame below).
-- Returns whether the probe is free now.
local function clear_stale_probe()
  if PROBE_LIMIT ~= 0 and PROBE_CO then
    local status = raw_status(PROBE_CO)
    if status == "running" or status == "normal" or signal_below() then return false end
  end
  PROBE_COUNT = PROBE_COUNT + 1
  PROBE_LIMIT = 0
  PROBE_CO = false
  return true
end

-- ----------------------------------------------------------------------
-- Arguments and logging
-- ----------------------------------------------------------------------

local function argerror(position, name, expected, got, level)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), (level or 2) + 1)
end

local function check_self(self, name)
  if getmetatable(self) ~= Supervisor then
    error(("calling '%s' on bad self (supervisor expected, got %s)"):format(name, type(self)), 3)
  end
  if self.stopped_because then
    error("corowatch.supervisor: " .. name .. ": the supervisor is stopped ("
      .. self.stopped_because .. ")", 3)
  end
end

local function is_limit(value)
  return value == false or (type(value) == "number" and value > 0 and value < 1/0)
end

-- The seed's LOG: a timestamped line on whatever io.stderr is then.
local function default_log(line)
  io.stderr:write(date("!%F %T "), line, "\n")
end

-- A value (an error, an event) as text, whatever it is: one whose
-- `__tostring` fails, or answers something other than a string (5.1, 5.2
-- and LuaJIT pass that on), is named by its type.
local function describe(value)
  if type(value) == "string" then return value end
  local ok, text = pcall(tostring, value)
  if ok and type(text) == "string" then return text end
  return "(a " .. type(value) .. " value that tostring cannot print)"
end

-- PUC Lua 5.1's `pcall` cannot be yielded across.
local PCALL_BLOCKS_YIELDS = _VERSION == "Lua 5.1" and not jit

-- Runs the log function protected. Inside a coroutine, where `pcall` would
-- let a yield through (5.2 on, LuaJIT), on a coroutine of its own: one that
-- yields must not yield through the supervisor. A corowatch coroutine, so
-- that the watch of an actor that logs reaches it.
local function run_log(log, line)
  local running, main = raw_running()
  if running == nil or main or PCALL_BLOCKS_YIELDS then return pcall(log, line) end
  local co = cw_create(function() return log(line) end)
  local ok, err = cw_resume(co)
  if ok and raw_status(co) ~= "dead" then
    return false, "it yielded (a log function must not)"
  end
  return ok, err
end

-- Logs one line; a failing log function is reported on stderr, never
-- allowed to break the supervisor.
local function say(self, line)
  local log = self.log
  if log then
    local ok, err = run_log(log, line)
    if not ok then
      pcall(default_log, "corowatch.supervisor: the log function failed: " .. describe(err))
    end
  end
end

-- corowatch's own file: a killed coroutine's stack begins with the frames of
-- its hook there (and the `error` it calls), above the actor's code.
local CW_SOURCE = getinfo(cw.watch, "S").source

-- The level where the actor's own frames begin on a killed coroutine.
local function below_kill(co)
  for level = 0, 4 do
    local info = getinfo(co, level, "S")
    if not info then break end
    if info.source == CW_SOURCE then return level + 1 end
  end
  return 0
end

-- The seed's log_traceback, with the name still known when it is logged.
local function log_traceback(self, co, name, what, message, level)
  say(self, "Coroutine " .. name .. " " .. what .. ":")
  for line in traceback(co, message, level or 0):gmatch("[^\n]+") do say(self, "  " .. line) end
end

-- ----------------------------------------------------------------------
-- Waiting: one list per event
-- ----------------------------------------------------------------------
-- `events[event]` is the list of actors waiting for `event`, at slots
-- 1 .. list.n in the order they began to wait; an actor that stops waiting
-- any other way than by being signalled (it is stopped) clears its slot.
-- `signal` takes the list out and puts a fresh one in its place, so actors
-- that wait again land in the fresh one and each wait is delivered exactly
-- once. Each slot is cleared before its actor is resumed. A signal of the
-- same event made from inside an actor meanwhile is queued (`deferred`) and
-- delivered when this one is done: each actor gets an event's signals in
-- the order they were made, and none is lost.
-- An actor waits while `rec.list[rec.slot] == rec` (the fields are left
-- behind when it is resumed; its state field stays RUNNING: waiting is a
-- running actor parked in a list).

local function waiting(rec)
  local list = rec.list
  return list ~= nil and list[rec.slot] == rec
end

local function state_of(rec)
  if rec.nested_wait or waiting(rec) then return WAITING end
  return rec.state
end

-- A list for `event`: the spare one if there is one.
local function new_list(self, event)
  local list = self.spare
  if list then
    self.spare, list.event = nil, event
  else
    list = { n = 0, event = event }
  end
  self.events[event] = list
  return list
end

-- Is anyone in `list` still waiting? Forgets stale slots at its end.
local function live(list)
  for i = list.n, 1, -1 do
    if list[i] then return true end
    list.n = i - 1
  end
  return false
end

local function unwait(self, rec)
  if waiting(rec) then
    local list = rec.list
    list[rec.slot] = nil
    if self.events[list.event] == list and not live(list) then self.events[list.event] = nil end
  end
  rec.list, rec.slot, rec.nested_wait = nil, nil, nil
end

-- A nested supervisor's actor that is busy inside it (it runs the actor
-- that is signalling now, or resumed it): its supervisor takes a signal
-- directly, as from one of its own actors.
local function busy_inner(rec)
  local co = rec.co
  return co ~= nil and rec.inner ~= nil and raw_status(co) == "normal"
end

-- Does anyone under this supervisor (nested supervisors included) wait for
-- `event`, or is still to get the signal of it in progress?
local function waits(self, event)
  local list = self.events[event]
  if list and live(list) then return true end
  local delivering = self.delivering[event]
  if delivering then
    for i = 1, delivering.n do
      if delivering[i] then return true end
    end
  end
  if self.nested > 0 then
    for _, rec in ipairs(self.actors) do
      if rec.inner and (rec.nested_wait or busy_inner(rec)) and waits(rec.inner, event) then
        return true
      end
    end
  end
  return false
end

-- ----------------------------------------------------------------------
-- Running actors
-- ----------------------------------------------------------------------

local settle -- (self, depth, rec, co, cw.resume's results): what the actor did next
local salvage -- (self, depth, co): finishes calls an actor that died left half done

local function clear_inner(self, rec)
  local inner = rec.inner
  if inner then
    rec.inner = nil
    self.nested = self.nested - 1
    if not inner.finished then pcall(inner.done, inner) end
  end
end

-- Closes a coroutine the supervisor no longer runs (5.4: its pending
-- `<close>` handlers run; a failed coroutine still has them), logging a
-- handler's failure. `failed`: it died with error `err`, which closing it
-- answers again.
local function close(self, name, co, failed, err)
  if coclose and (failed or raw_status(co) == "suspended") then
    local ok, why = coclose(co)
    if not ok and not (failed and rawequal(why, err)) then
      say(self, "Coroutine " .. name .. " failed while closing: " .. describe(why))
    end
  end
end

-- Stops an actor: it no longer waits, its coroutine is closed. A coroutine
-- that is running (it resumed whoever stops it) is closed when it next
-- yields or returns (see `settle`).
local function stop(self, rec)
  unwait(self, rec)
  clear_inner(self, rec)
  local co = rec.co
  rec.co = nil
  if co and raw_status(co) == "suspended" then close(self, rec.name, co) end
end

local function start(self, rec)
  if PROBE_LIMIT ~= 0 then clear_stale_probe() end
  local fn, args = rec.fn, rec.args
  local co = cw_create(function(...) return RETURNED, fn(...) end)
  if rec.limit then cw_watch(co, rec.limit) end
  rec.co, rec.state = co, RUNNING
  -- Its watch as set here (LuaJIT: `signal` times an actor through its
  -- probe only while it keeps it; one inherited from a watched coroutine
  -- that created it, or set anew since, is corowatch's resume's).
  rec.watch = cw_watched[co]
  rec.route = route_of(rec, rec.watch)
  -- Counted as a call that resumes an actor (see `salvage`).
  local depth = self.depth + 1
  self.depth = depth
  settle(self, depth, rec, co, cw_resume(co, unpack(args, 1, args.n)))
  self.depth = depth - 1
end

local function forget(self, rec)
  local actors = self.actors
  for i = 1, #actors do
    if actors[i] == rec then remove(actors, i) break end
  end
  if self.by_name[rec.name] == rec then self.by_name[rec.name] = nil end
end

-- Stops every actor, in reverse start order.
local function stop_all(self)
  local actors = self.actors
  for i = #actors, 1, -1 do
    local rec = actors[i]
    stop(self, rec)
    rec.state = STOPPED
  end
end

-- Stopped before its actors are: a `<close>` handler that stopping runs
-- cannot introduce an actor that nothing would stop.
local function shut_down(self, reason)
  self.finished = true
  self.stopped_because = reason
  say(self, "Supervisor shutting down: " .. reason)
  stop_all(self)
end

-- The actors a restart of `rec` concerns, in start order.
local function affected(self, rec)
  local strategy = self.strategy
  if strategy == "one_for_one" then return { rec } end
  local set, from = {}, 1
  local actors = self.actors
  if strategy == "rest_for_one" then
    for i = 1, #actors do
      if actors[i] == rec then from = i break end
    end
  end
  for i = from, #actors do
    local r = actors[i]
    if r == rec or r.state ~= STOPPED then set[#set + 1] = r end
  end
  return set
end

-- Counts a restart against the intensity; false when it is one too many.
local function allow_restart(self)
  local now = gettime()
  local history, cutoff = self.history, now - self.period
  local kept = {}
  for i = 1, #history do
    if history[i] > cutoff then kept[#kept + 1] = history[i] end
  end
  kept[#kept + 1] = now
  self.history = kept
  return #kept <= self.intensity
end

local sweep

local function restart(self, rec)
  if not allow_restart(self) then
    return shut_down(self, ("more than %d restart%s within %s seconds (the last for %s)")
      :format(self.intensity, self.intensity == 1 and "" or "s", tostring(self.period), rec.name))
  end
  -- A restart under way from here (see `salvage`), its stops included.
  self.sweeping = self.depth
  local set = affected(self, rec)
  for i = #set, 1, -1 do
    local r = set[i]
    if r ~= rec then
      say(self, "Stopping " .. r.name)
      stop(self, r)
      if r.restart == "temporary" then
        r.state = STOPPED
        forget(self, r)
      else
        r.state = RESTARTING
      end
    end
  end
  return sweep(self, set)
end

-- Starts the actors of `set` a restart stopped, in start order, then
-- handles those that failed meanwhile. `sweeping` holds the depth of the
-- call that sweeps (see `salvage`).
function sweep(self, set)
  self.sweeping = self.depth
  for _, r in ipairs(set) do
    if self.finished then break end
    if r.state == RESTARTING and r.co == nil then
      r.restarts = r.restarts + 1
      say(self, "Restarting " .. r.name)
      start(self, r)
    end
  end
  self.sweeping = false
  -- Actors that failed while the sweep started them.
  local pending = self.pending
  while pending[1] and not self.finished do
    local r = remove(pending, 1)
    if r.state == RESTARTING and r.co == nil then restart(self, r) end
  end
end

-- An actor's coroutine ended (`how`: "error", "returned") or made a request
-- it cannot make ("request"): log it, then apply its restart type.
local function ended(self, rec, co, how, err)
  local name = rec.name
  if how == "error" then
    local text = describe(err)
    if text:find(KILLED) then
      -- The kill message's first line; the rest is where the watch was set.
      text = text:match("^[^\n]*")
      -- Its own limit, or that of an actor it ran for (one that signalled
      -- it, or introduced it), whose clock ran on meanwhile.
      local own = text:find("time of " .. tostring(rec.limit) .. " seconds", 1, true)
      local what = own and "killed at its limit of " .. tostring(rec.limit) .. " seconds"
        or "killed at the limit of an actor it ran for"
      log_traceback(self, co, name, what, text, below_kill(co))
    else
      log_traceback(self, co, name, "failed with error", text)
    end
    rec.last_error = text
  elseif how == "request" then
    rec.last_error = err
    log_traceback(self, co, name, err, "bad return value")
  elseif how == "lost" then
    rec.last_error = err
    log_traceback(self, co, name, "lost its request", err)
  end
  if rec.co ~= co then
    -- Restarted or stopped meanwhile (a log function signalled an actor
    -- whose failure restarted this one): its new life stands; the old
    -- coroutine is only closed.
    if how ~= "returned" then close(self, name, co, how == "error", err) end
    return
  end
  unwait(self, rec)
  clear_inner(self, rec)
  local half_built = building[co]
  if half_built then
    building[co] = nil
    pcall(half_built.done, half_built)
  end
  if how ~= "returned" then close(self, name, co, how == "error", err) end
  -- Restarted or stopped meanwhile, by a `<close>` handler of its: as above.
  if rec.co ~= co then return end
  -- Its coroutine goes only now: a kill that cuts this short (a slow
  -- `<close>` handler, a log) leaves an actor `salvage` ends again.
  rec.co = nil
  local policy = rec.restart
  if policy == "temporary" then
    rec.state = STOPPED
    forget(self, rec)
  elseif (policy == "transient" and how == "returned") or self.finished then
    rec.state = STOPPED
  else
    rec.state = RESTARTING
    if self.sweeping then
      self.pending[#self.pending + 1] = rec
    else
      restart(self, rec)
    end
  end
end

local function request_name(todo, what)
  if todo == "waitfor" then return "waitfor with an invalid event " .. describe(what) end
  return "unknown request " .. describe(todo)
end

local function settle_other(self, rec, co, ok, todo, what)
  if rec.co ~= co then
    -- Stopped or restarted while it ran (from inside an actor): let it go.
    return close(self, rec.name, co, not ok, todo)
  end
  if not ok then return ended(self, rec, co, "error", todo) end
  if todo == RETURNED then return ended(self, rec, co, "returned") end
  if todo == NESTED and getmetatable(what) == Supervisor then
    if not rec.inner then self.nested = self.nested + 1 end
    rec.inner, rec.nested_wait = what, true
    return
  end
  return ended(self, rec, co, "request", request_name(todo, what))
end

-- The common case first: the actor waits again for a valid event.
-- (`Supervisor:signal` has its own copy of this, inline, and of `new_list`.)
-- `depth`: that of the call that resumed the actor; deeper calls still
-- counted were left half done inside it (it died there, or an error it
-- caught left them), and are finished first.
function settle(self, depth, rec, co, ok, todo, what)
  if self.depth ~= depth then salvage(self, depth, co) end
  if ok and todo == "waitfor" and what ~= nil and what == what and rec.co == co then
    local list = self.events[what] or new_list(self, what)
    local n = list.n + 1
    -- One store per statement, in this order (a multiple assignment
    -- stores right to left): a kill between two leaves a record that is
    -- not waiting, which `salvage` mends, never a waiter a count misses.
    rec.list = list
    rec.slot = n
    list.n = n
    list[n] = rec
    return
  end
  return settle_other(self, rec, co, ok, todo, what)
end

-- ----------------------------------------------------------------------
-- The object API
-- ----------------------------------------------------------------------

--- Creates a supervisor.
-- @tparam[opt] table options
-- `strategy`: `"one_for_one"` (default), `"one_for_all"` or `"rest_for_one"`;
-- `intensity` (default 1) and `period` (seconds, default 5): more than
-- `intensity` restarts within `period` seconds stop the supervisor;
-- `limit`: the default limit of its actors, in seconds they may run without
-- waiting (default 1), or `false` for unwatched actors;
-- `log`: a function called with each log line (no timestamp, no newline),
-- or `false` for none (default: timestamped lines on `io.stderr`, as the seed).
-- @treturn supervisor
-- @raise on a bad option, naming it
function M.new(options)
  if options == nil then options = {} end
  if type(options) ~= "table" then argerror(1, "new", "table or nil", options) end
  local strategy = options.strategy
  if strategy == nil then strategy = "one_for_one" end
  if not STRATEGIES[strategy] then
    error("corowatch.supervisor.new: unknown strategy " .. tostring(strategy)
      .. " (one_for_one, one_for_all or rest_for_one)", 2)
  end
  local intensity, period, limit, log = options.intensity, options.period, options.limit, options.log
  if intensity == nil then intensity = 1 end
  if type(intensity) ~= "number" or intensity < 0 or intensity % 1 ~= 0 then
    error("corowatch.supervisor.new: intensity must be an integer >= 0, got " .. tostring(intensity), 2)
  end
  if period == nil then period = 5 end
  if not (type(period) == "number" and period > 0) then
    error("corowatch.supervisor.new: period must be a positive number of seconds, got " .. tostring(period), 2)
  end
  if limit == nil then limit = 1 end
  if not is_limit(limit) then
    error("corowatch.supervisor.new: limit must be a positive number of seconds or false, got "
      .. tostring(limit), 2)
  end
  if log == nil then log = default_log end
  if log ~= false and type(log) ~= "function" then
    error("corowatch.supervisor.new: log must be a function or false, got " .. type(log), 2)
  end
  announce(limit)
  return setmetatable({
    strategy = strategy, intensity = intensity, period = period, limit = limit, log = log,
    actors = {},     -- records in start order
    by_name = {},    -- name -> record
    events = {},     -- event -> list of waiting records
    delivering = {}, -- event -> the list a signal in progress delivers
    deferred = {},   -- event -> signals of it made while it was delivered
    spare = nil,     -- an empty list, for the next signal
    nested = 0,      -- how many actors are nested supervisors
    history = {},    -- times of recent restarts
    pending = {},    -- actors that failed while a restart sweep started them
    sweeping = false,
    finished = false,
    depth = 0,       -- how many calls that resume actors are under way
  }, Supervisor)
end

local function packn(...) return { n = select("#", ...), ... } end

-- A signal made while the same event is being delivered (from inside an
-- actor it resumed): queued, if anyone waits for the event, that is, is
-- still to be resumed by the signal in progress or waits again already.
local function defer(self, event, ...)
  local delivering = self.delivering[event]
  local list = self.events[event]
  local anyone = (list and live(list)) or (self.nested > 0 and waits(self, event))
  if not anyone then
    for i = 1, delivering.n do
      if delivering[i] then anyone = true break end
    end
  end
  if not anyone then
    say(self, "Event " .. describe(event) .. " dropped into the bit bucket")
    return nil
  end
  -- An explicit count: `run_deferred` clears the front while this appends,
  -- and `#` of a table with holes may land on any border.
  local queue = self.deferred[event]
  if not queue then
    queue = { n = 0 }
    self.deferred[event] = queue
  end
  local n = queue.n + 1
  queue.n, queue[n] = n, packn(...)
  return true
end

-- Delivers the signals `defer` queued for `event`, in order: signals
-- deferred meanwhile join the same queue (the signal that started the
-- draining drains them too, so the order holds).
local function run_deferred(self, event)
  local queue = self.deferred[event]
  if queue.draining then return end
  queue.draining = self.depth -- the depth of the signal that drains it
  -- The position is kept in the queue: a drain that `salvage` takes over
  -- goes on from there.
  while (queue.i or 1) <= queue.n and not self.finished do
    local i = queue.i or 1
    local args = queue[i]
    queue[i], queue.i = nil, i + 1
    self:signal(event, unpack(args, 1, args.n))
  end
  self.deferred[event] = nil
end

-- ----------------------------------------------------------------------
-- Calls an actor left half done
-- ----------------------------------------------------------------------
-- Each call that resumes actors (a signal, the start of an actor) counts
-- itself in `self.depth` while it runs, and a signal marks the list it
-- delivers, and the deferred queue it drains, with its depth. An actor
-- that dies inside such a call (it signalled, or introduced an actor, and
-- was killed there, at its own limit or at that of whoever resumed it; an
-- error raised there), or whose own `pcall` caught an error raised there,
-- leaves the call half done. The call that resumed that actor finds deeper
-- calls still counted when the actor comes back to it, and finishes their
-- work: the waiters a signal had not reached yet wait again, ahead of
-- those that began waiting since; the signals deferred meanwhile are
-- delivered; an actor whose answer the cut call lost is ended, logged, and
-- handled by its restart type like any failure (with its kill message, if
-- it was killed); a restart or a shutdown is carried to its end.
-- `back`: the coroutine of the actor that came back (its call settles it).

local LOST_RESULT = "it ended while the call that resumed it was cut short: its result was lost"
local LOST_ANSWER = "its request was lost: the call that resumed it was cut short"

function salvage(self, depth, back)
  if self.depth <= depth then return end
  self.depth = depth
  local events, delivering, deferred = self.events, self.delivering, self.deferred
  local drain = {}
  for event, list in pairs(delivering) do
    if list.depth > depth then
      delivering[event] = nil
      local again = events[event]
      if again and again ~= list then
        for i = 1, again.n do
          local rec = again[i]
          if rec then
            local n = list.n + 1
            list.n = n
            list[n] = rec
            rec.list = list
            rec.slot = n
          end
        end
      end
      events[event] = live(list) and list or nil
      if deferred[event] then drain[#drain + 1] = event end
    end
  end
  for event, queue in pairs(deferred) do
    -- Drained by a dead call, or queued for a delivery that ended and
    -- never drained (the call died between the two).
    local draining = queue.draining
    if (draining and draining > depth) or (not draining and not delivering[event]) then
      queue.draining = nil
      drain[#drain + 1] = event
    end
  end
  local copy = {}
  for i, rec in ipairs(self.actors) do copy[i] = rec end
  local stranded = false
  for _, rec in ipairs(copy) do
    local co = rec.co
    if co == nil and rec.state == RUNNING then
      -- Being introduced, stopped or ended when the call died: started
      -- again (a temporary one is let go).
      if rec.restart == "temporary" then
        rec.state = STOPPED
        forget(self, rec)
      else
        rec.state, stranded = RESTARTING, true
      end
    elseif co and co ~= back and rec.state == RUNNING and not rec.nested_wait and not waiting(rec) then
      local status = raw_status(co)
      if status == "dead" then
        -- Its error, if it can be had: 5.4's close answers it (and runs the
        -- pending `<close>` handlers now); a killed coroutine's resume
        -- answers its kill message.
        local why
        if coclose then why = select(2, coclose(co)) end
        if why == nil then
          why = select(2, cw_resume(co))
          if not (type(why) == "string" and why:find(KILLED)) then why = nil end
        end
        ended(self, rec, co, "error", why or LOST_RESULT)
      elseif status == "suspended" then
        ended(self, rec, co, "lost", LOST_ANSWER)
      end
    end
  end
  for _, event in ipairs(drain) do
    if deferred[event] and not deferred[event].draining and not delivering[event] then
      run_deferred(self, event)
    end
  end
  -- A restart the dead call made: the actors it stopped and had not
  -- started yet (or had marked for a restart it did not begin) are
  -- started, those that failed meanwhile restarted.
  local live_sweep = self.sweeping and self.sweeping <= depth
  if not live_sweep then
    for _, rec in ipairs(self.actors) do
      if rec.state == RESTARTING and rec.co == nil then stranded = true end
    end
  end
  if not live_sweep and (stranded or self.sweeping or self.pending[1]) then
    local queued = {}
    for _, rec in ipairs(self.pending) do queued[rec] = true end
    local set = {}
    for _, rec in ipairs(self.actors) do
      if rec.state == RESTARTING and rec.co == nil and not queued[rec] then set[#set + 1] = rec end
    end
    sweep(self, set)
  end
  -- A shutdown the dead call made: every actor stops.
  if self.finished then stop_all(self) end
end

-- Resumes the nested supervisors that have actors waiting for `event`;
-- one busy inside its own work (an actor of it signals through this one)
-- gets the signal directly, queued there if it delivers that event now.
local function signal_nested(self, event, ...)
  local actors = self.actors
  local copy = {}
  for i = 1, #actors do copy[i] = actors[i] end
  for _, rec in ipairs(copy) do
    local inner = rec.inner
    if inner and rec.nested_wait and waits(inner, event) then
      rec.nested_wait = nil
      local co = rec.co
      local depth = self.depth
      settle(self, depth, rec, co, cw_resume(co, event, ...))
    elseif inner and busy_inner(rec) and not inner.stopped_because and waits(inner, event) then
      inner:signal(event, ...)
    end
  end
end

--- Introduces an actor and runs it until it waits, as the seed does.
-- `sup:introduce(name, fn, ...)` or `sup:introduce{ name =, fn =, args = {...},
-- restart = "permanent" | "transient" | "temporary", limit = seconds | false }`.
-- `fn(...)` runs in a new coroutine, watched with the actor's `limit`
-- (default: the supervisor's). `restart` (default `"transient"`): permanent
-- actors are always restarted, transient ones only after a failure,
-- temporary ones never (and are forgotten when they end). An actor whose
-- `fn` is `supervisor.run` is unwatched unless given a `limit`.
-- The name of a stopped actor may be introduced again: it replaces it.
-- @treturn string the actor's state afterwards (`"waiting"`, `"stopped"`, ...)
-- @raise on bad arguments, a name already in use, a stopped supervisor
function Supervisor:introduce(name, fn, ...)
  check_self(self, "introduce")
  local restart_type, limit, args = "transient", self.limit
  if type(name) == "table" then
    local spec = name
    name, fn, args = spec.name, spec.fn, spec.args
    if type(name) ~= "string" then argerror(1, "introduce", "field 'name': string", name) end
    if type(fn) ~= "function" then argerror(1, "introduce", "field 'fn': function", fn) end
    if args == nil then
      args = { n = 0 }
    elseif type(args) ~= "table" then
      argerror(1, "introduce", "field 'args': table or nil", args)
    elseif args.n ~= nil and (type(args.n) ~= "number" or args.n < 0 or args.n % 1 ~= 0) then
      argerror(1, "introduce", "field 'args.n': integer >= 0 or nil", args.n)
    else
      args = { n = args.n or #args, unpack(args, 1, args.n or #args) }
    end
    if spec.restart ~= nil then
      restart_type = spec.restart
      if not RESTARTS[restart_type] then
        error("corowatch.supervisor: introduce: unknown restart type " .. tostring(restart_type)
          .. " (permanent, transient or temporary)", 2)
      end
    end
    if spec.limit ~= nil then
      limit = spec.limit
      if not is_limit(limit) then
        error("corowatch.supervisor: introduce: limit must be a positive number of seconds or false, got "
          .. tostring(limit), 2)
      end
    elseif fn == M.run then
      limit = false
    end
  else
    if type(name) ~= "string" then argerror(1, "introduce", "string or table", name) end
    if type(fn) ~= "function" then argerror(2, "introduce", "function", fn) end
    args = packn(...)
    if fn == M.run then limit = false end
  end
  local old = self.by_name[name]
  if old then
    if old.state ~= STOPPED then
      error("corowatch.supervisor: introduce: an actor named " .. ("%q"):format(name) .. " already exists", 2)
    end
    forget(self, old)
  end
  -- Counted from here (see `salvage`): a record added and not started yet
  -- is started if its caller dies first.
  local depth = self.depth + 1
  self.depth = depth
  if limit ~= self.limit then announce(limit) end
  local rec = { name = name, fn = fn, args = args, restart = restart_type, limit = limit, restarts = 0,
    state = RUNNING }
  self.actors[#self.actors + 1] = rec
  self.by_name[name] = rec
  start(self, rec)
  self.depth = depth - 1
  return state_of(rec)
end

--- Signals an event: resumes every actor waiting for it with `(event, ...)`,
-- in the order they began to wait (then nested supervisors that have actors
-- waiting for it, in start order). Actors that wait for the same event again
-- are not resumed again by this call.
-- @param event any value but nil and NaN
-- @return `true` if someone waits for `event` afterwards, `false` if not,
-- `nil` if nobody was waiting (logged: "Event ... dropped into the bit bucket")
-- @raise if the supervisor is stopped
function Supervisor:signal(event, ...)
  -- The hot path: no more calls than it needs (on 5.4 a vararg call alone
  -- costs about half a resume). A bad self is told apart where it fails.
  local events = self.events
  if events == nil or self.stopped_because then check_self(self, "signal") end
  local list, delivering
  if event ~= nil then
    list = events[event]
    delivering = self.delivering
    if delivering[event] then return defer(self, event, ...) end
  end
  if not (list and (list[list.n] or live(list)))
      and not (self.nested > 0 and event ~= nil and waits(self, event)) then
    say(self, "Event " .. describe(event) .. " dropped into the bit bucket")
    return nil
  end
  -- Counted as a call that resumes actors (see `salvage`).
  local depth = self.depth + 1
  self.depth = depth
  -- LuaJIT: through the probe, unless a delivery runs already.
  local fast = probed and WATCHED_RUNNING == 0 and (PROBE_LIMIT == 0 or clear_stale_probe())
  local resume = fast and raw_resume or cw_resume
  if fast and self.watches_seen ~= cw_shared.watches_set then reroute(self) end
  if list then
    -- Take the list out: whoever waits again lands in another one. (In
    -- this order: a kill between two steps leaves what `salvage` mends.)
    list.depth = depth
    delivering[event] = list
    events[event] = nil
    -- Resume each actor in it; `settle`'s common case inline, and
    -- `new_list`'s too.
    for i = 1, list.n do
      local rec = list[i]
      if rec then
        list[i] = nil
        local co = rec.co
        local run = resume
        if fast then
          local route = rec.route -- see `route_of`
          if route == "probed" then
            -- One store per statement, the count (new for each delivery)
            -- last: the watchdog reads them one by one.
            PROBE_CO = co
            PROBE_LIMIT = rec.limit
            PROBE_COUNT = PROBE_COUNT + 1
          elseif route == "slow" then
            run = cw_resume
          end
        end
        local ok, todo, what = run(co, event, ...)
        if fast then
          PROBE_LIMIT = 0
          PROBE_CO = false
        end
        if self.depth ~= depth then salvage(self, depth, co) end -- see `settle`
        if ok and todo == "waitfor" and what ~= nil and what == what and rec.co == co then
          local again = events[what]
          if not again then
            again = self.spare
            if again then
              self.spare, again.event = nil, what
            else
              again = { n = 0, event = what }
            end
            events[what] = again
          end
          local n = again.n + 1
          rec.list = again -- one store per statement: see `settle`
          rec.slot = n
          again.n = n
          again[n] = rec
        else
          settle_other(self, rec, co, ok, todo, what)
        end
      end
    end
  end
  -- The nested supervisors' actors get it while it is still being
  -- delivered: a signal of it they make waits behind those made before.
  if self.nested > 0 then signal_nested(self, event, ...) end
  if list then
    delivering[event] = nil
    list.n, list.event = 0, nil
    self.spare = list
  end
  if self.deferred[event] then run_deferred(self, event) end
  self.depth = depth - 1
  if self.finished then return false end
  list = events[event]
  if list and (list[list.n] or live(list)) then return true end
  return self.nested > 0 and waits(self, event)
end

--- Reports on every actor, and logs who waits for what, as the seed does.
-- @treturn {table,...} rows `{ name =, state = "waiting" | "running" |
-- "restarting" | "stopped", event =, restarts =, last_error = }`, sorted by
-- name (`event`: what a waiting actor waits for; `last_error`: the message
-- of its last failure, if any)
function Supervisor:status()
  if getmetatable(self) ~= Supervisor then
    error(("calling 'status' on bad self (supervisor expected, got %s)"):format(type(self)), 2)
  end
  local rows = {}
  for i, rec in ipairs(self.actors) do
    local event -- `false` is an event too
    if waiting(rec) then event = rec.list.event end
    rows[i] = { name = rec.name, state = state_of(rec), event = event,
      restarts = rec.restarts, last_error = rec.last_error }
  end
  sort(rows, function(a, b) return a.name < b.name end)
  for _, row in ipairs(rows) do
    if row.state == WAITING and row.event ~= nil then
      say(self, row.name .. " is waiting for " .. describe(row.event))
    end
  end
  return rows
end

--- Stops every actor, in reverse start order (on 5.4 through
-- `coroutine.close`, so their pending `<close>` handlers run), and the
-- supervisor with them: later `introduce` and `signal` raise an error.
-- Calling it again does nothing.
function Supervisor:done()
  if getmetatable(self) ~= Supervisor then
    error(("calling 'done' on bad self (supervisor expected, got %s)"):format(type(self)), 2)
  end
  if self.finished then return end
  self.finished = true
  self.stopped_because = self.stopped_because or DONE_REASON
  stop_all(self)
end

-- ----------------------------------------------------------------------
-- The seed's protocol
-- ----------------------------------------------------------------------

local commands = {
  introduce = function(self, ...) self:introduce(...) end,
  signal = Supervisor.signal,
  status = function(self) self:status() end,
  done = function(self) self:done(); self.serve_done = true end,
}

local function unknown(self, what, ...)
  say(self, "Supervisor received unknown message " .. describe(what))
  local n = select("#", ...)
  if n > 0 then
    local t = { ... }
    for i = 1, n do
      local ti = t[i]
      t[i] = (type(ti) == "string" and "%q" or "%s"):format(describe(ti))
    end
    say(self, "..with arguments: " .. concat(t, ", ", 1, n))
  end
end

local signal = Supervisor.signal

local function handle(self, command, ...)
  -- The hot command first: signal raises only when the supervisor is stopped.
  if command == "signal" and not self.stopped_because then return signal(self, ...) end
  local run = commands[command]
  if run == nil then return unknown(self, command, ...) end
  local ok, rv = pcall(run, self, ...)
  if not ok then
    -- The serving coroutine's own kill is not a command's failure: it
    -- stays dead (LuaJIT's `serve` yields through LuaJIT's own yield,
    -- which does not ask). (The main thread of 5.1 and LuaJIT is nil.)
    local me = raw_running()
    if me and cw_status(me) == "dead" then error(rv, 0) end
    say(self, "Supervisor command " .. tostring(command) .. " failed: " .. describe(rv))
    return nil
  end
  return rv
end

-- How `serve` yields. On LuaJIT corowatch's yield is a Lua function that
-- refuses a killed coroutine (`handle` asks that itself) and then calls
-- LuaJIT's own, at a third of a delivery's cost; elsewhere it is the C
-- function that keeps corowatch's chain.
local serve_yield = jit and coroutine.yield or cw_yield

--- Runs the seed's protocol on this supervisor, as the body of a coroutine:
-- `coroutine.create(function(...) return sup:serve(...) end)`, then
-- `resume(co, "introduce", name, fn, ...)`, `"signal", event, ...` (answers
-- as `signal`), `"status"`, `"done"` (the coroutine then returns). Unknown
-- commands and commands that fail are logged; the coroutine goes on.
function Supervisor:serve(...)
  if getmetatable(self) ~= Supervisor then
    error(("calling 'serve' on bad self (supervisor expected, got %s)"):format(type(self)), 2)
  end
  say(self, "Starting up")
  local rv = handle(self, ...)
  while not self.serve_done do
    rv = handle(self, serve_yield(rv))
  end
  say(self, "Shutting down")
end

--- The seed's `supervisor` function: a coroutine body that runs the seed's
-- protocol on a new supervisor with default options.
-- `local super = coroutine.create(supervisor.coroutine)`.
function M.coroutine(...)
  return M.new():serve(...)
end

--- Waits for an event, from inside an actor: `coroutine.yield("waitfor", event)`.
-- @param event any value but nil and NaN
-- @return the event and the values it was signalled with
function M.waitfor(event)
  if event == nil or event ~= event then argerror(1, "waitfor", "event (not nil or NaN)", event) end
  return cw_yield("waitfor", event)
end

-- The body of a nested supervisor's actor after `init`: waits for whatever
-- its actors wait for and signals what it receives, until none is left.
local function serve_nested(sup)
  if sup.stopped_because and sup.stopped_because ~= DONE_REASON then
    error("corowatch.supervisor: the nested supervisor stopped: " .. sup.stopped_because, 0)
  end
  for _, rec in ipairs(sup.actors) do
    if rec.state ~= STOPPED then return true end
  end
  return false
end

local function relay(sup, ...)
  sup:signal(...)
  if serve_nested(sup) then return relay(sup, cw_yield(NESTED, sup)) end
end

--- A nested supervisor, as the body of an actor of another supervisor:
-- `outer:introduce("inner", supervisor.run, options, init, ...)`. It creates
-- a supervisor with `options`, calls `init(sup, ...)` to introduce its
-- actors, then waits for whatever they wait for: the outer supervisor's
-- signals reach them. It fails (and the outer supervisor applies its
-- restart type) when it shuts down, and returns when none of its actors is
-- left. A restart builds a new supervisor and calls `init` again.
-- @tparam ?table options as for `new`
-- @tparam function init
function M.run(options, init, ...)
  if type(init) ~= "function" then argerror(2, "run", "function", init) end
  local sup = M.new(options)
  local co = raw_running()
  building[co] = sup
  init(sup, ...)
  building[co] = nil
  if serve_nested(sup) then return relay(sup, cw_yield(NESTED, sup)) end
end
return M
