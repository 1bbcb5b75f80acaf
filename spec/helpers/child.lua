--- Runs Lua code in a child process of the interpreter under test
-- (`CW_LUA`, set by run-tests), with the rock's paths inherited.
local child = {}

--- Runs `code` (after `prefix`, a command such as "timeout 60 ");
-- returns its output (stdout and stderr), whether it exited with 0, and
-- its exit status (128 + N for a signal N, as the shell reports it).
function child.run(code, prefix)
  local file = os.tmpname()
  local handle = assert(io.open(file, "w"))
  handle:write(code)
  handle:close()
  local lua = os.getenv("CW_LUA") or "lua"
  local pipe = assert(io.popen((prefix or "") .. lua .. " " .. file .. " 2>&1; echo \"exit=$?\""))
  local output = pipe:read("*a")
  pipe:close()
  os.remove(file)
  local status = tonumber(output:match("exit=(%d+)%s*$"))
  return (output:gsub("exit=%d+%s*$", "")), status == 0, status
end

return child
