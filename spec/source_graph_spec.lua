-- The native core's files form a one-way graph: each depends only on files
-- below it (ARCHITECTURE.md lists them in that order), so a newcomer can
-- read them bottom up. A file names another by `crate::<module>` (in code,
-- not in comments); `src/x/*.rs` is the module `x`.

local function source_files()
  local pipe = io.popen("ls src/*.rs src/*/*.rs 2>/dev/null")
  local files = {}
  for file in pipe:read("*a"):gmatch("[^\n]+") do files[#files + 1] = file end
  pipe:close()
  return files
end

local function module_of(file)
  return file:match("^src/([%w_]+)/") or file:match("^src/([%w_]+)%.rs$")
end

-- module -> set of the modules its code names.
local function dependencies(files)
  local graph = {}
  for _, file in ipairs(files) do
    local from = module_of(file)
    graph[from] = graph[from] or {}
    for line in io.lines(file) do
      if not line:match("^%s*//") then
        for to in line:gmatch("crate::([%w_]+)") do
          if to ~= from then graph[from][to] = true end
        end
      end
    end
  end
  return graph
end

-- A cycle in `graph` as a list of modules (first repeated last), or nil.
local function find_cycle(graph)
  local state, path = {}, {}
  local function visit(node)
    state[node] = "open"
    path[#path + 1] = node
    local targets = {}
    for to in pairs(graph[node] or {}) do targets[#targets + 1] = to end
    table.sort(targets)
    for _, to in ipairs(targets) do
      if state[to] == "open" then
        local cycle, start = {}, nil
        for i, name in ipairs(path) do if name == to then start = i end end
        for i = start, #path do cycle[#cycle + 1] = path[i] end
        cycle[#cycle + 1] = to
        return cycle
      elseif not state[to] then
        local cycle = visit(to)
        if cycle then return cycle end
      end
    end
    path[#path] = nil
    state[node] = "done"
  end
  local nodes = {}
  for node in pairs(graph) do nodes[#nodes + 1] = node end
  table.sort(nodes)
  for _, node in ipairs(nodes) do
    if not state[node] then
      local cycle = visit(node)
      if cycle then return cycle end
    end
  end
end

-- The `unsafe fn`s in `text` (a Rust file's lines) whose doc comment has
-- no `# Safety` section: "file:line" for each. Attributes and plain
-- comments between the doc and the function are skipped; functions
-- declared `extern` (called by Lua, not by our code) are exempt.
local function unsafe_without_safety(name, lines)
  local missing = {}
  for i, line in ipairs(lines) do
    if line:match("^%s*pub[%(%w%)]* unsafe fn ") or line:match("^%s*unsafe fn ") then
      local j, has = i - 1, false
      while j >= 1 and (lines[j]:match("^%s*//") or lines[j]:match("^%s*#%[")) do
        if lines[j]:match("^%s*/// # Safety%s*$") then has = true end
        j = j - 1
      end
      if not has then missing[#missing + 1] = name .. ":" .. i end
    end
  end
  return missing
end

-- Lua API calls that push onto the stack they are given.
local PUSHES = { "lua_push", "lua_rawget", "lua_newuserdata", "lua_newthread", "lua_getfield", "lua_createtable" }

local function pushes(line)
  if line:match("^%s*//") then return false end
  for _, call in ipairs(PUSHES) do
    if line:find("ffi::" .. call, 1, true) then return true end
  end
  return false
end

-- The functions in `lines` that push onto a Lua stack without a `Room`
-- (src/stack_room.rs) for it: "name:line" for each. A function Lua calls
-- (`extern`) makes its room on entry or asks `lua_checkstack`; in a `hot`
-- file (the C functions of resume.rs, the hook) every other function that
-- pushes is handed its room, or makes one.
local function pushes_without_room(name, lines, hot)
  local unaccounted = {}
  local i = 1
  while i <= #lines do
    if lines[i]:match("^[%w_ ()\"-]*fn [%w_]+") then
      local start, signature, body = i, "", {}
      repeat
        signature = signature .. lines[i]
        i = i + 1
      until signature:match("{%s*$") or signature:match("{.*}%s*$") or i > #lines
      while i <= #lines and not lines[i]:match("^}") and not signature:match("}%s*$") do
        body[#body + 1] = lines[i]
        i = i + 1
      end
      local text = table.concat(body, "\n")
      local pushing = false
      for _, line in ipairs(body) do pushing = pushing or pushes(line) end
      local makes_room = text:find("Room::<[^>]+>::on_entry%(%)")
      local ok
      if signature:find("extern \"C", 1, true) then
        ok = makes_room or text:find("checkstack", 1, true)
      else
        ok = not hot or signature:find("Room<", 1, true) or makes_room
      end
      if pushing and not ok then unaccounted[#unaccounted + 1] = name .. ":" .. start end
    end
    i = i + 1
  end
  return unaccounted
end

describe("the native core's files", function()
  local files = source_files()

  it("form a one-way graph", function()
    if #files == 0 then pending("no src/ here (an installed rock)") return end
    local cycle = find_cycle(dependencies(files))
    assert.is_nil(cycle, cycle and "cycle: " .. table.concat(cycle, " -> "))
  end)

  it("give every unsafe function a # Safety section", function()
    if #files == 0 then pending("no src/ here (an installed rock)") return end
    local missing = {}
    for _, file in ipairs(files) do
      local lines = {}
      for line in io.lines(file) do lines[#lines + 1] = line end
      for _, where in ipairs(unsafe_without_safety(file, lines)) do missing[#missing + 1] = where end
    end
    assert.are.same({}, missing)
  end)

  it("are each named in ARCHITECTURE.md's table and in the README's Layout", function()
    if #files == 0 then pending("no src/ here (an installed rock)") return end
    local function read(name)
      local f = assert(io.open(name))
      local text = f:read("*a")
      f:close()
      return text
    end
    local architecture = read("ARCHITECTURE.md")
    local layout = read("README.md"):match("\n## Layout\n(.-)\n## ") or read("README.md"):match("\n## Layout\n(.*)$")
    local unnamed = {}
    for _, file in ipairs(files) do
      local folder, base = file:match("^src/([%w_]+)/"), file:match("^src/([%w_]+%.rs)$")
      local in_table = folder and architecture:find("`" .. folder .. "/`", 1, true)
        or base and architecture:find("`" .. base .. "`", 1, true)
      local in_layout = folder and layout:find("src/" .. folder .. "/", 1, true)
        or base and (layout:find("src/" .. base, 1, true) or layout:find(", src/" .. base, 1, true))
      if not in_table then unnamed[#unnamed + 1] = "ARCHITECTURE.md: " .. file end
      if not in_layout then unnamed[#unnamed + 1] = "README Layout: " .. file end
    end
    assert.are.same({}, unnamed)
  end)

  it("catch panics only through contained.rs, whose results have no destructor", function()
    if #files == 0 then pending("no src/ here (an installed rock)") return end
    local elsewhere = {}
    for _, file in ipairs(files) do
      if file ~= "src/contained.rs" then
        local n = 0
        for line in io.lines(file) do
          n = n + 1
          if not line:match("^%s*//") and line:find("catch_unwind", 1, true) then
            elsewhere[#elsewhere + 1] = file .. ":" .. n
          end
        end
      end
    end
    assert.are.same({}, elsewhere)
  end)

  it("push onto Lua stacks only within a Room", function()
    if #files == 0 then pending("no src/ here (an installed rock)") return end
    local unaccounted = {}
    for _, file in ipairs(files) do
      local lines = {}
      for line in io.lines(file) do lines[#lines + 1] = line end
      local hot = file == "src/resume.rs" or file == "src/hook.rs"
      for _, where in ipairs(pushes_without_room(file, lines, hot)) do unaccounted[#unaccounted + 1] = where end
    end
    assert.are.same({}, unaccounted)
  end)

  it("are checked by a test that sees a push without its room", function()
    local lines = {
      "unsafe extern \"C-unwind\" fn entered(state: *mut lua_State) -> c_int {",
      "    let _result = Room::<1>::on_entry();", "    ffi::lua_pushnil(state);", "    1", "}",
      "unsafe extern \"C-unwind\" fn bare(state: *mut lua_State) -> c_int {",
      "    ffi::lua_pushnil(state);", "    1", "}",
      "unsafe fn handed(state: *mut lua_State, _: Room<1>) {", "    ffi::lua_pushnil(state);", "}",
      "unsafe fn unhanded(state: *mut lua_State) {",
      "    // ffi::lua_pushnil(state) in a comment", "    ffi::lua_rawgeti(state, 1, 1);", "}",
      "fn reads(state: *mut lua_State) -> bool {", "    ffi::lua_isnil(state, 1)", "}",
    }
    assert.are.same({ "x.rs:6", "x.rs:13" }, pushes_without_room("x.rs", lines, true))
    assert.are.same({ "x.rs:6" }, pushes_without_room("x.rs", lines, false))
  end)

  it("are checked by a test that sees an unsafe function without its contract", function()
    local lines = {
      "/// Does a thing.", "///", "/// # Safety", "/// `state` is alive.", "#[inline]",
      "pub unsafe fn documented(state: *mut lua_State) {}", "",
      "/// Does another.", "unsafe fn undocumented(state: *mut lua_State) {}",
      "// SAFETY (caller): a plain comment is not the contract.", "pub(super) unsafe fn commented() {}",
      "unsafe extern \"C-unwind\" fn called_by_lua(state: *mut lua_State) -> c_int { 0 }",
    }
    assert.are.same({ "x.rs:9", "x.rs:11" }, unsafe_without_safety("x.rs", lines))
  end)

  it("are checked by a test that sees a cycle", function()
    local cycle = find_cycle({ a = { b = true }, b = { c = true }, c = { a = true }, d = { a = true } })
    assert.are.same({ "a", "b", "c", "a" }, cycle)
    assert.is_nil(find_cycle({ a = { b = true }, b = {}, c = { a = true, b = true } }))
  end)
end)
