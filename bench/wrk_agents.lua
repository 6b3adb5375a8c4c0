-- wrk script for bench_agent_api.py.
--
--   wrk ... -s wrk_agents.lua http://127.0.0.1:PORT -- heartbeat /path/to/credentials.txt
--   wrk ... -s wrk_agents.lua http://127.0.0.1:PORT -- healthz
--
-- "heartbeat": every request is POST /agents/v1/{id}/heartbeat with the next agent's
-- bearer credential (one "agent_id api_key" pair per line in the file), rotating over
-- all of them; each wrk thread starts at a different offset.
-- "healthz": GET /healthz (no database work), to measure wrk's own ceiling.
-- At the end one line "WRK_JSON {...}" carries the figures for the Python driver.

local threads = {}
local next_thread = 0

function setup(thread)
   thread:set("thread_index", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

local mode = "healthz"
local agents = {}
local position = 0
non2xx = 0  -- globals: wrk reads them with thread:get()
responses = 0
last_bad_status = 0
local stamp_second = -1
local stamp = ""

function init(args)
   mode = args[1] or "healthz"
   if mode == "heartbeat" then
      for line in io.lines(args[2]) do
         local id, key = line:match("^(%S+)%s+(%S+)$")
         if id then
            table.insert(agents, {
               path = "/agents/v1/" .. id .. "/heartbeat",
               headers = {
                  ["Authorization"] = "Bearer " .. key,
                  ["Content-Type"] = "application/json",
                  ["Accept"] = "application/json",
                  ["User-Agent"] = "Stavily-Agent/1.0.0",
               },
            })
         end
      end
      position = (thread_index or 0) * 397
   end
end

local function now_rfc3339()
   local second = os.time()
   if second ~= stamp_second then
      stamp_second = second
      stamp = os.date("!%Y-%m-%dT%H:%M:%SZ", second)
   end
   return stamp
end

function request()
   if mode ~= "heartbeat" then
      return wrk.format("GET", "/healthz")
   end
   position = position + 1
   local agent = agents[(position % #agents) + 1]
   local body = '{"timestamp":"' .. now_rfc3339() .. '","status":"online"}'
   return wrk.format("POST", agent.path, agent.headers, body)
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      last_bad_status = status
   end
end

function done(summary, latency, requests)
   local bad, seen, last_bad = 0, 0, 0
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("non2xx") or 0)
      seen = seen + (thread:get("responses") or 0)
      local status = thread:get("last_bad_status") or 0
      if status ~= 0 then
         last_bad = status
      end
   end
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "responses": %d, "duration_us": %d, "non2xx": %d, ' ..
      '"last_bad_status": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
      '"timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
      '"mean_us": %.1f}\n',
      summary.requests, seen, summary.duration, bad, last_bad,
      errors.connect, errors.read, errors.write, errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
