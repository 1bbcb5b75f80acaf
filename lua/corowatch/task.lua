--- Tasks in the style of Coop (coroutines with a future, await, cancel,
-- timeouts, groups) for plain Lua, where a cancel or a timeout reaches code
-- that never yields: it lands at the task's next Lua instruction, through
-- the native hook that mtint and corowatch share.
--
-- How a cancel lands: every task's coroutine has an mtint interrupt
-- handler (`on_interrupt` below). A cancel, a timeout's deadline (on the
-- watchdog thread) or another OS thread's `cancel_id` interrupts the thread
-- that runs a task now (the scheduler's native cell); the handler, on that
-- thread, takes what is due and raises the cancellation error. A waiting
-- task is woken by the scheduler and its wait raises. Once a cancel has
-- been raised, a grace period starts; after it the interrupt is sticky:
-- raised at every instruction, as corowatch's kill is.
-- @module corowatch.task

local core = require("corowatch.core")
local corowatch = require("corowatch")
local mtint = require("mtint")

-- Compatibility: table.pack/unpack, and whether pcall can yield across
-- (Lua 5.2+ and LuaJIT; PUC Lua 5.1 runs task.pcall's function on a
-- coroutine of its own instead).
local unpack = table.unpack or unpack -- luacheck: ignore 143
-- Our own `pack`, never a `table.pack` that another library put there in
-- Lua (Penlight does on 5.1 and LuaJIT): the interrupt handler tells this
-- file's code from the user's by its source (see `landed_in_library`).
local function pack(...) return { n = select("#", ...), ... } end
local PUC51 = _VERSION == "Lua 5.1" and type(rawget(_G, "jit")) ~= "table"
local PCALL_YIELDS = not PUC51
-- PUC Lua 5.1 cannot run a C function as a coroutine's body.
local function coroutine_body(fn)
  if PUC51 then return function(...) return fn(...) end end
  return fn
end

local native = core.task
local cw_create, cw_resume, cw_yield, cw_status, cw_watch =
  corowatch.create, corowatch.resume, corowatch.yield, corowatch.status, corowatch.watch
local gettime = corowatch.gettime
local mtint_id, mtint_sethook, mtint_interrupt = mtint.id, mtint.sethook, mtint.interrupt
local raw_running = coroutine.running
-- Lua 5.4: a coroutine that died by an error keeps its pending <close>
-- variables until coroutine.close. corowatch's close runs them with the
-- task's limit in force and with its hooks on: a cancel or a kill raised
-- from a hook left them off for good, and Lua's own close would run the
-- handlers out of every interrupt's and watch's reach.
local coroutine_close = corowatch.close
local traceback, getinfo = debug.traceback, debug.getinfo
local LIBRARY_SOURCE = getinfo(1, "S").source -- this file's
local error, pcall, xpcall, type, select, tostring, setmetatable, getmetatable, next =
  error, pcall, xpcall, type, select, tostring, setmetatable, getmetatable, next
local math_huge, math_max, math_min, math_floor = math.huge, math.max, math.min, math.floor
local table_concat, table_remove = table.concat, table.remove
local io = io -- io.stderr is read at each report: a host may replace it

local M = {
  _VERSION = "corowatch.task " .. core._VERSION,
  _INFO = "Coop-style tasks whose cancel and timeout reach code that never yields",
}

--- Kinds of cancellation errors (`err.kind`), each its own full name.
M.error = {
  cancelled = "corowatch.task.cancelled",
  timeout = "corowatch.task.timeout",
}

local DEFAULT_GRACE = 0.1
local WAIT, YIELD = {}, {} -- what a task yields to the scheduler
local EMPTY = { n = 0 }

local function argerror(position, name, expected, got)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), 3)
end

local function check_seconds(position, name, value, allow_zero)
  if type(value) ~= "number" or value ~= value or value < 0
      or (value == 0 and not allow_zero) or value == math_huge then
    argerror(position, name, allow_zero and "non-negative number of seconds"
      or "positive number of seconds", value)
  end
end

-- ----------------------------------------------------------------------
-- Scheduler state (one per Lua state)

-- The native objects have no methods: every operation is a function of
-- `native`, behind the core's gate.
local cell_set, deadline_cancel = native.cell_set, native.deadline_cancel
local mailbox = native.mailbox()
local mailbox_fd = native.mailbox_fd(mailbox) -- readable when a cross-thread cancel came
local backend -- set with task.use: waits in a host's event loop
-- The thread that runs a task now; none (no id is 0) while none runs.
local NO_THREAD = 0
local cell = native.cell(NO_THREAD)
-- An interrupt was asked for as the last task stopped (see `run_task`).
local asked_meanwhile = false
native.mailbox_set_cell(mailbox, cell)

local by_thread = setmetatable({}, { __mode = "k" }) -- thread -> task
local by_id = {} -- id -> live task
local ready = {} -- tasks to run at the next step, in order
local current -- the task the scheduler runs now
local driving = false -- a step runs

-- Timers: a binary heap ordered by (at, seq). An entry wakes a sleeping
-- task { at, seq, task, gen } or expires a timeout scope { at, seq, scope }.
local heap, heap_n, timer_seq = {}, 0, 0

local function before(a, b)
  return a.at < b.at or (a.at == b.at and a.seq < b.seq)
end

local function timer_push(entry)
  timer_seq = timer_seq + 1
  entry.seq = timer_seq
  heap_n = heap_n + 1
  local i = heap_n
  heap[i] = entry
  while i > 1 do
    local parent = (i - i % 2) / 2
    if not before(heap[i], heap[parent]) then break end
    heap[i], heap[parent] = heap[parent], heap[i]
    i = parent
  end
  return entry
end

local function sift_down(i)
  while true do
    local l, r, smallest = 2 * i, 2 * i + 1, i
    if l <= heap_n and before(heap[l], heap[smallest]) then smallest = l end
    if r <= heap_n and before(heap[r], heap[smallest]) then smallest = r end
    if smallest == i then break end
    heap[i], heap[smallest] = heap[smallest], heap[i]
    i = smallest
  end
end

-- Entries whose task woke otherwise or whose scope closed stay in the heap
-- until they come up; when they are most of it, it is rebuilt without them
-- (10^5 cancelled sleepers must not keep their tasks alive for an hour).
local stale = 0

local function is_live(entry)
  if entry.scope then return true end
  local t = entry.task
  return t ~= nil and t._gen == entry.gen and t._status == "waiting"
end

local function timer_pop()
  local top = heap[1]
  heap[1] = heap[heap_n]
  heap[heap_n] = nil
  heap_n = heap_n - 1
  sift_down(1)
  return top
end

