std = "max"
-- The originals built for bench/run (an ignored folder) are not ours.
exclude_files = { "bench/originals" }
files["spec"] = {
  std = "+busted",
  -- Thread bodies are dumped and run in a new Lua state: they require their
  -- own `mtint`, shadowing the spec's on purpose.
  -- GC specs assign nil to drop the last reference: "unused" on purpose.
  ignore = { "431", "432", "311" },
}
files["bench"] = { ignore = { "431" } }
files["examples"] = {
  -- The seed's example uses the global that corowatch.export(_G) sets;
  -- thread bodies require their own modules, shadowing on purpose.
  read_globals = { "corowatch" },
  ignore = { "431" },
}
