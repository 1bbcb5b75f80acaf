/* A Lua host whose allocator fails on demand: `set_budget(n)` lets the
 * next n allocations (new blocks or growth) succeed and fails the one
 * after; then allocations succeed again (so that the script can go on).
 * `set_budget(nil)` cancels a failure that has not happened. spec/oom_spec.lua builds it for the
 * Lua version under test and runs spec/oom/scenario.lua in it, so that
 * every allocation the library makes in a scenario fails once, in turn;
 * run-valgrind runs the same under memcheck. */
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

static long budget = -1; /* allocations before the failure; -1: none */
/* Lua 5.4 collects garbage and asks once more after a failure: the same
 * request fails again. */
static int failed;
static void *failed_block;
static size_t failed_size;

static void *limited_alloc(void *ud, void *block, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(block);
    return NULL;
  }
  /* 5.2+ pass a type tag as osize for new blocks: only growth counts. */
  if (failed) {
    failed = 0;
    if (block == failed_block && nsize == failed_size) return NULL;
  }
  if (budget >= 0 && nsize > (block ? osize : 0) && budget-- == 0) {
    failed = 1;
    failed_block = block;
    failed_size = nsize;
    return NULL;
  }
  return realloc(block, nsize);
}

static int set_budget(lua_State *L) {
  budget = lua_isnoneornil(L, 1) ? -1 : (long)luaL_checkinteger(L, 1);
  failed = 0;
  return 0;
}

int main(int argc, char **argv) {
  lua_State *L;
  int status;
  if (argc != 2) {
    fprintf(stderr, "usage: %s SCRIPT\n", argv[0]);
    return 2;
  }
  L = lua_newstate(limited_alloc, NULL);
  if (L == NULL) {
    fprintf(stderr, "host: this Lua cannot take a custom allocator\n");
    return 3;
  }
  luaL_openlibs(L);
  lua_register(L, "set_budget", set_budget);
  status = luaL_dofile(L, argv[1]);
  if (status != 0) fprintf(stderr, "%s\n", lua_tostring(L, -1));
  lua_close(L);
  return status == 0 ? 0 : 1;
}
