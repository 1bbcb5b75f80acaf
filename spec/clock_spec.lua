-- The watches' clock: the processor's time-stamp counter where the kernel
-- keeps time with it, learnt against CLOCK_MONOTONIC (src/tsc.rs), else
-- CLOCK_MONOTONIC itself; either way it keeps time, and kills land.
if jit then jit.off() end
local core = require("corowatch.core")
local corowatch = require("corowatch")
local child = require("spec.helpers.child")

local function busy(seconds)
  local started = corowatch.gettime()
  while corowatch.gettime() - started < seconds do end
end

local function read(path)
  local file = io.open(path)
  if not file then return nil end
  local text = file:read("*a")
  file:close()
  return text
end

-- What src/tsc.rs asks of the machine before it trusts the counter.
local function counter_usable()
  if os.getenv("COROWATCH_CLOCK") == "monotonic" then return false end
  local source = read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
  local cpuinfo = read("/proc/cpuinfo")
  if not (source and cpuinfo) or source:match("^%s*(.-)%s*$") ~= "tsc" then return false end
  local flags = " " .. (cpuinfo:match("\nflags%s*:([^\n]*)") or cpuinfo:match("^flags%s*:([^\n]*)") or "") .. " "
  return flags:find(" constant_tsc ", 1, true) ~= nil and flags:find(" nonstop_tsc ", 1, true) ~= nil
end

-- Lua code that prints the clock's name and how far its span over 0.2 s
-- of busy time is from gettime's (CLOCK_MONOTONIC through Rust's Instant),
-- in microseconds, then kills a spinning coroutine watched for 0.05 s and
-- prints how long that took.
local PROBE = [[
  if jit then jit.off() end
  local core = require("corowatch.core")
  local corowatch = require("corowatch")
  local cw = corowatch.export()
  local gettime = corowatch.gettime
  local function busy(seconds)
    local started = gettime()
    while gettime() - started < seconds do end
  end
  core.clock(); busy(0.06); core.clock() -- past the counter's calibration
  local _, a = core.clock(); local g0 = gettime()
  busy(0.2)
  local source, b = core.clock(); local g1 = gettime()
  print(source, math.floor(math.abs((b - a) - (g1 - g0)) * 1e6 + 0.5))
  local co = corowatch.watch(cw.create(function() while true do end end), 0.05)
  local started = gettime()
  local ok, err = cw.resume(co)
  print(ok, tostring(err):match("exceeded") ~= nil, gettime() - started)
]]

local function probe(prefix)
  local output, ok = child.run(PROBE, prefix)
  assert.is_true(ok, output)
  local source, drift, killed, exceeded, took =
    output:match("^(%a+)\t(%d+)\n(%a+)\t(%a+)\t([%d%.e%-]+)\n$")
  assert.is_truthy(source, output)
  return source, tonumber(drift), killed, exceeded, tonumber(took)
end

describe("the watches' clock", function()
  it("is the time-stamp counter once learnt, where the machine allows it", function()
    core.clock()
    busy(0.06)
    core.clock()
    assert.are.equal(counter_usable() and "tsc" or "monotonic", (core.clock()))
  end)

  for _, case in ipairs({ { "as chosen", "" }, { "with COROWATCH_CLOCK=monotonic", "COROWATCH_CLOCK=monotonic " } }) do
    it("keeps time with the monotonic clock and lands kills, " .. case[1], function()
      local source, drift, killed, exceeded, took = probe(case[2])
      if case[2] ~= "" then assert.are.equal("monotonic", source) end
      -- A span of 0.2 s read on both clocks: within 0.5 ms (the reads
      -- themselves are a few microseconds apart).
      assert.is_true(drift < 500, ("%s drifts %d us over 0.2 s"):format(source, drift))
      assert.are.equal("false", killed)
      assert.are.equal("true", exceeded)
      assert.is_true(took >= 0.05 and took < 0.1, ("killed after %.4f s"):format(took))
    end)
  end
end)
