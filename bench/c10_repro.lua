-- Issue 7, item 6: 2000 timeouts of 10 µs, each firing while the task
-- enters and leaves the hook, with a corowatch kill (limit 4 s) as a
-- backstop. Run it beside two CPU hogs (`yes > /dev/null`): before the
-- watchdog armed LuaJIT's hook by signal, about 1 run in 6 hung here for
-- good (no hook ran any more). Prints "stuck at N" while a timeout is late.
if jit then jit.off() end
local task = require("corowatch.task")
local function sum() local x = 0 for j = 1, 50 do x = x + j end return x end
local result = task.run(function()
  local t = task.spawn({ function()
    for i = 1, 2000 do
      local n = 0
      local ok = task.pcall(task.timeout, 1e-5, function()
        while true do
          n = n + 1
          if n % 100000 == 0 then io.stderr:write("stuck at ", i, "\n") end
          task.timeout(60, sum)
        end
      end)
      assert(not ok)
    end
    return "finished"
  end, limit = 4 })
  return t:pawait()
end)
print("result", result)
