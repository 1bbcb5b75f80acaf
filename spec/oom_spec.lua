-- Out of memory at every allocation of a scenario, in a host whose
-- allocator fails on demand (spec/oom/host.c, built here with gcc for the
-- Lua version under test). run-valgrind runs the same under memcheck.
local version = jit and "luajit" or _VERSION:sub(5)
local flags = {
  ["5.1"] = "-I/usr/include/lua5.1 -llua5.1",
  ["5.2"] = "-I/usr/include/lua5.2 -llua5.2",
  ["5.3"] = "-I/usr/include/lua5.3 -llua5.3",
  ["5.4"] = "-I/usr/include/lua5.4 -llua5.4",
  luajit = "-I/usr/include/luajit-2.1 -lluajit-5.1",
}

local function shell(command)
  local pipe = assert(io.popen(command .. " 2>&1; echo \"exit=$?\""))
  local output = pipe:read("*a")
  pipe:close()
  local status = tonumber(output:match("exit=(%d+)%s*$"))
  return (output:gsub("exit=%d+%s*$", "")), status
end

describe("running out of memory", function()
  it("at any allocation leaves the library working, nothing half done", function()
    local host = os.tmpname()
    local output, status = shell(("gcc -O1 -o %s spec/oom/host.c %s"):format(host, assert(flags[version])))
    assert.are.equal(0, status, output)
    output, status = shell("timeout 120 " .. host .. " spec/oom/scenario.lua")
    os.remove(host)
    assert.are.equal(0, status, output)
    assert.matches("^rounds that ran out of memory: %d+\n$", output)
  end)
end)
