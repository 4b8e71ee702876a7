-- status.lua: appended after a scenario script for the probe run; counts the
-- answers by HTTP status (costs wrk CPU, so it is not used in measured runs)
-- and prints one line "BENCH_STATUS 200=n 429=m ...".
counts = {}
local threads_seen = {}
local setup_scenario = setup
function setup(thread)
  if setup_scenario then setup_scenario(thread) end
  table.insert(threads_seen, thread)
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
local done_other = done
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads_seen) do
    for k, v in pairs(t:get("counts") or {}) do total[k] = (total[k] or 0) + v end
  end
  local keys = {}
  for k in pairs(total) do table.insert(keys, k) end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do table.insert(out, k .. "=" .. total[k]) end
  io.write("BENCH_STATUS " .. table.concat(out, " ") .. "\n")
  if done_other then done_other(summary, latency, requests) end
end
