-- Pass path, uniform popularity: 10,000 accounts (AK00000..AK09999), the
-- feature mix of api.lua (both tiers), half V1 and half V3 requests.
-- wrk -s bench/lua/pass_uniform.lua http://127.0.0.1:8080/   (from the repository root)
bench = bench or { dist = "uniform" }
dofile((os.getenv("BENCH_LUA_DIR") or "bench/lua") .. "/api.lua")
