--- The victim side of the interrupt specs and benchmark, for a body run
-- with `spec.helpers.threads`.
--
-- `victim.serve(channel, report)` sends the mtint id of the running thread,
-- then, round after round, sends "ready" and spins in a loop that calls
-- nothing until an error (the interrupt) ends it, and sends back what
-- `report(err)` returns. It stops when the other side answers anything
-- but "again".
local victim = {}

function victim.serve(channel, report)
  local mtint = require("mtint")
  channel:send(mtint.id())
  repeat
    local _, err = pcall(function()
      channel:send("ready")
      local x = 0
      while true do x = x + 1 end
    end)
    channel:send(report(err))
  until channel:receive() ~= "again"
end

return victim
