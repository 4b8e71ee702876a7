-- Pass path, Zipf-skewed popularity (s = 1.1 unless BENCH_ZIPF_S says
-- otherwise) over 10,000 accounts: AK00000 gets about 13% of the requests,
-- the top 100 about 60%.
-- wrk -s bench/lua/pass_zipf.lua http://127.0.0.1:8080/   (from the repository root)
bench = bench or { dist = "zipf" }
dofile((os.getenv("BENCH_LUA_DIR") or "bench/lua") .. "/api.lua")
