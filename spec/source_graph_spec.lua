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
