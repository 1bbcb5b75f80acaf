-- Writes the release rockspec, rockspec/<rock>-<version>-1.rockspec, from the
-- scm rockspec and the version in Cargo.toml (the one source of truth).
-- Everything but the header, `version` and `source` is copied verbatim from
-- the scm rockspec, so the build, install and test tables cannot drift: add
-- a module to the scm rockspec, run this again. `source` is the scm
-- rockspec's repository URL with the tag `v<version>`.
--
--   lua rockspec/release.lua          write it, removing older release rockspecs
--   lua rockspec/release.lua --check  exit 1 unless the file on disk is current
--   lua rockspec/release.lua --info   print its path, source URL and tag, a line each
--
-- Run from the checkout's root. Also a module (`require("rockspec.release")`,
-- used by spec/rock_spec.lua): `render(scm_text, version)` and friends.
local M = {}

local function read(path)
  local file, err = io.open(path, "rb")
  if not file then return nil, err end
  local text = file:read("*a")
  file:close()
  return text
end

-- Evaluates a rockspec (plain assignments) into a table, on any Lua version.
function M.load_rockspec(text, name)
  local env = {}
  local chunk, err
  if setfenv then
    chunk, err = loadstring(text, "@" .. name)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = load(text, "@" .. name, "t", env)
  end
  if not chunk then error(err, 0) end
  chunk()
  return env
end

-- The version in Cargo.toml's [package] section.
function M.cargo_version(cargo_toml)
  local package = cargo_toml:match("%[package%](.-)\n%[") or cargo_toml:match("%[package%](.*)")
  local version = package and package:match('\nversion%s*=%s*"([^"]+)"')
  if not version then error("Cargo.toml: no version in [package]", 0) end
  if not version:match("^%d+%.%d+%.%d+$") then
    -- LuaRocks versions are dot-separated numbers (a hyphen ends the version).
    error("Cargo.toml: version " .. version .. " is not MAJOR.MINOR.PATCH", 0)
  end
  return version
end

-- The scm rockspec's path (the one file named rockspec/<rock>-scm-1.rockspec).
function M.scm_path()
  local pipe = assert(io.popen("ls rockspec/*-scm-1.rockspec 2>/dev/null"))
  local paths = {}
  for line in pipe:lines() do paths[#paths + 1] = line end
  pipe:close()
  if #paths ~= 1 then
    error("expected one rockspec/<rock>-scm-1.rockspec, found " .. #paths, 0)
  end
  return paths[1]
end

-- The release rockspec's path and text for `version`, from the scm rockspec.
function M.render(scm_text, version, scm_name)
  scm_name = scm_name or "the scm rockspec"
  local scm = M.load_rockspec(scm_text, scm_name)
  assert(scm.version == "scm-1", scm_name .. ": version is not scm-1")
  assert(type(scm.source) == "table" and type(scm.source.url) == "string",
    scm_name .. ": no source.url")
  -- The scm rockspec's header comment is about itself: replaced.
  local body = scm_text
  while body:match("^%-%-") do body = body:gsub("^%-%-[^\n]*\n", "", 1) end
  local replaced
  body, replaced = body:gsub('\nversion = "scm%-1"\n', ('\nversion = "%s-1"\n'):format(version), 1)
  assert(replaced == 1, scm_name .. ': no line `version = "scm-1"`')
  body, replaced = body:gsub("\nsource = %b{}\n", function()
    return ('\nsource = {\n  url = "%s",\n  tag = "v%s",\n}\n'):format(scm.source.url, version)
  end, 1)
  assert(replaced == 1, scm_name .. ": no `source = { ... }` block")
  local header = ("-- Written by rockspec/release.lua from %s and Cargo.toml's version:\n"
    .. "-- edit those and run `lua rockspec/release.lua` (or rockspec/bump.sh).\n"):format(scm_name)
  return ("rockspec/%s-%s-1.rockspec"):format(scm.package, version), header .. body
end

-- Paths of the release rockspecs on disk (every rockspec/<rock>-*-1.rockspec
-- but the scm one).
function M.release_paths()
  local pipe = assert(io.popen("ls rockspec/*.rockspec 2>/dev/null"))
  local paths = {}
  for line in pipe:lines() do
    if not line:match("%-scm%-1%.rockspec$") then paths[#paths + 1] = line end
  end
  pipe:close()
  return paths
end

-- The path and text the release rockspec must have now.
function M.expected()
  local scm_path = M.scm_path()
  local version = M.cargo_version(assert(read("Cargo.toml")))
  return M.render(assert(read(scm_path)), version, scm_path)
end

local function main(option)
  local path, text = M.expected()
  if option == "--check" then
    local others = M.release_paths()
    if read(path) ~= text or #others ~= 1 then
      io.stderr:write(path, " is missing or out of date (or there are older release",
        " rockspecs): run `lua rockspec/release.lua`\n")
      os.exit(1)
    end
    return
  elseif option == "--info" then
    local release = M.load_rockspec(text, path)
    io.write(path, "\n", release.source.url, "\n", release.source.tag, "\n")
    return
  elseif option ~= nil then
    io.stderr:write("usage: lua rockspec/release.lua [--check | --info]\n")
    os.exit(2)
  end
  for _, other in ipairs(M.release_paths()) do
    if other ~= path then assert(os.remove(other)) end
  end
  local file = assert(io.open(path, "wb"))
  file:write(text)
  file:close()
  io.write(path, "\n")
end

if ... ~= "rockspec.release" then
  main(...)
end
return M
