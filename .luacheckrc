std = "max"
files["spec"] = {
  std = "+busted",
  -- Thread bodies are dumped and run in a new Lua state: they require their
  -- own `mtint`, shadowing the spec's on purpose.
  -- GC specs assign nil to drop the last reference: "unused" on purpose.
  ignore = { "431", "432", "311" },
}
files["bench"] = { ignore = { "431" } }
