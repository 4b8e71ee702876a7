-- Reject path: few accounts (10 unless BENCH_ACCOUNTS says otherwise), each
-- far over its limit, so nearly every answer is 429. The harness points this
-- at proxies configured with a low per-account limit.
-- wrk -s bench/lua/reject.lua http://127.0.0.1:8080/   (from the repository root)
bench = bench or { dist = "uniform", accounts = tonumber(os.getenv("BENCH_ACCOUNTS") or "") or 10 }
dofile((os.getenv("BENCH_LUA_DIR") or "bench/lua") .. "/api.lua")