local function timer_stale()
  stale = stale + 1
  if stale > 64 and stale * 2 > heap_n then
    local kept = {}
    for i = 1, heap_n do
      if is_live(heap[i]) then kept[#kept + 1] = heap[i] end
    end
    heap, heap_n, stale = kept, #kept, 0
    for i = math_floor(heap_n / 2), 1, -1 do sift_down(i) end
  end
end

-- ----------------------------------------------------------------------
-- Errors

local Error = {}
Error.__index = Error

function Error.__tostring(err)
  local text = err.message
  if err.traceback then text = text .. "\n" .. err.traceback end
  return text
end

local function task_label(t)
  return t.name and ("task '" .. t.name .. "'") or ("task " .. tostring(t._id))
end

-- A value as text, whatever it is: one whose `__tostring` fails, or
-- answers no string (5.1, 5.2 and LuaJIT pass that on), is named by its
-- type. The scheduler's bookkeeping must not fail on a user's value.
local function describe(value)
  if type(value) == "string" then return value end
  local ok, text = pcall(tostring, value)
  if ok and type(text) == "string" then return text end
  return "(a " .. type(value) .. " value that tostring cannot print)"
end

local function new_error(kind, t, reason, seconds)
  local message
  if kind == M.error.timeout then
    message = ("%s: %s timed out after %s seconds"):format(kind, task_label(t), tostring(seconds))
  else
    message = ("%s: %s was cancelled"):format(kind, task_label(t))
    if reason ~= nil then message = message .. " (" .. describe(reason) .. ")" end
  end
  return setmetatable({ kind = kind, task = t, reason = reason, message = message }, Error)
end

--- Whether `err` is a cancellation error (`cancelled` or `timeout`).
-- @param err any value
-- @treturn boolean
function M.is_cancellation(err)
  return getmetatable(err) == Error
end
local is_cancellation = M.is_cancellation

--- Called with `(err, task)` for an error of a task that nobody awaited.
-- The default writes one line and the traceback to `io.stderr`.
function M.on_error(err, t)
  local text = describe(err)
  if t and t._traceback and not is_cancellation(err) then
    text = text .. "\n" .. t._traceback
  end
  io.stderr:write(("corowatch.task: unhandled error in %s: %s\n")
    :format(t and task_label(t) or "a task", text))
end

local function report(err, t)
  local ok, failure = pcall(M.on_error, err, t)
  if not ok then
    io.stderr:write("corowatch.task: on_error failed: " .. tostring(failure) .. "\n")
  end
end

-- ----------------------------------------------------------------------
-- Tasks

local Task = {}
Task.__index = Task
local ended_status = { done = true, failed = true, cancelled = true }

local function running_task()
  return by_thread[raw_running() or false]
end

-- Critical sections: library code that changes the scheduler's tables
-- while running on a task's thread. The interrupt handler does nothing
-- there (it marks the task) and the section's end does what was deferred.
local due, poll

local function enter_critical()
  local t = running_task()
  if t then t._critical = t._critical + 1 end
  return t
end

local function leave_critical(t)
  if not t then return end
  t._critical = t._critical - 1
  if t._critical == 0 and t._deferred then
    -- Interrupt again: the handler runs at the caller's next instruction.
    t._deferred = false
    mtint_interrupt(t._stack[#t._stack])
  end
end

local function enqueue(t)
  ready[#ready + 1] = t
end

-- Wakes a waiting task, if it still waits for the wait numbered `gen`
-- (not for its children, once its body ended: a waiter it left behind on
-- a future, say, must not resume its dead coroutine).
local function wake(t, gen, ...)
  if t._status == "waiting" and t._gen == gen and not t._body_done then
    local timer = t._timer
    if timer then
      t._timer = nil
      timer.task = nil
      if timer.at > gettime() then timer_stale() end
    end
    t._status = "ready"
    t._waiting_on = nil
    t._resume_args = select("#", ...) > 0 and pack(...) or EMPTY
    enqueue(t)
  end
end

-- Starts a grace period after a cancellation error was raised: past it,
-- the interrupt is sticky. `holder` is the task or the timeout scope.
local function start_grace(holder, t)
  holder._grace_at = gettime() + t._grace
  holder._grace_deadline = native.deadline(cell, t._grace, true)
end

-- The stack from the first frame above this file's own that is the
-- user's: where the interrupt landed, or what called the library's wait
-- (native: written in Lua it was most of a timeout's overshoot).
local function stack_traceback()
  return native.traceback(LIBRARY_SOURCE)
end

local function raise_point(err)
  if not err.traceback then err.traceback = stack_traceback() end
  return err
end

-- The error that `t` keeps getting past its grace period, if any.
local function hard_error(t)
  local now = gettime()
  local shield = t._shield
  if shield == 0 and t._delivered and now >= t._grace_at then return t._cancel_err end
  local scopes = t._scopes
  for i = 1, #scopes do
    local scope = scopes[i]
    if scope.fired and not scope.closed and scope.shield >= shield
        and now >= scope._grace_at then
      return scope.err
    end
  end
  return nil
end

--- What is due for task `t` now, or nil: its cancellation error, or the
-- error of its outermost expired timeout scope. From the hook
-- (`from_hook`), an error already raised once is raised again only after
-- the grace period; at a wait point, always.
function due(t, from_hook)
  local now = gettime()
  local shield = t._shield
  local err = shield == 0 and t._cancel_err
  if err then
    if not t._delivered then
      t._delivered = true
      start_grace(t, t)
      return raise_point(err)
    elseif not from_hook or now >= t._grace_at then
      return err
    end
    -- Raised, and on its way out or caught, within its grace period: no
    -- timeout inside may take its place.
    return nil
  end
  local scopes = t._scopes
  for i = 1, #scopes do
    local scope = scopes[i]
    -- A shield defers the scopes opened outside it, not those inside.
    if not scope.closed and scope.shield >= shield and now >= scope.at then
      if not scope.fired then
        scope.fired = true
        -- The scope's deadline comes back sticky a grace period after it
        -- fired (`task.timeout`), unless this raise is later than that (a
        -- shield deferred it).
        local grace_at = scope.at + t._grace
        if now < grace_at then
          scope._grace_at = grace_at
        else
          start_grace(scope, t)
        end
        return raise_point(scope.err)
      elseif not from_hook or now >= scope._grace_at then
        return scope.err
      end
      -- Fired, and on its way out or caught, within its grace period: no
      -- scope inside it may fire in its place (the error it raised would
      -- replace this one, and be caught by its own scope).
      return nil
    end
  end
  return nil
end

local cancel -- cancel(t, reason, kind)

local function inside(inner, scope)
  while inner do
    if inner == scope then return true end
    inner = inner.outer
  end
  return false
end

-- A timeout scope expired: wake its task if it waits, and cancel the
-- children spawned inside the scope (they may be the ones running).
local function expire_scope(scope)
  if scope.closed then return end
  local t = scope.task
  -- Not a wait shielded from this scope (a shield begun inside it).
  if t._status == "waiting" and not t._body_done and scope.shield >= t._shield then
    wake(t, t._gen)
  end
  for child in next, t._children do
    if inside(child._scope, scope) then cancel(child, "timeout") end
  end
end

--- Takes what arrived: cancels from other OS threads, due timers.
function poll()
  local cancels = native.mailbox_drain(mailbox)
  for i = 1, cancels and #cancels or 0, 2 do
    local t = by_id[cancels[i]]
    local reason = cancels[i + 1]
    if t then cancel(t, reason or nil) end
  end
  local now = gettime()
  while heap_n > 0 and heap[1].at <= now do
    local entry = timer_pop()
    if entry.scope then
      expire_scope(entry.scope)
    elseif entry.task then
      wake(entry.task, entry.gen)
    end
  end
end

-- This file's code is the scheduler's bookkeeping: an error raised in it
-- could leave a timeout scope on its task or the cell on a dead thread.
-- Code that this file calls and that runs no user code: C functions (on
-- LuaJIT a hook may land in a builtin such as `select`) and the Lua sides
-- of mtint and corowatch.
local PASSED_THROUGH = {
  ["=[C]"] = true,
  [getinfo(mtint.interrupt, "S").source] = true,
  [getinfo(corowatch.watch, "S").source] = true,
}

-- Whether the interrupt landed in this file's code, or in code it called
-- that runs no user code (level 3 is the interrupted function: past this
-- one and the handler).
local function landed_in_library()
  local level = 3
  while true do
    local info = getinfo(level, "S")
    if not info then return false end
    local source = info.source
    if source == LIBRARY_SOURCE then return true end
    if not PASSED_THROUGH[source] then return false end
    level = level + 1
  end
end

-- How long before a timeout's deadline its interrupt may come (the
-- native deadline's lead, with room to spare).
local LEAD = 0.001

-- Whether a timer comes due within LEAD: a timeout's deadline fired its
-- lead. The scope may be another task's (an ancestor's, whose expiry
-- cancels the running task, or one whose task waits): whichever task runs
-- keeps the handler warm until the timer is taken.
local function expires_soon()
  return heap_n > 0 and heap[1].at <= gettime() + LEAD
end

-- Whether another of `t`'s timeout scopes comes due within LEAD: its
-- deadline's early interrupt may have come, and been cleared by a raise.
local function scope_due_soon(t)
  local scopes = t._scopes
  if scopes[1] == nil then return false end
  local soon = gettime() + LEAD
  for i = 1, #scopes do
    local scope = scopes[i]
    if not scope.closed and not scope.fired and scope.at <= soon then return true end
  end
  return false
end

-- How early a deadline's first interrupt comes (src/task/deadline.rs's
-- LEAD): the one that may have reached no thread.
local DEADLINE_LEAD = jit and 0.0003 or 0.00015

-- Whether the task about to run, `t`, must be interrupted for what came
-- while no interrupt could reach it (the cell named no thread, or another
-- task's): a timeout scope's deadline within its lead (the earliest timer,
-- whoever's: the deadline's own early interrupt goes to whatever task
-- runs, and its handler sorts it out); with `plain` (it stopped at a
-- plain `coroutine.yield`, no wait point) a cancel or an expired scope of
-- its own too (a wait point it comes back to raises those itself).
local function due_on_resume(t, plain)
  local now
  local first = heap_n > 0 and heap[1]
  if first and first.scope and not first.scope.closed then
    now = gettime()
    if first.at <= now + DEADLINE_LEAD and now < first.at then return true end
  end
  if not plain then return false end
  local shield = t._shield
  if shield == 0 and t._cancel_err and not t._delivered then return true end
  local scopes = t._scopes
  if scopes[1] == nil then return false end
  now = now or gettime()
  local soon = now + DEADLINE_LEAD
  for i = 1, #scopes do
    local scope = scopes[i]
    if not scope.closed and not scope.fired and scope.shield >= shield and soon >= scope.at then
      return true
    end
  end
  return false
end

-- The mtint interrupt handler of every task's threads: runs on the
-- interrupted thread, at the instruction where the interrupt landed.
-- Errors are raised only in the user's code: an interrupt landing in this
-- file's code comes again at the next instruction (at the end of a
-- critical section, for those).
local function on_interrupt()
  local t = running_task()
  if not t then return end
  if t._critical > 0 then
    t._deferred = true
    return
  end
  if landed_in_library() then
    if not t._sticky then mtint_interrupt(mtint_id()) end
    return
  end
  poll()
  local err = due(t, true)
  if err then
    t._warm = nil
    if not t._sticky then
      if hard_error(t) then
        t._sticky = true
        mtint_interrupt(mtint_id(), true)
      else
        -- Sticky only for a timeout's lead (or once, and taken): off, so
        -- that the unwinding runs without the handler. A cancel that
        -- another thread sent meanwhile had its interrupt cleared too: it
        -- comes again once this error is caught. (Not raised instead:
        -- `due` has marked this error's scope fired.)
        mtint_interrupt(mtint_id(), false)
        poll()
        if t._cancel_err and not t._delivered or scope_due_soon(t) then
          mtint_interrupt(mtint_id())
        end
      end
    end
    error(err, 0)
  end
  if not t._sticky and expires_soon() then
    -- A timeout's deadline fired its lead: the interrupt stays sticky, and
    -- this handler raises at the deadline itself. Its first run after a
    -- CPU-bound stretch pays the cache misses; the raise's own steps (the
    -- traceback, the interrupt's path) are taken once now, so that they
    -- are warm at the deadline.
    if not t._warm then
      t._warm = true
      stack_traceback()
      mtint_interrupt(mtint_id(), true)
    end
    return
  end
  t._warm = nil
  -- Nothing due here now (a scope closed, a shield defers, or the interrupt
  -- was another task's: a timeout's lead goes to whichever task runs), and
  -- the interrupt may be sticky (a grace deadline, a lead): it would only
  -- slow this thread down. A cancel that another thread sent meanwhile had
  -- its interrupt cleared too, so look at the mailbox once more.
  t._sticky = false
  mtint_interrupt(mtint_id(), false)
  poll()
  err = due(t, true)
  if err then error(err, 0) end
end

-- Before a task waits, and after it woke: raise what is due.
local function check(t)
  poll()
  local err = due(t, false)
  if err then error(err, 0) end
end

local function begin_wait(t, what)
  check(t)
  t._gen = t._gen + 1
  t._waiting_on = what
  return t._gen
end

-- Takes `t` off the list of waiters of the task or future it waited for,
-- if it is still on it.
local function stop_awaiting(t)
  local awaited = t._awaiting
  if awaited then
    t._awaiting = nil
    awaited:_forget(t)
  end
end

local function after_wait(t, ...)
  -- A wait for a task or a future that was given up (a cancel, a timeout)
  -- leaves nothing on its list of waiters.
  stop_awaiting(t)
  check(t)
  return ...
end

-- Yields to the scheduler until woken; returns the waker's values.
local function suspend(t)
  return after_wait(t, cw_yield(WAIT))
end

local function the_task(name)
  local t = running_task()
  if not t then error(("corowatch.task.%s: called outside a task"):format(name), 3) end
  return t
end

-- Marks `t` cancelled (and its descendants); a waiting task is woken, the
-- running one is interrupted at its next instruction.
function cancel(t, reason, kind)
  if ended_status[t._status] or t._body_done then return false end
  if t._cancel_err then return true end
  t._cancel_err = new_error(kind or M.error.cancelled, t, reason)
  if t._status == "waiting" then
    -- A shielded wait goes on: the cancel is raised once the shield ends.
    if t._shield == 0 then wake(t, t._gen) end
  elseif t._status == "running" then
    mtint_interrupt(t._stack[#t._stack], nil)
  end
  for child in next, t._children do cancel(child, reason ~= nil and reason or "parent cancelled") end
  return true
end

local settle
local wake_waiters -- wake_waiters(object): a task or future ended

local function unobserved_failure(t)
  return t._status == "failed" and not t._observed and not t._group
end

-- The task and all its children have ended: its outcome is final.
function settle(t)
  t._status = t._outcome
  t._outcome = nil
  if t._grace_deadline then deadline_cancel(t._grace_deadline); t._grace_deadline = nil end
  wake_waiters(t)
  local parent = t._parent
  if parent then
    parent._children[t] = nil
    parent._live = parent._live - 1
    if unobserved_failure(t) then
      if parent._body_done then
        report(t._err, t)
      else
        -- Reported when the parent ends, if it has not awaited it by then.
        local list = parent._failed_children or {}
        parent._failed_children = list
        list[#list + 1] = t
      end
    end
    if parent._body_done and parent._live == 0 then settle(parent) end
  elseif unobserved_failure(t) then
    report(t._err, t)
  end
  if t._group then t._group:_child_ended(t) end
end

-- The body of `t` returned (ok) or raised; results in `res`.
local function body_end(t, ok, res)
  t._body_done = true
  -- A wait that raised before it suspended left the task on a list.
  stop_awaiting(t)
  by_thread[t._co] = nil
  by_id[t._id] = nil
  native.mailbox_unregister(mailbox, t._id)
  for i = 1, #t._scopes do deadline_cancel(t._scopes[i].deadline) end
  if t._grace_deadline then deadline_cancel(t._grace_deadline) end
  -- Its thread is dead: an interrupt left there (a cancel or a deadline
  -- that came as it ended, a sticky one) would keep the hook armed until
  -- the thread is collected, and LuaJIT's hook is global. Only a task that
  -- was cancelled or opened a timeout scope pays for the call.
  if t._sticky or t._cancel_err or t._scoped then
    t._sticky = false
    mtint_interrupt(t._id, false)
  end
  local cancel_err = t._cancel_err
  if cancel_err then
    t._outcome, t._err = "cancelled", cancel_err
    local err = res[2]
    if not ok and not is_cancellation(err) then
      -- Cleanup failed after the cancel: not lost.
      t._traceback = traceback(t._co, describe(err))
      report(err, t)
    end
  elseif ok then
    t._outcome, t._results = "done", res
  else
    t._outcome, t._err = "failed", res[2]
    t._traceback = traceback(t._co, describe(res[2]))
  end
  -- After the traceback was taken: closing unwinds the stack.
  if coroutine_close and not ok and t._started then
    local closed, close_err = coroutine_close(t._co)
    if not closed and close_err ~= res[2] and not is_cancellation(close_err) then
      report(close_err, t)
    end
  end
  -- Children it left behind are cancelled; it ends when they have ended.
  local failed = t._failed_children
  t._failed_children = nil
  if failed then
    for i = 1, #failed do
      if unobserved_failure(failed[i]) then report(failed[i]._err, failed[i]) end
    end
  end
  for child in next, t._children do cancel(child, "parent ended") end
  if t._live == 0 then
    settle(t)
  else
    t._status = "waiting"
    t._waiting_on = "its children to end"
  end
end

-- Runs `t` until it waits, yields or ends.
local function run_task(t)
  local args
  if not t._started then
    if t._cancel_err then
      -- Cancelled before it first ran: its body never runs.
      t._status = "running"
      return body_end(t, false, { n = 2, false, t._cancel_err })
    end
    t._started = true
    args = t._args
    t._args = nil
  else
    args = t._resume_args or EMPTY
    t._resume_args = nil
  end
  t._status = "running"
  local previous = current
  current = t
  local stack = t._stack
  -- An interrupt asked for while the cell named no thread reached nobody
  -- (or, just as the last task stopped, that task's thread): what it
  -- brought (a cross-thread cancel, a timer) is taken now.
  if cell_set(cell, stack[#stack]) or asked_meanwhile then
    asked_meanwhile = false
    poll()
  end
  if hard_error(t) then
    -- Past its grace period while it waited elsewhere: sticky from the start.
    t._sticky = true
    mtint_interrupt(stack[#stack], true)
  elseif due_on_resume(t, t._plain_yield) then
    -- Cancelled or timed out (or about to be) while it was not running:
    -- it lands at its next instruction, as if it had run all along.
    mtint_interrupt(stack[#stack])
  end
  local res = pack(cw_resume(t._co, unpack(args, 1, args.n)))
  -- No task runs now: a deadline or a cross-thread cancel interrupts
  -- nobody, not the thread that drives the scheduler; the scheduler looks
  -- at what they brought before it runs a task (an interrupt asked for
  -- just as this task stopped: before the next one).
  asked_meanwhile = cell_set(cell, NO_THREAD) or asked_meanwhile
  current = previous
  if cw_status(t._co) == "dead" then
    if res[1] then
      res[1] = true
      return body_end(t, true, pack(select(2, unpack(res, 1, res.n))))
    end
    return body_end(t, false, res)
  elseif res[2] == WAIT then
    t._status = "waiting"
    t._plain_yield = false
  else
    -- task.yield(), or a plain coroutine.yield in a task: run again later.
    t._status = "ready"
    t._plain_yield = res[2] ~= YIELD
    enqueue(t)
  end
end

-- What a spawn accepts: a function, or { fn, limit =, name =, grace = }.
local function spawn_options(position, name, spec)
  if type(spec) == "function" then return spec, nil, nil, DEFAULT_GRACE end
  if type(spec) ~= "table" or type(spec[1]) ~= "function" then
    argerror(position, name, "function or { fn, limit =, name =, grace = }", spec)
  end
  if spec.limit ~= nil then check_seconds(position, name, spec.limit) end
  if spec.grace ~= nil then check_seconds(position, name, spec.grace, true) end
  if spec.name ~= nil and type(spec.name) ~= "string" then
    error(("bad argument #%d to '%s' (name must be a string, got %s)")
      :format(position, name, type(spec.name)), 3)
  end
  return spec[1], spec.limit, spec.name, spec.grace or DEFAULT_GRACE
end

local function new_task(fn, limit, name, grace, parent, ...)
  local co = cw_create(coroutine_body(fn))
  local id = mtint_id(co)
  if limit then cw_watch(co, limit) end
  mtint_sethook(co, on_interrupt)
  local t = setmetatable({
    name = name, _co = co, _id = id, _stack = { id }, _status = "ready",
    _args = pack(...), _parent = parent, _children = {}, _live = 0,
    _scopes = {}, _shield = 0, _critical = 0, _gen = 0, _grace = grace,
  }, Task)
  by_thread[co] = t
  by_id[id] = t
  native.mailbox_register(mailbox, id)
  if parent then
    parent._children[t] = true
    parent._live = parent._live + 1
    local scopes = parent._scopes
    t._scope = scopes[#scopes]
    if parent._cancel_err then cancel(t, "parent cancelled") end
  end
  enqueue(t)
  return t
end

--- Schedules `fn(...)` as a new task, a child of the running task. It does
-- not run until the scheduler gets to it.
-- @tparam function|table spec `fn`, or `{ fn, limit = s, name = "...", grace = s }`:
-- `limit` kills it (corowatch's kill) when it runs longer than `limit`
-- seconds without yielding; `grace` is how long a cancelled task may run
-- on before the cancel is raised at every instruction (default 0.1)
-- @param ... arguments for `fn`
-- @treturn task
function M.spawn(spec, ...)
  local fn, limit, name, grace = spawn_options(1, "spawn", spec)
  local t = enter_critical()
  local new = new_task(fn, limit, name, grace, current, ...)
  leave_critical(t)
  return new
end
local spawn = M.spawn

local function checktask(position, name, t)
  if getmetatable(t) ~= Task then argerror(position, name, "task", t) end
  return t
end

--- The task's status: "ready", "running", "waiting", "done", "failed" or
-- "cancelled".
function Task:status()
  checktask(1, "status", self)
  return self._status
end

--- @treturn integer the mtint id of the task's coroutine
function Task:id()
  checktask(1, "id", self)
  return self._id
end

function Task:__tostring()
  return "corowatch.task: " .. task_label(self)
end

--- Requests a cancel. The task is not run inline: a waiting task wakes at
-- the scheduler's next step, a running one gets the cancel at its next Lua
-- instruction. Its descendants are cancelled too.
-- @param[opt] reason given to the cancellation error (`err.reason`)
-- @treturn boolean true if a cancel was requested, false if it had ended
function Task:cancel(reason)
  checktask(1, "cancel", self)
  local t = enter_critical()
  local requested = cancel(self, reason)
  leave_critical(t)
  return requested
end

local function outcome(t)
  if t._status == "done" then return true, t._results end
  return false, t._err
end

local function results_of(t)
  local ok, value = outcome(t)
  if not ok then error(value, 0) end
  return unpack(value, 1, value.n)
end

--- The results of an ended task, without waiting.
-- @raise its error if it failed or was cancelled, or an error if it has not ended
function Task:result()
  checktask(1, "result", self)
  if not ended_status[self._status] then
    error("corowatch.task.result: " .. task_label(self) .. " has not ended", 2)
  end
  self._observed = true
  return results_of(self)
end

local step

-- Outside any task: drives the scheduler until `done()` is true.
local drive_until

-- Inside task `me`: waits until `object` (a task or a future) has ended.
local function wait_for(me, object, what)
  while not object:_ended() do
    local gen = begin_wait(me, what)
    object:_on_end(me, gen)
    suspend(me)
  end
  check(me)
end

function Task:_ended()
  return ended_status[self._status] ~= nil
end

-- Who waits for this task (or future) to end: each waiting task once, in
-- the order they began, with the number of its wait (`gens`) and its
-- place in the list (`at`). A task that gives its wait up is taken off
-- (its place left `false`, the list compacted once half of it is holes):
-- a long-lived task or future keeps no waiter that stopped waiting.
function Task:_on_end(me, gen)
  -- A wait that raised before it suspended (a yield across a C call)
  -- left its task on a list.
  stop_awaiting(me)
  local waiters = self._waiters
  if not waiters then
    waiters = { n = 0, holes = 0, gens = {}, at = {} }
    self._waiters = waiters
  end
  local i = waiters.at[me]
  if not i then
    i = waiters.n + 1
    waiters.n = i
    waiters[i] = me
    waiters.at[me] = i
  end
  waiters.gens[i] = gen
  me._awaiting = self
end

local function compact(waiters)
  local n, gens, at = 0, waiters.gens, waiters.at
  for i = 1, waiters.n do
    local waiter = waiters[i]
    if waiter then
      n = n + 1
      waiters[n] = waiter
      gens[n] = gens[i]
      at[waiter] = n
    end
  end
  for i = n + 1, waiters.n do
    waiters[i] = nil
    gens[i] = nil
  end
  waiters.n = n
  waiters.holes = 0
end

-- `me` stopped waiting for this task or future before it ended.
function Task:_forget(me)
  local waiters = self._waiters
  local i = waiters and waiters.at[me]
  if not i then return end
  waiters.at[me] = nil
  waiters[i] = false
  waiters.holes = waiters.holes + 1
  if waiters.holes * 2 > waiters.n then compact(waiters) end
end

-- The task or future `object` ended: wakes who waits for it.
function wake_waiters(object)
  local waiters = object._waiters
  if not waiters then return end
  object._waiters = nil
  local gens = waiters.gens
  for i = 1, waiters.n do
    local waiter = waiters[i]
    if waiter then
      if waiter._awaiting == object then waiter._awaiting = nil end
      wake(waiter, gens[i])
    end
  end
end

local function await(self, name)
  checktask(1, name, self)
  self._observed = true
  local me = running_task()
  if me == self then error("corowatch.task." .. name .. ": a task cannot await itself", 3) end
  if me then
    wait_for(me, self, self)
  else
    drive_until(function() return self:_ended() end, self)
  end
end

--- Waits for the task to end (without blocking other tasks inside a task;
-- outside any task, by driving the scheduler).
-- @return the task's results
-- @raise its error: the original value, or its cancellation error
function Task:await()
  await(self, "await")
  return results_of(self)
end

local function pack_outcome(t)
  local ok, value = outcome(t)
  if not ok then return false, value end
  return true, unpack(value, 1, value.n)
end

--- Like `await`, but returns `true, ...` or `false, err`.
function Task:pawait()
  await(self, "pawait")
  return pack_outcome(self)
end

--- The running task, or nil.
function M.current()
  return running_task()
end

--- Waits `s` seconds, letting other tasks run.
-- @tparam number s seconds, at least 0
function M.sleep(s)
  check_seconds(1, "sleep", s, true)
  local t = the_task("sleep")
  local gen = begin_wait(t, s)
  -- Interrupted from here on, the task never yields: the timer is stale.
  t._timer = timer_push({ at = gettime() + s, task = t, gen = gen })
  return suspend(t)
end

--- Lets the other ready tasks run, then goes on.
function M.yield()
  local t = the_task("yield")
  check(t)
  return after_wait(t, cw_yield(YIELD))
end

-- ----------------------------------------------------------------------
-- Futures

local Future = {}
Future.__index = Future

--- A future: completed once, with values or an error, and awaited.
-- @treturn future with `complete(...)`, `fail(err)`, `await()`, `pawait()`, `done()`
function M.future()
  return setmetatable({ _done = false }, Future)
end

local function checkfuture(position, name, f)
  if getmetatable(f) ~= Future then argerror(position, name, "future", f) end
  return f
end

local function finish_future(f, name, ok, values)
  if f._done then
    error("corowatch.task.future: " .. name .. " on a future that is already done", 3)
  end
  local t = enter_critical()
  f._done, f._ok, f._values = true, ok, values
  wake_waiters(f)
  leave_critical(t)
end

--- Completes the future with values.
-- @raise if it is already done
function Future:complete(...)
  checkfuture(1, "complete", self)
  finish_future(self, "complete", true, pack(...))
end

--- Completes the future with an error.
-- @raise if it is already done
function Future:fail(err)
  checkfuture(1, "fail", self)
  finish_future(self, "fail", false, err)
end

--- @treturn boolean whether it is complete (or failed)
function Future:done()
  checkfuture(1, "done", self)
  return self._done
end

function Future:_ended() return self._done end
Future._on_end = Task._on_end
Future._forget = Task._forget

local function future_wait(self, name)
  checkfuture(1, name, self)
  local me = running_task()
  if me then
    wait_for(me, self, "a future")
  else
    drive_until(function() return self._done end, nil, "a future")
  end
end

--- Waits for the future; returns its values or raises its error.
function Future:await()
  future_wait(self, "await")
  if not self._ok then error(self._values, 0) end
  return unpack(self._values, 1, self._values.n)
end

--- Like `await`, but returns `true, ...` or `false, err`.
function Future:pawait()
  future_wait(self, "pawait")
  if not self._ok then return false, self._values end
  return true, unpack(self._values, 1, self._values.n)
end

-- ----------------------------------------------------------------------
-- pcall that may yield

-- After a protected call in task `t`: past the grace period, a cancel
-- caught there is raised again at once.
local function after_pcall(t, ok, ...)
  if t then
    -- Past the grace period nothing may be caught, nor may the task go on.
    local err = hard_error(t)
    if err then error(err, 0) end
  end
  return ok, ...
end

-- PUC Lua 5.1: moves task `t` onto the thread `id` (already on top of its
-- stack). The cell follows; an interrupt armed on the thread it leaves
-- (a deadline's sticky lead, a hard error's sticky interrupt) does not,
-- so the new thread is interrupted for what was due there, or about to
-- be, and for what reached the old one as it stopped.
local function move_onto(t, id)
  if cell_set(cell, id) then poll() end
  local warm = t._warm
  t._warm = nil
  t._sticky = false
  if hard_error(t) then
    t._sticky = true
    mtint_interrupt(id, true)
  elseif warm or due_on_resume(t, true) then
    mtint_interrupt(id)
  end
end

-- PUC Lua 5.1: runs `f(...)` on a coroutine of its own, passing its
-- waits through to the scheduler; returns as pcall does.
local function pcall_on_coroutine(t, f, ...)
  local co = cw_create(coroutine_body(f))
  local id = mtint_id(co)
  mtint_sethook(co, on_interrupt)
  by_thread[co] = t
  local stack = t._stack
  local caller = stack[#stack]
  stack[#stack + 1] = id
  move_onto(t, id)
  local res = pack(cw_resume(co, ...))
  while cw_status(co) ~= "dead" do
    -- While `co` waits the task is the caller's again: a yield that fails
    -- here (a C call between the task and this pcall) raises on the
    -- caller's thread, and leaves nothing pointing at `co`. Nothing is
    -- taken here: a timer taken before the task is marked waiting would
    -- not wake it (the scheduler looks once it is).
    stack[#stack] = nil
    t._warm = nil
    t._sticky = false
    if cell_set(cell, caller) then asked_meanwhile = true end
    local back = pack(cw_yield(unpack(res, 2, res.n)))
    stack[#stack + 1] = id
    move_onto(t, id)
    res = pack(cw_resume(co, unpack(back, 1, back.n)))
  end
  stack[#stack] = nil
  by_thread[co] = nil
  -- An interrupt that reached `co` after its end is lost there: it is
  -- raised here once the caller's bookkeeping is done (a deadline's early
  -- interrupt spent on `co` comes again).
  poll()
  move_onto(t, caller)
  return unpack(res, 1, res.n)
end

--- `pcall` that may yield inside (on every version; Coop's `copcall`).
-- A cancellation error can be caught once; past the task's grace period it
-- is raised again.
function M.pcall(f, ...)
  local t = running_task()
  if PCALL_YIELDS or not t then return after_pcall(t, pcall(f, ...)) end
  return after_pcall(t, pcall_on_coroutine(t, f, ...))
end
local ypcall = M.pcall

--- `xpcall` that may yield inside. On PUC Lua 5.1 inside a task, the
-- handler runs after `f`'s coroutine has ended (`debug.traceback` there
-- does not show `f`'s frames).
function M.xpcall(f, handler, ...)
  if type(handler) ~= "function" then argerror(2, "xpcall", "function", handler) end
  local t = running_task()
  if PCALL_YIELDS or not t then
    if select("#", ...) == 0 then return after_pcall(t, xpcall(f, handler)) end
    local args = pack(...)
    return after_pcall(t, xpcall(function() return f(unpack(args, 1, args.n)) end, handler))
  end
  local res = pack(pcall_on_coroutine(t, f, ...))
  if res[1] then return unpack(res, 1, res.n) end
  -- A handler that fails is answered as xpcall answers it.
  local handled, value = pcall(handler, res[2])
  if not handled then value = "error in error handling" end
  return after_pcall(t, false, value)
end

-- ----------------------------------------------------------------------
-- Scopes: shield, timeout

--- Runs `fn(...)` with cancellation deferred until it returns (its task's
-- `limit` kill still applies).
-- @return `fn`'s results
function M.shield(fn, ...)
  if type(fn) ~= "function" then argerror(1, "shield", "function", fn) end
  local t = the_task("shield")
  t._shield = t._shield + 1
  local res = pack(ypcall(fn, ...))
  t._shield = t._shield - 1
  -- What the shield deferred, at its level: a cancel once no shield is
  -- left, a timeout scope opened inside an outer shield at once.
  check(t)
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end

local function close_scope(scope, ...)
  scope.closed = true
  return ...
end

--- Runs `fn(...)` in the running task; raises a `timeout` error after `s`
-- seconds, even if `fn` never yields (at its next instruction). Nested
-- timeouts each catch only their own error.
-- @tparam number s seconds
-- @tparam function fn
-- @return `fn`'s results
-- @raise a cancellation error of kind `task.error.timeout`
function M.timeout(s, fn, ...)
  -- The clock starts at the call: the setup below (its first run is all
  -- cache misses) would otherwise add to every timeout.
  local started = gettime()
  check_seconds(1, "timeout", s)
  if type(fn) ~= "function" then argerror(2, "timeout", "function", fn) end
  local t = the_task("timeout")
  t._scoped = true
  enter_critical()
  local scopes = t._scopes
  local scope = { task = t, at = started + s, closed = false, fired = false,
    outer = scopes[#scopes], shield = t._shield }
  scope.err = new_error(M.error.timeout, t, nil, s)
  -- With a lead: it fires a little early, sticky, and the handler raises
  -- at the deadline itself (see `on_interrupt`).
  scope.deadline = native.deadline(cell, math.max(0, scope.at - gettime()), false, t._grace, true)
  scopes[#scopes + 1] = scope
  local timer = timer_push({ at = scope.at, scope = scope })
  -- The critical section ends inside the protected call, so a deadline
  -- that fired meanwhile lands inside the scope and is caught by it. The
  -- message handler closes the scope before the error leaves it, so an
  -- interrupt after that finds nothing due here.
  local critical = true
  local res = pack(M.xpcall(function(...)
    critical = false
    leave_critical(t)
    return close_scope(scope, fn(...))
  end, function(err) scope.closed = true; return err end, ...))
  -- An outer scope's deadline waits until this one is off the task's list
  -- (still critical if the protected call failed before calling `fn`).
  if not critical then enter_critical() end
  scope.closed = true
  deadline_cancel(scope.deadline)
  if scope._grace_deadline then deadline_cancel(scope._grace_deadline) end
  timer.scope = nil
  if timer.at > gettime() then timer_stale() end
  for i = #scopes, 1, -1 do
    if scopes[i] == scope then table_remove(scopes, i) break end
  end
  leave_critical(t)
  if not res[1] then error(res[2], 0) end
  if scope.fired then error(scope.err, 0) end
  return unpack(res, 2, res.n)
end

-- ----------------------------------------------------------------------
-- Groups

local Group = {}
Group.__index = Group

--- Spawns a child in the group (same arguments as `task.spawn`).
-- @treturn task
function Group:spawn(spec, ...)
  if getmetatable(self) ~= Group then argerror(1, "spawn", "group", self) end
  spawn_options(2, "spawn", spec)
  if self._closed then error("corowatch.task.group: the group has ended", 2) end
  local t = enter_critical()
  local fn, limit, name, grace = spawn_options(2, "spawn", spec)
  local child = new_task(fn, limit, name, grace, current, ...)
  child._group = self
  if self._err then cancel(child, "group failed") end
  self._children[#self._children + 1] = child
  leave_critical(t)
  return child
end

-- A child that ends cancelled has no results either (cancelled from
-- outside the group, by a sibling, or by the group's function): its
-- cancellation error is the group's, as a failure's is. Those the group
-- cancels after a failure come when `_err` is set already.
function Group:_child_ended(child)
  local status = child._status
  if (status == "failed" or status == "cancelled") and not self._err then
    self._err = child._err
    self._failed = child
    for i = 1, #self._children do
      cancel(self._children[i], "sibling failed")
    end
  end
end

--- Runs `fn(g)`, where `g:spawn(...)` adds children; waits for all of them.
-- The first child error cancels the others and is raised again (with the
-- child's traceback in `task.on_error`-style text if it is a string).
-- @treturn table the children's results in spawn order, each packed (`n`)
function M.group(fn)
  if type(fn) ~= "function" then argerror(1, "group", "function", fn) end
  local me = the_task("group")
  local g = setmetatable({ _children = {} }, Group)
  local res = pack(ypcall(fn, g))
  if not res[1] and not g._err then
    g._err = res[2]
    for i = 1, #g._children do cancel(g._children[i], "group failed") end
  end
  local children = g._children
  for i = 1, #children do
    local child = children[i]
    if not child:_ended() then
      local ok, err = ypcall(wait_for, me, child, "its group")
      if not ok then
        -- This task was cancelled: its children are cancelled too; wait
        -- for them, shielded, and raise.
        M.shield(function()
          for j = i, #children do wait_for(me, children[j], "its group") end
        end)
        error(err, 0)
      end
    end
  end
  g._closed = true
  if g._err then
    local err = g._err
    if g._failed and type(err) == "string" and g._failed._traceback then
      err = g._failed._traceback
    end
    error(err, 0)
  end
  local results = {}
  for i = 1, #children do results[i] = children[i]._results end
  return results
end

-- ----------------------------------------------------------------------
-- Driving the scheduler

-- What a task waits on, for the deadlock error: set by begin_wait to a
-- task, a number of seconds or a description (formatted only here).
local function describe_wait(what)
  if getmetatable(what) == Task then return "awaiting " .. task_label(what) end
  if type(what) == "number" then return ("sleeping %g s"):format(what) end
  if what == "a future" then return "awaiting a future" end
  return what or "?"
end

local function waiting_tasks()
  local names = {}
  for _, t in next, by_id do
    if t._status == "waiting" then
      names[#names + 1] = ("%s (%s)"):format(task_label(t), describe_wait(t._waiting_on))
    end
  end
  for _, t in next, by_id do
    if t._status ~= "waiting" and t._body_done then
      names[#names + 1] = task_label(t) .. " (its children to end)"
    end
  end
  return table_concat(names, ", ")
end

local function next_timer_delay()
  while heap_n > 0 do
    local entry = heap[1]
    if is_live(entry) then return math_max(0, entry.at - gettime()) end
    timer_pop() -- stale: its task woke otherwise, or its scope closed
  end
  return nil
end

local function run_batch(batch)
  for i = 1, #batch do
    local t = batch[i]
    batch[i] = false
    if t._status == "ready" then run_task(t) end
  end
end

--- Runs every ready task once, after taking what arrived (cross-thread
-- cancels, due timers). For hosts with their own main loop.
-- @tparam[opt] number max_wait if nothing is ready, wait up to this long
-- (seconds) for a timer or a cross-thread cancel first; default 0
-- @treturn ?number seconds until the next timer (0 if tasks are ready),
-- or nil when nothing is scheduled
function step(max_wait)
  if max_wait ~= nil then check_seconds(1, "step", max_wait, true) end
  if running_task() then error("corowatch.task.step: called inside a task", 2) end
  if driving then error("corowatch.task.step: the scheduler is already running", 2) end
  driving = true
  poll()
  if #ready == 0 and max_wait and max_wait > 0 then
    local delay = next_timer_delay()
    local wait = delay and math_min(delay, max_wait) or max_wait
    if backend then
      backend(wait, mailbox_fd)
    elseif wait > 0 then
      native.mailbox_sleep(mailbox, wait)
    end
    poll()
  end
  local batch = ready
  ready = {}
  local ok, err = pcall(run_batch, batch)
  if not ok then
    -- A bug of ours, or an error from on_error: keep the others.
    for i = 1, #batch do if batch[i] then enqueue(batch[i]) end end
    driving = false
    error(err, 0)
  end
  driving = false
  if #ready > 0 then return 0 end
  return next_timer_delay()
end
M.step = step

-- Waits idle until a timer is due or a cross-thread cancel arrives; raises
-- if nothing can ever wake `what`.
local function idle(what)
  if #ready > 0 then return end
  local delay = next_timer_delay()
  if backend then
    -- Returns at once, false, if its loop has nothing that could wake us.
    if backend(delay, mailbox_fd) or delay then return end
    poll()
    if #ready > 0 then return end
  end
  if not delay then
    error(("corowatch.task: %s waits on something that can never happen; waiting: %s")
      :format(what, waiting_tasks()), 0)
  end
  if delay > 0 then native.mailbox_sleep(mailbox, delay) end
end

function drive_until(done, t, label)
  if driving then error("corowatch.task: cannot wait here, the scheduler is running", 3) end
  while not done() do
    step()
    if done() then break end
    idle(t and task_label(t) or label)
  end
end

local function cancel_all()
  for _, t in next, by_id do
    if not t._parent then cancel(t, "the root task ended") end
  end
end

--- Runs `fn(...)` as the root task and drives the scheduler until it ends;
-- tasks still running then are cancelled, and `run` returns once they
-- have ended.
-- @return the root task's results
-- @raise its error
function M.run(fn, ...)
  if type(fn) ~= "function" and type(fn) ~= "table" then
    argerror(1, "run", "function or { fn, ... }", fn)
  end
  if running_task() then error("corowatch.task.run: called inside a task", 2) end
  local root = spawn(fn, ...)
  root._observed = true
  drive_until(function() return root:_ended() end, root)
  cancel_all()
  drive_until(function() return next(by_id) == nil end, nil, "the tasks left")
  -- One more turn of the host loop: it finishes what the tasks started
  -- closing (luv crashes at exit on a handle whose close never ran).
  if backend then backend(0, mailbox_fd) end
  return results_of(root)
end

--- Cancels a task by its id, from any OS thread (or Lua state) of the
-- process. If the task runs, the cancel lands at its next instruction; if
-- its scheduler sleeps idle, it wakes.
-- @tparam integer id `t:id()`
-- @param[opt] reason
-- @treturn boolean true if the task was alive
function M.cancel_id(id, reason)
  if type(id) ~= "number" then argerror(1, "cancel_id", "integer id", id) end
  if id < 0 or id >= 2^53 or id ~= math_floor(id) then return false end
  if reason ~= nil and type(reason) ~= "string" and type(reason) ~= "number" then
    argerror(2, "cancel_id", "string or nil", reason)
  end
  return native.cancel_id(id, reason)
end

-- ----------------------------------------------------------------------
-- Callbacks and event loops

--- Hands the scheduler's idle waits to a host event loop: `backend(timeout,
-- fd)` waits until something happens or `timeout` seconds pass (nil: no
-- timeout), wakes early when `fd` (a descriptor, or nil) becomes readable
-- (a cancel from another OS thread), and returns whether it still has work
-- that could wake a task. `require("corowatch.task.luv")(require("luv"))`
-- makes one for luv. nil goes back to the native sleep.
-- @tparam ?function new_backend
function M.use(new_backend)
  if new_backend ~= nil and type(new_backend) ~= "function" then
    argerror(1, "use", "function or nil", new_backend)
  end
  backend = new_backend
end

--- Turns a callback-last function (`uv.fs_open(path, flags, mode, cb)`)
-- into one that a task calls and waits on (Coop's `cb_to_tf`).
-- @tparam function fn
-- @tparam[opt] table opts `on_cancel(handle)` called when the waiting task
-- is cancelled (with what `fn` returned); `cleanup(...)` receives results
-- that arrive after the cancel (close the fd)
-- @treturn function
function M.wrap_callback(fn, opts)
  if type(fn) ~= "function" then argerror(1, "wrap_callback", "function", fn) end
  if opts ~= nil and type(opts) ~= "table" then argerror(2, "wrap_callback", "table or nil", opts) end
  opts = opts or {}
  local on_cancel, cleanup = opts.on_cancel, opts.cleanup
  return function(...)
    local me = the_task("wrap_callback")
    local result, abandoned
    local gen = begin_wait(me, "a callback")
    local args = pack(...)
    args.n = args.n + 1
    args[args.n] = function(...)
      if result then return end
      result = pack(...)
      if abandoned then
        if cleanup then cleanup(...) end
      else
        wake(me, gen)
      end
    end
    local handle = fn(unpack(args, 1, args.n))
    if result then
      -- Called back at once, inside `fn` (a cache hit, an immediate
      -- error): nothing to wait for.
      me._waiting_on = nil
      return unpack(result, 1, result.n)
    end
    local ok, err = ypcall(suspend, me)
    if not result then
      abandoned = true
      if on_cancel then on_cancel(handle) end
    elseif not ok and cleanup then
      -- It arrived after the cancel, before the task ran again: not lost.
      cleanup(unpack(result, 1, result.n))
    end
    if not ok then error(err, 0) end
    return unpack(result, 1, result.n)
  end
end

return M
