-- The seed's mtint examples 1 and 3, with cqueues threads instead of
-- llthreads2 + mtmsg: a thread loops forever and another interrupts it,
-- first with an error, then through an interrupt handler.
local thread = require("cqueues.thread")
local mtint = require("mtint")

-- Example 1: interrupt an endless loop in another thread's main state.
local worker, channel = thread.start(function(channel)
  local loadstring = loadstring or load
  local mtint = require("mtint")
  channel:write(mtint.id(), "\n")
  local x = 1
  while true do
    x = x + 1
    -- do some work; keeps LuaJIT from compiling the loop (compiled code
    -- ignores hooks)
    assert(x == loadstring("return " .. x)())
  end
end)
local id = tonumber(channel:read("*l"))
print("interrupting thread " .. id)
mtint.interrupt(id)
local _, err = worker:join()
print("the thread ended with: " .. err)
assert(err:match(mtint.error.interrupted))

-- Example 3: an interrupt handler that takes commands.
worker, channel = thread.start(function(channel)
  local loadstring = loadstring or load
  local mtint = require("mtint")
  local stop, counter = false, 0
  mtint.sethook(function()
    local cmd = channel:read("*l")
    if cmd == "CONTINUE" then channel:write("OK after ", counter, " rounds\n") end
    if cmd == "QUIT" then channel:write("QUITTING\n"); stop = true end
  end)
  channel:write(mtint.id(), "\n")
  while not stop do
    counter = counter + 1
    assert(counter == loadstring("return " .. counter)())
  end
end)
id = tonumber(channel:read("*l"))
for _, cmd in ipairs({ "CONTINUE", "CONTINUE", "QUIT" }) do
  channel:write(cmd, "\n")
  mtint.interrupt(id)
  print(cmd .. " -> " .. channel:read("*l"))
end
assert(worker:join())
print("done")
