-- wrk script for bench_fleet.py: heartbeats from a simulated fleet.
--
--   wrk -tT -cC -dDs -s wrk_fleet.lua URL -- paced CREDENTIALS INTERVAL T
--   wrk -tT -cC -dDs -s wrk_fleet.lua URL -- max CREDENTIALS INTERVAL T
--
-- CREDENTIALS holds one "agent_id api_key" pair per line. Thread i of T owns the agents
-- i+1, i+1+T, ... and posts their heartbeats in turn (the full body an agent of ours
-- sends: timestamp, status, running, heartbeat_interval, system figures).
--
-- "paced": plain wrk has no rate control (-R is wrk2's), so delay() paces each thread:
-- every request gets the next free slot of the thread's schedule, one slot every
-- INTERVAL / (agents of the thread) seconds, so each agent beats once per INTERVAL while
-- the server keeps up. A connection waits for its slot; when every connection is busy
-- the schedule falls behind and catches up (at most one second of it) as soon as
-- connections are free again, so the achieved rate shows whether the server kept up.
-- "max": no waiting, as fast as the connections allow (the sustained maximum).
-- Like our agents, each thread beats less often when an answer's next_heartbeat_interval
-- is longer than INTERVAL (the server stretching its fleet's beats when overloaded); the
-- longest told comes back as "told_s".
--
-- At the end one line "WRK_JSON {...}" carries the figures for the Python driver (the
-- same keys as wrk_agents.lua, plus the statuses seen and how far the schedule fell
-- behind).

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]])
local timespec = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_us()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
   return tonumber(timespec.tv_sec) * 1000000 + tonumber(timespec.tv_nsec) / 1000
end

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
local period_us = 0
local interval_s = 5
told_s = 0
local next_slot = 0
-- Globals, not locals: done() reads them from each thread with thread:get().
max_behind_us = 0
dropped_slots = 0
sent = 0
responses = 0
non2xx = 0
status429 = 0
status4xx = 0
status5xx = 0
last_bad_status = 0
local stamp_second = -1
local stamp = ""

function init(args)
   mode = args[1] or "healthz"
   if mode == "healthz" then
      return
   end
   local interval = tonumber(args[3] or "5")
   interval_s = interval
   local thread_count = tonumber(args[4] or "1")
   local index = 0
   for line in io.lines(args[2]) do
      local id, key = line:match("^(%S+)%s+(%S+)$")
      if id then
         if index % thread_count == (thread_index or 0) then
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
         index = index + 1
      end
   end
   period_us = interval * 1000000 / math.max(1, #agents)
   -- The schedule starts with the thread, not with its first connection: time spent
   -- connecting is time the agents wait.
   next_slot = now_us() - period_us
end

function delay()
   if mode ~= "paced" then
      return 0
   end
   local now = now_us()
   next_slot = next_slot + period_us
   if next_slot < now then
      local behind = now - next_slot
      if behind > max_behind_us then
         max_behind_us = behind
      end
      if behind > 1000000 then
         -- forget what is more than a second late: those beats are never sent
         local dropped = math.floor((behind - 1000000) / period_us)
         dropped_slots = dropped_slots + dropped
         next_slot = next_slot + dropped * period_us
      end
      return 0
   end
   return math.floor((next_slot - now) / 1000)
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
   if mode == "healthz" then
      return wrk.format("GET", "/healthz")
   end
   sent = sent + 1
   position = position % #agents + 1
   local agent = agents[position]
   local body = '{"timestamp":"' .. now_rfc3339() .. '","status":"online","running":[],'
      .. '"heartbeat_interval":5,"version":"1.0.0","system":{"cpu_percent":12.5,'
      .. '"memory_percent":41.0,"disk_percent":57.5,"load":[0.42,0.38,0.35]}}'
   return wrk.format("POST", agent.path, agent.headers, body)
end

function response(status, headers, body)
   responses = responses + 1
   local told = tonumber(body and body:match('"next_heartbeat_interval":(%d+)') or "")
   if told and told > told_s then
      told_s = told
   end
   if mode == "paced" and told then
      period_us = math.max(told, interval_s) * 1000000 / math.max(1, #agents)
   end
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      last_bad_status = status
      if status == 429 then
         status429 = status429 + 1
      elseif status >= 500 then
         status5xx = status5xx + 1
      else
         status4xx = status4xx + 1
      end
   end
end

function done(summary, latency, requests)
   local sent_all, seen, bad, s429, s4xx, s5xx = 0, 0, 0, 0, 0, 0
   local last_bad, behind, late, told = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      sent_all = sent_all + (thread:get("sent") or 0)
      seen = seen + (thread:get("responses") or 0)
      bad = bad + (thread:get("non2xx") or 0)
      s429 = s429 + (thread:get("status429") or 0)
      s4xx = s4xx + (thread:get("status4xx") or 0)
      s5xx = s5xx + (thread:get("status5xx") or 0)
      local status = thread:get("last_bad_status") or 0
      if status ~= 0 then
         last_bad = status
      end
      behind = math.max(behind, thread:get("max_behind_us") or 0)
      late = late + (thread:get("dropped_slots") or 0)
      told = math.max(told, thread:get("told_s") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "responses": %d, "duration_us": %d, "non2xx": %d, ' ..
      '"status429": %d, "status4xx": %d, "status5xx": %d, "last_bad_status": %d, ' ..
      '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
      '"max_behind_us": %d, "dropped_slots": %d, "sent": %d, "told_s": %d}\n',
      summary.requests, seen, summary.duration, bad, s429, s4xx, s5xx, last_bad,
      errors.connect, errors.read, errors.write, errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, behind, late, sent_all, told))
end
