-- Resident memory per live watched coroutine: 200 000 coroutines kept
-- alive, each in its own process (plain, watched by ours, watched by the
-- original corowatch 1.1 if bench/originals/corowatch.lua is there), the
-- RSS difference divided by their number. Usage: see bench/run; the
-- children are this interpreter (`arg[-1]`) running this file with a mode.
if jit then jit.off() end
local N = 200000
local ORIGINAL = "bench/originals/corowatch.lua"

local function rss_bytes()
  local statm = assert(io.open("/proc/self/statm"))
  local pages = tonumber(statm:read("*a"):match("^%d+%s+(%d+)"))
  statm:close()
  return pages * 4096
end

local mode = arg[1]
if mode then
  local create, watch = coroutine.create, nil
  if mode == "ours" then
    local corowatch = require("corowatch")
    create, watch = corowatch.create, corowatch.watch
  elseif mode == "original" then
    local original = dofile(ORIGINAL)
    create, watch = original.create, original.watch
  end
  local body = function() coroutine.yield() end
  local keep = {}
  for i = 1, N do
    local co = create(body)
    if watch then watch(co, 60) end
    keep[i] = co
  end
  collectgarbage()
  collectgarbage()
  print(rss_bytes(), #keep)
  return
end

local interpreter = arg[-1]
local function measure(which)
  local pipe = assert(io.popen(("%s bench/rss_bench.lua %s"):format(interpreter, which)))
  local bytes = tonumber(pipe:read("*a"):match("^%d+"))
  pipe:close()
  return bytes
end

local modes = { "plain", "ours" }
local has_original = io.open(ORIGINAL)
if has_original then
  has_original:close()
  modes[#modes + 1] = "original"
end
-- Three processes each, alternately; the median of each.
local samples = {}
for _, which in ipairs(modes) do samples[which] = {} end
for _ = 1, 3 do
  for _, which in ipairs(modes) do table.insert(samples[which], measure(which)) end
end
local function median(list)
  table.sort(list)
  return list[2]
end
local plain = median(samples.plain)
local line = ("%-12s RSS per live watched coroutine (%d, separate processes): ours %d B")
  :format(jit and jit.version or _VERSION, N, math.floor((median(samples.ours) - plain) / N + 0.5))
if samples.original then
  line = line .. (", original %d B"):format(math.floor((median(samples.original) - plain) / N + 0.5))
end
print(line)
