--- Seed 003 (the supervisor of "Coroutines As Event Handlers") for the
-- specs: its test driver run as a program, and its own supervisor loaded in
-- this process, both from the verbatim copies in spec/fixtures/ and bench/.
local seed003 = {}

local DRIVER = "spec/fixtures/seed003_driver.lua"
local SUPERVISOR = "bench/seed003_supervisor.lua"

-- Lines of `text` with the seed's timestamps ("2007-03-02 04:23:00 ") cut.
local function lines_of(text)
  local lines = {}
  for line in text:gmatch("[^\n]+") do
    lines[#lines + 1] = line:gsub("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d ", "")
  end
  return lines
end
seed003.lines_of = lines_of

--- Runs the seed's test driver with this interpreter (CW_LUA, as
-- run-tests sets it), on corowatch.supervisor or, if `original`, on the
-- seed's own supervisor.
-- @treturn {string,...} its output lines (stdout and stderr), timestamps cut
-- @treturn boolean whether it exited with status 0
function seed003.run_driver(original, ...)
  local lua = os.getenv("CW_LUA") or "lua"
  local args = table.concat({ ... }, " ")
  local command = ("%s%s %s %s 2>&1; echo \"exit=$?\"")
    :format(original and "SEED003_ORIGINAL=1 " or "", lua, DRIVER, args)
  local pipe = assert(io.popen(command))
  local output = pipe:read("*a")
  pipe:close()
  local status = tonumber(output:match("exit=(%d+)%s*$"))
  return lines_of((output:gsub("exit=%d+%s*$", ""))), status == 0
end

--- The seed's `supervisor` function, loaded without leaving the global the
-- seed's text defines.
function seed003.original()
  local had = rawget(_G, "supervisor")
  local supervisor = dofile(SUPERVISOR)
  rawset(_G, "supervisor", had)
  return supervisor
end

--- Runs `f` with io.stderr replaced by a temporary file (the seed's LOG
-- writes there, with a real file's `write` and its errors); returns the
-- lines written, timestamps cut, and f's results.
function seed003.capture_stderr(f, ...)
  local saved, file = io.stderr, assert(io.tmpfile())
  io.stderr = file -- luacheck: ignore 122
  local results = { pcall(f, ...) }
  io.stderr = saved -- luacheck: ignore 122
  file:seek("set")
  local text = file:read("*a")
  file:close()
  if not results[1] then error(results[2], 0) end
  return lines_of(text), (table.unpack or unpack)(results, 2)
end

return seed003
