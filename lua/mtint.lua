--- Interrupt Lua main states and coroutines from other OS threads, by id.
--
-- Compatible with the original mtint (https://luarocks.org/modules/osch/mtint)
-- and beyond it: coroutines are interruptible on every Lua version, ids
-- become unknown once their state is gone, and no interrupt is lost.
-- @module mtint

local core = require("corowatch.core")

local native = core.mtint
local interrupt_known = native.interrupt_known
local error, type, tostring, setmetatable = error, type, tostring, setmetatable
local math_floor = math.floor
local tonumber = tonumber

local M = {
  _VERSION = "mtint " .. core._VERSION,
  _INFO = "interrupt Lua states and coroutines from other threads (corowatch native core)",
}

--- The module's version: `"mtint "` followed by the native core's version
-- (the rock's version).
-- @field _VERSION

--- A line saying what the module is.
-- @field _INFO

--- Error names. Each holds its own full name; raised errors are strings
-- that begin with it, e.g. `mtint.error.unknown_object: interruptible id 8`.
-- `interrupt` is an alias of `interrupted`.
-- @table error
-- @field interrupted raised in a thread that is interrupted and has no handler
-- @field interrupt alias of `interrupted` (the original's reference names it so)
-- @field not_supported raised only if the id space is exhausted or, on Lua
-- 5.1, if the allocator watch could not be set up
-- @field unknown_object raised for an id that was never given out, or whose
-- thread is gone and no interruptible holds it
M.error = {
  interrupted = core.errors.interrupted,
  interrupt = core.errors.interrupted,
  not_supported = core.errors.not_supported,
  unknown_object = core.errors.unknown_object,
}

-- Raises Lua's usual argument error at the position of the code that
-- called the public function: `depth` counts the helper functions between
-- it and argerror (0 when it calls argerror itself).
local function argerror(position, name, expected, got, depth)
  error(("bad argument #%d to '%s' (%s expected, got %s)")
    :format(position, name, expected, type(got)), 3 + (depth or 0))
end

-- An id for an error message: never a whole huge string.
local function shown(value)
  local text = tostring(value)
  if #text > 40 then text = text:sub(1, 32) .. "... (" .. #text .. " characters)" end
  return text
end

-- An id is an integer; numeric strings are accepted as in Lua's C API.
-- Integers that no id can have (negative, or past 2^53) are unknown ids.
local function checkid(position, name, value)
  local n = tonumber(value)
  if type(value) ~= "number" and type(value) ~= "string" or not n
      or n ~= math_floor(n) then
    argerror(position, name, "integer id", value, 1)
  end
  if n < 0 or n >= 2^53 then
    error(("%s: interruptible id %s"):format(M.error.unknown_object, shown(value)), 0)
  end
  return n
end

local requests = { [true] = "sticky", [false] = "clear" }
local function checkflag(position, name, flag)
  if flag == nil then return "once" end
  local request = requests[flag]
  if not request then argerror(position, name, "boolean or nil", flag, 1) end
  return request
end

--- The id of a thread.
-- @tparam[opt] thread co a coroutine; the running coroutine or main state if nil
-- @treturn integer an id, unique in the process, never reused, stable for
-- the thread's life (a coroutine a finalizer brings back after it was
-- collected gets a new one); at least 2\^40 and below 10\^14
-- @raise `bad argument #1 to 'id'` if `co` is not a coroutine or nil
function M.id(co)
  if co ~= nil and type(co) ~= "thread" then
    argerror(1, "id", "coroutine or nil", co)
  end
  local id, err = native.id(co)
  if not id then error(err, 0) end
  return id
end

--- Sets the interrupt handler of a thread: it is called on the interrupted
-- thread instead of raising `mtint.error.interrupted`; nil restores the error.
-- Called as `sethook(func)` or `sethook(co, func)`.
-- @tparam[opt] thread co the coroutine; the running one if omitted
-- @tparam ?function func the handler, or nil
-- @raise `bad argument` if `co` is not a coroutine or `func` not a function or nil
function M.sethook(...)
  local co, func = ...
  if select("#", ...) < 2 and type(co) ~= "thread" then
    co, func = nil, co
  end
  if co ~= nil and type(co) ~= "thread" then
    argerror(1, "sethook", "coroutine", co)
  end
  if func ~= nil and type(func) ~= "function" then
    argerror(select("#", ...) < 2 and 1 or 2, "sethook", "function or nil", func)
  end
  native.sethook(co, func)
end

-- interruptible object -> native handle: one table per Lua state, however
-- often this module is loaded.
local shared = core.shared("mtint")
local handles = shared.handles or setmetatable({}, { __mode = "k" })
shared.handles = handles
local Interruptible = {}
Interruptible.__index = Interruptible

local function checkinterruptible(position, name, object)
  local handle = handles[object]
  if not handle then argerror(position, name, "mtint interruptible", object, 1) end
  return handle
end

--- Interrupts a thread, by id or through an interruptible object.
-- @tparam integer|Interruptible target an id (an integer, or a numeric
-- string as Lua's C API accepts), or an object made by `interruptible`
-- @tparam[opt] boolean flag nil: interrupt once; true: at every operation
-- until cleared; false: clear
-- @treturn boolean true if the target is alive and was signalled; false if
-- an interruptible object's target is gone
-- @raise `mtint.error.unknown_object` for an id that is not known;
-- `bad argument` for a target that is not an id or interruptible, or a flag
-- that is not a boolean or nil
function M.interrupt(target, flag)
  -- A known id with a valid flag is answered by one native call; anything
  -- else (an interruptible, a numeric string, an unknown id, a bad
  -- argument) takes the long way below, which says what is wrong.
  local alive = interrupt_known(target, flag)
  if alive ~= nil then return alive end
  local request = checkflag(2, "interrupt", flag)
  if handles[target] then
    return native.interrupt_handle(handles[target], request)
  end
  if type(target) == "table" or type(target) == "userdata" then
    argerror(1, "interrupt", "integer id or interruptible", target)
  end
  local ok, err = native.interrupt(checkid(1, "interrupt", target), request)
  if ok == nil then error(err, 0) end
  return ok
end

--- An object that keeps an id known after its target dies, until the
-- object itself is collected; its `interrupt` then returns false.
-- @tparam integer id an id given out by `id` (or a numeric string)
-- @treturn Interruptible an object with `:id()`, `:interrupt([flag])` and
-- `__tostring`
-- @raise `mtint.error.unknown_object` for an id that is not known;
-- `bad argument` if `id` is not an integer
function M.interruptible(id)
  id = checkid(1, "interruptible", id)
  local handle, err = native.handle(id)
  if not handle then error(err, 0) end
  local object = setmetatable({ _id = id }, Interruptible)
  handles[object] = handle
  return object
end

--- An object made by `interruptible`: it keeps its id known after the
-- target dies. `tostring` gives `"mtint.interruptible: <id>"`.
-- @type Interruptible

--- The id the object was made for.
-- @treturn integer the interruptible's id
function Interruptible:id()
  checkinterruptible(1, "id", self)
  return self._id
end

--- Interrupts the object's target: the same as `mtint.interrupt(self, flag)`.
-- @tparam[opt] boolean flag nil: interrupt once; true: at every operation
-- until cleared; false: clear
-- @treturn boolean true if the target is alive and was signalled; false if
-- it is gone
-- @raise `bad argument` for a flag that is not a boolean or nil
function Interruptible:interrupt(flag)
  local handle = checkinterruptible(1, "interrupt", self)
  return native.interrupt_handle(handle, checkflag(1, "interrupt", flag))
end

function Interruptible:__tostring()
  return "mtint.interruptible: " .. tostring(self._id)
end

return M
